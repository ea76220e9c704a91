"""`shadow run` tracked by a real `mlflow server` on 127.0.0.1 (started by this module), read back
through the MLflow API; the server killed and restarted mid-run; `--resume` after a driver kill;
`shadow report`; and the MLflow UI's compare view in headless Chromium.

The tracked run is the fault job at the small model size: FP8 -> verification fails -> rollback to
BF16 -> probes -> FP8 again, so every kind of record appears.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
from mlflow import MlflowClient

from conftest import FAST, FIXED_POLICY, REPO
from mlflow_server import MlflowServer
from shadow.cli import main
from shadow.rundir import read_events, read_history, read_trajectory
from shadow.tracking.state import TrackingState

pytestmark = pytest.mark.slow

FAULT_JOB = str(REPO / "jobs/tiny_fault.yaml")
TRAIN_KEYS = ("train/loss", "train/grad_norm", "train/lr", "train/step_time_s")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    mlflow_server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    mlflow_server.start()
    yield mlflow_server
    mlflow_server.kill()


@pytest.fixture(scope="module")
def tracked_run(server, tmp_path_factory):
    """One full run of the fault job, tracked by the server, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("tracked") / "fault-run"
    code = main(["run", "--job", FAULT_JOB, *FAST, *FIXED_POLICY, "--out", str(out), "--tracking-uri", server.url,
                 "--experiment", "shadow-it"])
    assert code == 0
    return out


def _runs_of(client: MlflowClient, run_dir: Path) -> list:
    state = TrackingState.load(run_dir)
    experiment = client.get_experiment_by_name(state.experiment)
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`shadow.run_dir_id` = '{state.run_dir_id}'")


def _history(client, run_id, key) -> Counter:
    return Counter((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_parent_and_child_runs_share_keys_and_steps(server, tracked_run):
    client = MlflowClient(server.url)
    events = read_events(tracked_run)
    state = TrackingState.load(tracked_run)
    runs = _runs_of(client, tracked_run)
    parent = client.get_run(state.parent_run_id)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    started = [e for e in events if e["event"] == "replay_started"]
    assert len(runs) == 1 + len(started) and len(children) == len(started) >= 5
    assert parent.info.status == "FINISHED" and parent.info.run_name == tracked_run.name

    # every trained row of the main job is in the parent run, at its step (re-trained steps twice)
    trajectory = read_trajectory(tracked_run)
    assert _history(client, parent.info.run_id, "train/loss") == Counter((r.step, r.loss) for r in trajectory)
    telemetry = client.get_metric_history(parent.info.run_id, "telemetry/act/kurtosis_max")
    assert {m.step for m in telemetry} == {r.step for r in trajectory if r.telemetry} != set()
    precision = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "shadow/precision")}
    kept, _ = read_history(tracked_run)
    assert precision[kept[-1].step] == 1.0 and precision[200] == 0.0  # FP8 at the end, BF16 in fallback

    for event in started:  # each replay: same keys at the same global steps as the main run's window
        child = next(r for r in children if r.data.tags["shadow.replay"] == event["name"])
        window = list(range(event["start_step"], event["start_step"] + event["num_steps"]))
        assert child.info.run_name == f"{event['purpose']} {event['precision']} @ step {event['start_step']}"
        assert child.data.tags["shadow.window_start"] == str(event["start_step"])
        assert child.data.tags["shadow.window_steps"] == str(event["num_steps"])
        assert child.data.tags["shadow.precision"] == event["precision"]
        assert child.data.tags["shadow.purpose"] == event["purpose"]
        assert child.data.tags["shadow.verdict"] in ("clean", "warn", "violation", "discarded")
        for key in TRAIN_KEYS:
            child_steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, key))
            parent_steps = {m.step for m in client.get_metric_history(parent.info.run_id, key)}
            assert child_steps == window and set(window) <= parent_steps, (event["name"], key)
        assert child.info.status == "FINISHED"

    verdicts = [e for e in events if e["event"] == "verdict"]
    gaps = _history(client, parent.info.run_id, "shadow/gap_rel")
    assert gaps == Counter((v["window_end"], v["value"]) for v in verdicts)
    switches = client.get_metric_history(parent.info.run_id, "shadow/switch")
    assert [(m.step, m.value) for m in sorted(switches, key=lambda m: m.timestamp)] == [
        (e["step"], 1.0 if e["new"] == "fp8" else 0.0) for e in events if e["event"] == "precision_switched"]
    rollback = next(e for e in events if e["event"] == "rollback")
    [rollback_metric] = client.get_metric_history(parent.info.run_id, "shadow/rollback")
    first, end = rollback["discarded"]
    assert (rollback_metric.step, rollback_metric.value) == (rollback["old_step"], end - first)
    assert client.get_metric_history(parent.info.run_id, "shadow/decision/switch_to_bf16")
    assert client.get_metric_history(parent.info.run_id, "shadow/decision/switch_to_fp8")
    tags = parent.data.tags
    assert tags["shadow.state"] == "fp8" and tags["shadow.precision"] == "fp8"
    assert tags["shadow.discarded"].startswith(f"[0, {rollback['old_step']})")
    assert parent.data.params["job.steps"] == "400" and parent.data.params["job.model.d_model"] == "64"
    assert parent.data.params["policy.thresholds.switch"] == "0.015"
    layers = next(e for e in events if e["event"] == "fp8_layers")  # which layers ran in FP8, as params
    assert parent.data.params["model_layers.num_fp8"] == "10" == str(layers["num_fp8"])
    assert parent.data.params["model_layers.fp8"] == ",".join(layers["fp8"]) and "blocks.1.ffn.w_down" in layers["fp8"]
    assert parent.data.params["model_layers.factory"] == "shadow.model:Transformer"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"job.yaml", "events.jsonl", "summary.json", "report.png", "policy"} <= artifacts
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "policy")] == ["policy/policy-v1.yaml"]


