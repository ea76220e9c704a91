"""A Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster): main and replay placed apart."""

import json

import pytest
import ray
from conftest import FAST, FIXED_POLICY, REPO
from ray.cluster_utils import Cluster

from shadow.cli import main
from shadow.rundir import read_events

pytestmark = pytest.mark.slow


def test_main_and_replay_land_on_different_nodes_of_a_two_node_cluster(tmp_path):
    """Two Ray nodes on this machine, one CPU each: the main rank takes one, the replay the other."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
    try:
        out = tmp_path / "two-nodes"
        code = main(["run", "--job", str(REPO / "jobs/tiny.yaml"), *FAST, "--set", "steps=120", *FIXED_POLICY,
                     "--policy-set", "verify.every_n_steps=50", "--out", str(out)])
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert code == 0
    events = read_events(out)
    summary = json.loads((out / "summary.json").read_text())
    main_nodes = set(next(e for e in events if e["event"] == "main_started")["nodes"])
    replay_nodes = {e["node"] for e in events if e["event"] == "replay_finished"}
    assert len(main_nodes) == 1 and replay_nodes and not replay_nodes & main_nodes
    assert summary["num_verifications"] >= 1
