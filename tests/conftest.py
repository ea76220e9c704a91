"""Shared test fixtures: a small job that trains fast on one CPU thread, and a local Ray per module."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The plug-in models the tests train (`model.factory: plugins.gpt:build`) live in tests/plugins, outside
# shadow: rank processes and Ray workers import them as a user's own package is imported, via PYTHONPATH.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
# `--set` overrides that shrink a shipped job's model (same data, schedule, faults) for fast runs
FAST = ["--set", "model.num_layers=2", "--set", "model.d_model=64", "--set", "model.seq_len=64",
        "--set", "batch_size=8"]
# The fixed cadence (a full window every `every_n_steps`): tests of the controller's mechanics (faults,
# resume, tracking, scale-out) count its windows, which stay where they are whatever a window finds.
# The default policy's adaptive cadence and early stopping: test_run_scenarios.py, test_run_local.py.
FIXED_POLICY = ["--policy", str(REPO / "policies" / "fixed.yaml")]

SMALL_JOB = """\
name: small
steps: 24
batch_size: 8
seed: 3
model: {num_layers: 2, d_model: 64, num_heads: 2, seq_len: 64, vocab_size: 256}
data: {source: pydoc, seed: 5}
optim: {lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 4}
precision: {mode: fp8, backend: emulated, format: hybrid, scaling: delayed, amax_history_len: 4}
checkpoint: {every_steps: 8}
eval: {batches: 2}
"""


@pytest.fixture
def small_job_file(tmp_path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_JOB)
    return path


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for a test module (a Ray takes ~4 s and ~1.6 GB to start)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


# The longest test files first (a few minutes each on 2 cores): the xdist workers take a file at a
# time in collection order, so the long ones start early and the workers finish together.
LONGEST_FILES_FIRST = (  # by measured seconds per file (a full run, 2 workers), longest first
    "test_run_scenarios.py", "test_mlflow_tracking.py", "test_benchmarks.py", "test_process_faults.py",
    "test_scale_out.py", "test_sharded_training.py", "test_run_local.py", "test_input_faults.py",
    "test_run_stop_and_disk.py", "test_resume.py", "test_fp8_training.py", "test_ray_jobs.py",
    "test_checkpoint_validation.py", "test_storage_faults.py", "test_multinode.py", "test_triggers.py",
    "test_checkpoint_fuzz.py", "test_s3_multipart.py", "test_plugin_models.py", "test_fsdp_float8_all_gather.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FILES_FIRST.index(name) if name in LONGEST_FILES_FIRST else len(LONGEST_FILES_FIRST)
    items.sort(key=rank)  # stable: tests keep their order within a file


# `slow` marks every test that trains or starts a `shadow run` (seconds to minutes); `-m "not slow"` is
# the quick loop. So the marker stays true, the run ends with the unmarked tests that took longer.
SLOW_S = 10.0
_unmarked_slow: list[tuple[str, float]] = []


def pytest_runtest_logreport(report):
    if report.when == "call" and report.duration > SLOW_S and "slow" not in report.keywords:
        _unmarked_slow.append((report.nodeid, report.duration))


def pytest_terminal_summary(terminalreporter):
    if _unmarked_slow:
        terminalreporter.section(f"tests over {SLOW_S:.0f} s without the `slow` marker (mark them)")
        for nodeid, seconds in sorted(_unmarked_slow, key=lambda item: -item[1]):
            terminalreporter.write_line(f"{seconds:6.1f} s  {nodeid}")


def shadow_run(out: Path, *args: str):
    """`shadow run --out OUT ARGS` in this process: (exit code, run dir, summary, events)."""
    import json

    from shadow.cli import main
    from shadow.rundir import read_events

    code = main(["run", "--out", str(out), *args])
    return code, out, json.loads((out / "summary.json").read_text()), read_events(out)


def kinds_of(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["event"] == kind]
