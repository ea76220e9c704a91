"""Groups of ranks: a 2-rank main job (torch.distributed over gloo) verified by replays of 1 or 2
ranks, and a replay that cannot get its resources (two nodes: test_multinode.py)."""

import json

import pytest
import ray
from conftest import FAST, FIXED_POLICY, REPO

from shadow.cli import main
from shadow.rundir import read_events, read_history, read_trajectory

pytestmark = pytest.mark.slow

TINY = str(REPO / "jobs/tiny.yaml")
TWO_RANKS = ["--set", "resources.num_ranks=2"]


def _run(tmp_path, name, *args):
    out = tmp_path / name
    code = main(["run", "--job", TINY, *FAST, *FIXED_POLICY, "--out", str(out), *args])
    return code, out, json.loads((out / "summary.json").read_text()), read_events(out)


@pytest.fixture(scope="module")
def four_cpu_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("replay_ranks", [2])
def test_replays_reproduce_a_two_rank_main_job_bit_for_bit(four_cpu_ray, tmp_path, replay_ranks):
    """BF16 main job of 2 ranks x 1 micro-batch; replays of 2 ranks x 1 (a collective load on a Ray replay
    group). Replays of 1 rank x 2 micro-batches: the FP8 test below, bit for bit on its noise windows."""
    code, out, summary, events = _run(tmp_path, f"replay{replay_ranks}", *TWO_RANKS, "--set", "steps=75",
                                      "--set", "precision.mode=bf16", "--policy-set", "verify.every_n_steps=50",
                                      "--policy-set", f"verify.replay_resources.num_ranks={replay_ranks}")
    assert code == 0
    (started,) = [e for e in events if e["event"] == "main_started"]
    assert started["ranks"] == 2
    verdicts = [e["verdict"] for e in events if e["event"] == "verdict"]
    assert verdicts and all(v["max_abs_gap"] == 0.0 and v["steps"] for v in verdicts)
    main_losses = {r.step: r.loss for r in read_history(out)[0]}
    for path in (out / "replays").glob("*.jsonl"):
        rows = read_trajectory(path)
        assert rows and all(main_losses[r.step] == r.loss for r in rows), path.name


def test_fp8_replays_reproduce_a_two_rank_main_job_bit_for_bit(four_cpu_ray, tmp_path):
    """FP8 with delayed scaling, 2 ranks x 1 micro-batch, replayed in FP8 by 1 rank x 2 micro-batches (the
    noise-floor windows replay in the main job's precision). Each rank's amax covers its own micro-batch
    and is max-reduced across ranks; the single replay rank takes the max over both micro-batches itself:
    the same amax history, scales and losses, bit for bit. With dropout, a micro-batch's masks depend on
    its index in the global batch, not on the rank that computes it (dropout is on here)."""
    code, out, summary, events = _run(tmp_path, "fp8-dropout", *TWO_RANKS, "--set", "steps=75",
                                      "--set", "model.dropout=0.1",
                                      "--set", "precision.mode=fp8", "--set", "precision.scaling=delayed",
                                      "--policy-set", "verify.every_n_steps=50", "--policy-set", "noise.enabled=true",
                                      "--policy-set", "noise.num_windows=2",
                                      "--policy-set", "verify.replay_resources.num_ranks=1")
    assert code == 0
    (started,) = [e for e in events if e["event"] == "main_started"]
    assert started["ranks"] == 2
    noise = [e for e in events if e["event"] == "verdict" and e["purpose"] == "noise"]
    assert len(noise) == 2 and all(e["verdict"]["steps"] and e["verdict"]["max_abs_gap"] == 0.0 for e in noise)
    history = read_history(out)[0]
    assert all(r.precision == "fp8" for r in history if r.step < noise[-1]["window_end"])
    main_losses = {r.step: r.loss for r in history}
    paths = sorted((out / "replays").glob("*-noise-fp8-*.jsonl"))
    assert len(paths) == 2
    for path in paths:
        rows = read_trajectory(path)
        assert rows and all(r.precision == "fp8" and main_losses[r.step] == r.loss for r in rows), path.name


def test_two_rank_main_job_passes_the_healthy_scenario(four_cpu_ray, tmp_path):
    # two windows of the default length, [0, 25) and [50, 75): the second starts once the first is
    # done, however slow the machine, since no newer span can take its place
    code, out, summary, events = _run(tmp_path, "healthy", *TWO_RANKS, "--set", "steps=75",
                                      "--policy-set", "verify.every_n_steps=50")
    assert code == 0 and summary["final_step"] == 75
    assert summary["num_verifications"] == 2 and summary["num_precision_switches"] == 0
    assert all(v["level"] == "clean" for v in summary["verdicts"])


def test_a_replay_without_resources_waits_and_never_blocks_the_main_job(four_cpu_ray, tmp_path):
    code, out, summary, events = _run(tmp_path, "starved", "--set", "steps=100",
                                      "--policy-set", "verify.replay_resources.num_cpus=16")
    assert code == 0 and summary["final_step"] == 100  # the main job finished on time
    kinds = [e["event"] for e in events]
    assert "replay_waiting_for_resources" in kinds
    skipped = [e for e in events if e["event"] == "replay_skipped"]
    assert skipped and "waiting for resources" in skipped[0]["reason"]
    assert summary["num_verifications"] == 0


def test_replays_that_add_gradients_in_another_order_need_the_noise_floor(four_cpu_ray, tmp_path):
    """2 ranks x 2 micro-batches replayed by 1 rank x 4 add four gradients in another order: their losses
    differ by fp32 rounding (measured: docs/scale-out.md), so the run refuses unless noise calibration is on."""
    code, out, summary, events = _run(tmp_path, "inexact", *TWO_RANKS, "--set", "resources.grad_accum=2",
                                      "--set", "steps=10", "--policy-set", "verify.replay_resources.num_ranks=1")
    assert code == 1
    (failed,) = [e for e in events if e["event"] == "controller_phase" and e["new"] == "failed"]
    assert "verify.replay_resources.num_ranks=1 adds the gradients" in failed["reason"]
    assert "noise.enabled=true" in failed["reason"]
    assert not [e for e in events if e["event"] == "main_started"]
