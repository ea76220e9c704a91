"""Training on a CUDA GPU: telemetry, the FP8 backends, and replay exactness there.

CI has no GPU, so these skip there with the reason; run them where one is present:
`python -m pytest tests/gpu`. A GPU's numerics differ from the CPU's emulation, so these are the
checks that the trainer's GPU path is sound, not copies of the CPU tests.
"""

import math

import pytest
import torch

from shadow.config import load_job
from shadow.trainer import Trainer

from conftest import REPO

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")]

TINY = ["resources.device=cuda", "telemetry.every_steps=1", "steps=40"]


def tiny(*overrides: str):
    return load_job(str(REPO / "jobs/tiny.yaml"), [*TINY, *overrides])


def _losses(trainer: Trainer, num_steps: int) -> list[float]:
    return [trainer.train_step().loss for _ in range(num_steps)]


def _main_and_replay(job, before: int, after: int) -> tuple[list[float], list[float]]:
    """The main trainer's losses for `after` steps past a snapshot at step `before`, and a replay's from it."""
    main = Trainer(job)
    _losses(main, before)
    snapshot = main.snapshot()
    main_losses = _losses(main, after)
    replay = Trainer(job)
    replay.restore(snapshot)
    return main_losses, _losses(replay, after)


@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_telemetry_is_recorded_on_the_gpu(mode):
    """Every telemetry counter lives on the activations' device (a CPU counter beside a CUDA sum fails)."""
    trainer = Trainer(tiny(f"precision.mode={mode}", "precision.backend=emulated"))
    record = trainer.train_step()
    assert math.isfinite(record.loss) and trainer.device.type == "cuda"
    assert record.telemetry["act/amax_max"] > 0 and math.isfinite(record.telemetry["act/kurtosis_max"])
    if mode == "fp8":
        assert 0 <= record.telemetry["fp8/saturation_max"] <= 1


def test_torchao_runs_real_fp8_gemms_and_changes_the_numerics():
    pytest.importorskip("torchao", reason="torchao is not installed (pip install 'shadow[torchao]')")
    fp8 = Trainer(tiny("precision.mode=fp8", "precision.backend=torchao", "precision.scaling=current"))
    bf16 = Trainer(tiny("precision.mode=bf16", "precision.backend=torchao", "precision.scaling=current"))
    assert fp8.backend.emulate is (torch.cuda.get_device_capability() < (8, 9))
    fp8_losses, bf16_losses = _losses(fp8, 5), _losses(bf16, 5)
    assert all(math.isfinite(x) for x in fp8_losses + bf16_losses)
    assert fp8_losses[0] != bf16_losses[0]  # same weights and batch: only the GEMM numerics differ
    assert abs(fp8_losses[0] - bf16_losses[0]) / bf16_losses[0] < 0.05  # but not by much


@pytest.mark.parametrize("backend", ["emulated", "torchao"])
def test_a_replay_from_a_snapshot_retrains_the_same_losses(backend):
    """The invariant on the GPU: restore at step 4, re-train 6 steps; the losses equal the main
    trainer's bit for bit (one rank, deterministic kernels: nothing may differ)."""
    if backend == "torchao":
        pytest.importorskip("torchao", reason="torchao is not installed")
    job = tiny("precision.mode=fp8", f"precision.backend={backend}", "precision.scaling=current")
    main_losses, replay_losses = _main_and_replay(job, 4, 6)
    assert all(math.isfinite(x) for x in main_losses)
    assert replay_losses == main_losses, (
        f"{backend}: replay {replay_losses} != main {main_losses}: the GPU replay is not bit-exact")


def test_the_te_backend_names_its_absence():
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        with pytest.raises(Exception, match=r"shadow\[te\]"):
            Trainer(tiny("precision.mode=fp8", "precision.backend=te"))
    else:
        trainer = Trainer(tiny("precision.mode=fp8", "precision.backend=te", "precision.scaling=delayed"))
        assert all(math.isfinite(x) for x in _losses(trainer, 3))


def test_a_compiled_trainer_trains_and_replays_exactly():
    """`resources.compile`: the fused forward trains, and a compiled replay matches a compiled main job."""
    pytest.importorskip("torchao", reason="torchao is not installed")
    job = tiny("precision.mode=fp8", "precision.backend=torchao", "precision.scaling=current",
               "resources.compile=true", "telemetry.every_steps=0")
    expected, replayed = _main_and_replay(job, 3, 3)
    assert replayed == expected and all(math.isfinite(x) for x in expected)
