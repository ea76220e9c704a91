"""FSDP2 training and sharded checkpoints through the CLI: `shadow train` on 2 local rank processes, replays
of its checkpoints on 2 and 1 ranks, the world sizes at which losses must be equal bit for bit, and a
rank killed in the middle of an asynchronous save.

Everything runs in real subprocesses (`python -m shadow`), as a user runs it: each rank is a process of
its own, joined over gloo.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from checkpoint_damage import set_first_value
from conftest import FAST, REPO

from shadow.checkpoint import open_store

pytestmark = pytest.mark.slow

STEPS = 6
JOB = ["--job", str(REPO / "jobs/tiny.yaml"), *FAST, "--set", f"steps={STEPS}", "--set", "checkpoint.every_steps=3",
       "--set", "model.dropout=0.1"]  # dropout on: its masks must not depend on the rank count either


def shadow(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shadow", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "trajectory.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """`shadow train` of the tiny job (FP8, delayed scaling) on 2 ranks x 1 micro-batch."""
    out = tmp_path_factory.mktemp("fsdp") / "main"
    done = shadow("train", *JOB, "--set", "resources.num_ranks=2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_two_ranks_write_their_own_shards(two_rank_run):
    store = open_store(str(two_rank_run / "checkpoints"), "main")
    assert store.list_committed() == [0, 3, 6]
    checkpoint = store.open(3)
    assert checkpoint.meta["num_micro_batches"] == 2
    files = {chunk.file for stored in checkpoint.index.values() for chunk in stored.chunks}
    assert files == {"rank-00000.bin", "rank-00001.bin"}
    weight = checkpoint.index["model.blocks.0.attn.wqkv.weight"]
    assert [(c.file, c.offsets, c.sizes) for c in weight.chunks] == [
        ("rank-00000.bin", (0, 0), (96, 64)), ("rank-00001.bin", (96, 0), (96, 64))]  # dim-0 shards
    moment = checkpoint.index["optim.blocks.0.attn.wqkv.weight.exp_avg"]
    assert sorted(c.file for c in moment.chunks) == ["rank-00000.bin", "rank-00001.bin"]


def test_one_rank_trains_the_same_losses(two_rank_run, tmp_path):
    """1 rank x 2 micro-batches adds the same two gradients as 2 ranks x 1: FSDP2's reduce-scatter sums
    (not averages), the clipping norm is computed independently of sharding, and FP8 amax is max-reduced."""
    out = tmp_path / "one"
    done = shadow("train", *JOB, "--set", "resources.grad_accum=2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert losses(out) == losses(two_rank_run)


@pytest.mark.parametrize("num_ranks", [2, 1])
def test_replay_from_a_mid_checkpoint_is_exact(two_rank_run, tmp_path, num_ranks):
    out = tmp_path / f"replay{num_ranks}"
    checkpoint = two_rank_run / "checkpoints" / "main" / "step-000000003"
    done = shadow("replay", *JOB, "--set", f"resources.num_ranks={num_ranks}", "--checkpoint", str(checkpoint),
                  "--steps", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "summary.json").read_text())["num_ranks"] == num_ranks
    assert losses(out) == losses(two_rank_run)[3:]


def test_replay_on_ranks_that_cannot_share_the_micro_batches_is_refused(two_rank_run, tmp_path):
    checkpoint = two_rank_run / "checkpoints" / "main" / "step-000000003"
    done = shadow("replay", *JOB, "--set", "resources.num_ranks=4", "--checkpoint", str(checkpoint), "--steps", "3",
                  "--out", str(tmp_path / "r4"))
    assert done.returncode == 2
    assert "resources.num_ranks=4 cannot share the checkpoint's 2 micro-batches" in done.stderr


def test_a_refusal_found_by_one_rank_stops_every_rank_with_its_one_line_error(two_rank_run, tmp_path):
    """NaN in rank 0's shard of a weight: in a 2-rank replay only rank 0 reads that chunk (rank 1 reads the
    other rows, from rank-00001.bin), DCP hands the error to every rank of the load, and all of them stop
    with the same exit code (no rank left waiting in a collective)."""
    checkpoint = tmp_path / "ckpt" / "main" / "step-000000003"
    shutil.copytree(two_rank_run / "checkpoints" / "main" / "step-000000003", checkpoint)
    set_first_value(checkpoint, "model.blocks.0.attn.wqkv.weight", float("nan"))  # row 0: rank-00000.bin
    done = shadow("replay", *JOB, "--set", "resources.num_ranks=2", "--checkpoint", str(checkpoint), "--steps", "3",
                  "--out", str(tmp_path / "refused"))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("cannot replay:")]  # rank 0's only
    assert line.startswith(f"cannot replay: {checkpoint}/rank-00000.bin: tensor 'model.blocks.0.attn.wqkv.weight': "
                           "1 NaN and 0 Inf")
    assert line.endswith("(--allow-nonfinite replays it anyway)")


# A rank process killed while it writes its shard of the step-6 checkpoint (after its first 4 KiB), through a
# sitecustomize that every rank process imports: the kill is real (os._exit), the code under test unchanged.
KILL_DURING_SAVE = """
import os
from shadow.checkpoint import local

_open_writer = local.LocalStore._open_writer

def _dying_writer(self, path):
    context = _open_writer(self, path)
    if not path.endswith("step-000000006/rank-00001.bin"):
        return context

    class Dying:
        def __enter__(self):
            self.out = context.__enter__()
            self.written = 0
            return self

        def write(self, data):
            self.out.write(data)
            self.written += len(data)
            if self.written > 4096:
                self.out.flush()
                os._exit(9)

        def __exit__(self, *exc):
            return context.__exit__(*exc)

    return Dying()

local.LocalStore._open_writer = _dying_writer
"""


def test_rank_killed_during_an_async_save_leaves_the_previous_checkpoint_latest(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_DURING_SAVE)
    out = tmp_path / "main"
    done = shadow("train", *JOB, "--set", "resources.num_ranks=2", "--out", str(out),
                  env={"PYTHONPATH": f"{hook}{os.pathsep}{REPO}"})
    assert done.returncode == 1
    assert "rank 1 of 2 died (exit code 9)" in done.stderr
    step_dir = out / "checkpoints" / "main" / "step-000000006"
    assert not (step_dir / "MANIFEST.json").exists()
    store = open_store(str(out / "checkpoints"), "main")
    assert store.latest_committed() == 3
    replay = shadow("replay", *JOB, "--checkpoint", str(out / "checkpoints" / "main" / "step-000000003"),
                    "--steps", "3", "--out", str(tmp_path / "replay"))
    assert replay.returncode == 0, replay.stderr
    assert losses(tmp_path / "replay") == losses(out)[3:]