def test_server_killed_mid_run_loses_nothing_and_duplicates_nothing(server, tmp_path):
    out = tmp_path / "outage"
    client = MlflowClient(server.url)
    outage: dict[str, float] = {}

    def crash_and_return():  # once training is under way: SIGKILL the server, then start it again
        while not (out / "trajectory.jsonl").exists() or len(read_trajectory(out)) < 10:
            time.sleep(0.1)
        server.kill()
        outage["killed_at_step"] = len(read_trajectory(out))
        time.sleep(2.0)
        server.start()
        outage["restarted_at_step"] = len(read_trajectory(out))

    thread = threading.Thread(target=crash_and_return)
    thread.start()
    try:
        code = main(["run", "--job", FAULT_JOB, *FAST, *FIXED_POLICY, "--out", str(out), "--tracking-uri", server.url,
                     "--experiment", "shadow-it"])
    finally:
        thread.join()
    assert code == 0
    events = read_events(out)
    kinds = [e["event"] for e in events]
    assert "tracking_degraded" in kinds and "tracking_restored" in kinds, outage
    assert kinds.index("tracking_degraded") < kinds.index("tracking_restored")
    restored = next(e for e in events if e["event"] == "tracking_restored")
    assert restored["backfilled_metrics"] > 0 and restored["outage_s"] > 2.0

    runs = _runs_of(client, out)
    state = TrackingState.load(out)
    assert len(runs) == 1 + kinds.count("replay_started")  # no run created twice
    parent = state.parent_run_id
    assert client.get_run(parent).info.status == "FINISHED"
    trajectory = read_trajectory(out)
    for key, field in (("train/loss", "loss"), ("train/grad_norm", "grad_norm"), ("train/lr", "lr")):
        assert _history(client, parent, key) == Counter((r.step, getattr(r, field)) for r in trajectory), key
    for name, run_id in state.runs.items():
        if name != "main":
            rows = read_trajectory(out / "replays" / f"{name}.jsonl")
            assert _history(client, run_id, "train/loss") == Counter((r.step, r.loss) for r in rows), name
    assert (out / "mlflow-spool.acked").read_text() == str(_last_seq(out))


