"""The core invariant: a replay from a checkpoint reproduces the main job's losses bit for bit.

Runs the real `shadow train` / `shadow replay` commands on a small job, then shows the test has teeth:
dropping any one piece of state from the checkpoint breaks exactness.
"""

import pytest
import torch

from shadow.checkpoint import locate_checkpoint
from shadow.cli import main
from shadow.config import load_job
from shadow.loop import LoopSettings, run_steps
from shadow.rundir import read_trajectory
from shadow.trainer import Trainer


def _losses(run_dir):
    return {r.step: r.loss for r in read_trajectory(run_dir)}


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_replay_reproduces_main_losses_bit_for_bit(tmp_path, small_job_file, precision):
    main_dir = tmp_path / "main"
    assert main(["train", "--job", str(small_job_file), "--precision", precision, "--out", str(main_dir)]) == 0
    main_losses = _losses(main_dir)
    assert sorted(main_losses) == list(range(24))
    for start in (8, 16):
        replay_dir = tmp_path / f"replay{start}"
        checkpoint = main_dir / "checkpoints" / "main" / f"step-{start:09d}"
        code = main(["replay", "--job", str(small_job_file), "--checkpoint", str(checkpoint), "--steps", "8",
                     "--precision", precision, "--out", str(replay_dir)])
        assert code == 0
        replay_losses = _losses(replay_dir)
        assert sorted(replay_losses) == list(range(start, start + 8))
        mismatched = [s for s in replay_losses if replay_losses[s] != main_losses[s]]
        assert not mismatched, f"replay from {start} differs at steps {mismatched}"


def _replay_with(snapshot, job, num_steps=6):
    trainer = Trainer(job)
    trainer.restore(snapshot)
    return [r.loss for r in run_steps(trainer, LoopSettings(until_step=snapshot.step + num_steps)).records]


def _drop_weights(snapshot, _):
    name = next(k for k in snapshot.tensors if k.startswith("model.") and k.endswith("wqkv.weight"))
    snapshot.tensors[name] = snapshot.tensors[name] * (1 + 2**-10)


def _drop_optimizer_moments(snapshot, _):
    for key in [k for k in snapshot.tensors if k.endswith(".exp_avg_sq")]:
        snapshot.tensors[key] = torch.zeros_like(snapshot.tensors[key])


def _drop_optimizer_step_count(snapshot, _):
    for key in [k for k in snapshot.tensors if k.startswith("optim.") and k.endswith(".step")]:
        snapshot.tensors[key] = torch.ones_like(snapshot.tensors[key])


def _drop_fp8_scaling_state(snapshot, fresh):
    for key in [k for k in snapshot.tensors if k.endswith(("amax_history", ".scale"))]:
        snapshot.tensors[key] = fresh.tensors[key].clone()


def _drop_step_position(snapshot, _):
    snapshot.step -= 1  # LR schedule and batch index are taken from the step
    snapshot.meta["step"] -= 1


@pytest.mark.parametrize(
    "drop",
    [_drop_weights, _drop_optimizer_moments, _drop_optimizer_step_count, _drop_fp8_scaling_state, _drop_step_position],
    ids=["weights", "adam_moments", "adam_step_count", "fp8_scaling_state", "step_position"],
)
def test_leaving_any_state_out_breaks_exactness(tmp_path, small_job_file, drop):
    """Teeth for the test above: each piece of state matters, so the checkpoint must carry all of them."""
    job = load_job(str(small_job_file))
    assert main(["train", "--job", str(small_job_file), "--out", str(tmp_path / "main")]) == 0
    store, _ = locate_checkpoint(str(tmp_path / "main" / "checkpoints" / "main" / "step-000000008"))
    exact = _replay_with(store.load(8), job)
    assert exact == [r.loss for r in read_trajectory(tmp_path / "main")][8:14]
    damaged = store.load(8)
    drop(damaged, Trainer(job).snapshot())
    if damaged.step != 8:
        assert _replay_with(damaged, job)[1:] != exact[:-1]
    else:
        assert _replay_with(damaged, job) != exact


def test_with_dropout_a_replay_needs_the_checkpointed_rng_state(tmp_path, small_job_file):
    """`model.dropout` draws its masks from the trainer's random stream (`rng.trainer`): a replay that
    restores it is exact; the same checkpoint with the stream reseeded (its RNG state left out) trains on
    other masks, so every loss of the window differs."""
    job = load_job(str(small_job_file), ["model.dropout=0.1"])
    assert main(["train", "--job", str(small_job_file), "--set", "model.dropout=0.1",
                 "--out", str(tmp_path / "main")]) == 0
    store, _ = locate_checkpoint(str(tmp_path / "main" / "checkpoints" / "main" / "step-000000008"))
    expected = [r.loss for r in read_trajectory(tmp_path / "main")][8:14]
    assert _replay_with(store.load(8), job) == expected
    reseeded = store.load(8)
    reseeded.tensors["rng.trainer"] = torch.Generator().manual_seed(job.seed + 1).get_state()
    assert all(a != b for a, b in zip(_replay_with(reseeded, job), expected))


def test_replay_refuses_checkpoint_of_another_job(tmp_path, small_job_file, capsys):
    assert main(["train", "--job", str(small_job_file), "--steps", "8", "--out", str(tmp_path / "main")]) == 0
    checkpoint = tmp_path / "main" / "checkpoints" / "main" / "step-000000008"
    code = main(["replay", "--job", str(small_job_file), "--set", "optim.lr=1e-2", "--checkpoint", str(checkpoint),
                 "--steps", "2", "--out", str(tmp_path / "r")])
    assert code == 2
    assert "step-000000008/MANIFEST.json: written by job" in capsys.readouterr().err


def test_console_entry_point_trains_and_reports(tmp_path, small_job_file):
    import subprocess
    import sys

    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "shadow", "train", "--job", str(small_job_file), "--steps", "3",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "final step 3" in proc.stdout
    assert [r.step for r in read_trajectory(out)] == [0, 1, 2]