def _last_seq(run_dir: Path) -> int:
    lines = (run_dir / "mlflow-spool.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["seq"]


def test_resume_after_driver_kill_continues_the_same_mlflow_runs(server, tmp_path):
    out = tmp_path / "resumed"
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "shadow", "run", "--job", FAULT_JOB, *FAST, *FIXED_POLICY, "--set", "steps=150",
         "--out", str(out), "--tracking-uri", server.url, "--experiment", "shadow-it"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    try:
        while not any(e["event"] == "checkpoint_committed" and e["step"] >= 50 for e in read_events(out)):
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "the run never reached step 50"
            time.sleep(0.2)
        time.sleep(1.5)  # let the tracker send what it has: the resumed driver must not need it
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        log.close()
    parent_before = TrackingState.load(out).parent_run_id
    assert parent_before is not None

    assert main(["run", "--resume", str(out), "--tracking-uri", server.url]) == 0

    client = MlflowClient(server.url)
    state = TrackingState.load(out)
    assert state.parent_run_id == parent_before
    events = read_events(out)
    runs = _runs_of(client, out)
    assert [r.info.run_id for r in runs if r.data.tags["shadow.run_key"] == "main"] == [parent_before]
    assert len(runs) == 1 + sum(1 for e in events if e["event"] == "replay_started")
    assert client.get_run(parent_before).info.status == "FINISHED"
    assert _history(client, parent_before, "train/loss") == Counter((r.step, r.loss) for r in read_trajectory(out))
    assert client.get_metric_history(parent_before, "shadow/resumed")
    judged = {e["name"] for e in events if e["event"] in ("verdict", "replay_discarded")}
    for run in runs:  # a replay the dead driver was running ends KILLED, never left RUNNING
        name = run.data.tags["shadow.run_key"]
        if name != "main":
            assert run.info.status == ("FINISHED" if name in judged else "KILLED"), name


def test_shadow_report_writes_png_and_tables_and_logs_to_the_parent(server, tracked_run, tmp_path, capsys):
    import matplotlib.image

    png = tmp_path / "fault-report.png"
    assert main(["report", str(tracked_run), "--out", str(png)]) == 0
    printed = capsys.readouterr().out
    assert png.stat().st_size > 30_000
    pixels = matplotlib.image.imread(png)
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 200  # curves, bands, markers, text: far from a blank canvas
    for event in read_events(tracked_run):
        if event["event"] == "verdict":
            assert event["name"] in printed
    assert "switch_to_bf16" in printed and "switch_to_fp8" in printed and "rollback: steps [0," in printed
    parent = TrackingState.load(tracked_run).parent_run_id
    assert "MLflow: logged to run" in printed
    assert png.name in {a.path for a in MlflowClient(server.url).list_artifacts(parent)}


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def compare_page_url(server_url: str, experiment_id: str, run_ids: list[str], metric: str,
                     steps: tuple[int, int]) -> str:
    """The metric page of MLflow's compare view (Compare runs -> a metric): the runs' curves overlaid,
    zoomed on `steps`."""
    quoted = urllib.parse.quote
    layout = {"xaxis": {"range": list(steps), "autorange": False}}
    return (f"{server_url}/#/metric?runs={json.dumps(run_ids)}&metric={quoted(json.dumps(metric))}"
            f"&experiments={json.dumps([experiment_id])}&plot_metric_keys={quoted(json.dumps([metric]))}"
            f"&plot_layout={json.dumps(layout)}&x_axis=step&y_axis_scale=linear&line_smoothness=1"
            "&show_point=false&deselected_curves=[]&last_linear_y_axis_range=[]").replace(" ", "")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (scripts/setup installs it)")
def test_compare_view_overlays_a_replay_on_the_main_run_in_chromium(server, tracked_run, tmp_path):
    """Chromium's own headless CLI (`--dump-dom` and `--screenshot` in one call, `--virtual-time-budget`
    to let the single-page app fetch and draw) needs no driver: no selenium, no chromedriver whose
    version must match, no Node; one subprocess, and the DOM to assert on."""
    client = MlflowClient(server.url)
    state = TrackingState.load(tracked_run)
    parent = client.get_run(state.parent_run_id)
    # a replay after the rollback: the main run has one row per step there (before it, two lineages)
    rollback_end = next(e for e in read_events(tracked_run) if e["event"] == "rollback")["discarded"][1]
    child = next(client.get_run(run_id) for name, run_id in state.runs.items()
                 if name != "main" and int(name.rsplit("-", 1)[1]) >= rollback_end)
    start = int(child.data.tags["shadow.window_start"])
    url = compare_page_url(server.url, parent.info.experiment_id, [parent.info.run_id, child.info.run_id],
                           "train/loss", (start - 60, start + 85))
    screenshot = tmp_path / "mlflow_compare.png"
    # --virtual-time-budget lets the page finish its API calls and draw the chart before the dump
    result = subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                             "--window-size=1800,1000", "--virtual-time-budget=20000",
                             f"--screenshot={screenshot}", "--dump-dom", url],
                            capture_output=True, text=True, timeout=120)
    dom = result.stdout
    assert parent.info.run_name in dom and child.info.run_name in dom, result.stderr[-2000:]
    assert "train/loss" in dom and "js-plotly-plot" in dom  # the chart, drawn by plotly
    assert dom.count("class=\"trace scatter") >= 2  # two curves: the main run and the replay
    assert screenshot.stat().st_size > 50_000
