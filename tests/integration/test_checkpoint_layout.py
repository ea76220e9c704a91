"""The layout checkpoints are checked against is the one real training writes.

For each model, optimizer and backend variant, checkpoints before the first step (no optimizer state
yet) and after a few steps pass the strict checks, and the layout built without training (on the meta
device, as `shadow run --resume` builds it) equals the trainer's own.
"""

import pytest
import torch
from checkpoint_damage import DATA, set_first_value
from conftest import FAST, REPO

from shadow.checkpoint import NonFiniteCheckpoint, open_store
from shadow.config import load_job
from shadow.layout import expected_layout
from shadow.trainer import Trainer

VARIANTS = {
    "emulated": [],
    "fp8_moments": ["optim.moments=fp8"],
    "torchao": ["precision.backend=torchao", "precision.scaling=current"],
    "smooth_swiglu": ["model.smooth_swiglu=true"],
}


def _trained(tmp_path, overrides):
    job = load_job(str(REPO / "jobs/tiny.yaml"), FAST[1::2] + overrides)
    trainer = Trainer(job)
    store = open_store(str(tmp_path), "run")
    store.save(trainer.snapshot())  # step 0: no optimizer state yet
    for _ in range(2):
        trainer.train_step()
    store.save(trainer.snapshot())
    return job, trainer, store


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_real_checkpoints_fit_the_layout_built_without_training(tmp_path, variant):
    job, trainer, store = _trained(tmp_path, VARIANTS[variant])
    assert expected_layout(job) == trainer.checkpoint_layout
    for step in (0, 2):
        store.verify(step, trainer.job_hash, layout=expected_layout(job))
        restored = Trainer(job)
        restored.restore(store.load(step, trainer.job_hash, layout=restored.checkpoint_layout))
        assert restored.step == step
        # the trainer's own way in (torch.distributed.checkpoint, into its tensors): every tensor as saved
        loaded = Trainer(job)
        loaded.load_checkpoint(store.open(step, trainer.job_hash, layout=loaded.checkpoint_layout))
        saved, state = store.load(step).tensors, loaded.checkpoint_state()
        assert loaded.step == step and set(state) == set(saved)
        assert all(torch.equal(state[name], value) for name, value in saved.items())


def test_fp8_moments_holding_a_nan_pattern_are_non_finite(tmp_path):
    """FP8 moments are stored as uint8 bit patterns: finiteness is read through the FP8 dtype."""
    job, trainer, store = _trained(tmp_path, VARIANTS["fp8_moments"])
    moments = store.load(2).tensors["optim.norm.weight.exp_avg"]
    assert moments.dtype == torch.uint8 and bool(moments[0] != 0x7F)
    set_first_value(tmp_path / "run" / "step-000000002", "optim.norm.weight.exp_avg", 0x7F)  # NaN in E4M3
    moments[0] = 0x7F  # (e4m3fn has no Inf)
    fresh = open_store(str(tmp_path), "run")
    with pytest.raises(NonFiniteCheckpoint, match=f"{fresh.step_uri(2)}/{DATA}: tensor "
                       r"'optim.norm.weight.exp_avg': 1 NaN and 0 Inf among 64 values; expected finite values"):
        fresh.load(2, trainer.job_hash, layout=trainer.checkpoint_layout)
    assert fresh.load(2, trainer.job_hash, layout=trainer.checkpoint_layout, allow_nonfinite=True).step == 2
    assert torch.equal(fresh.load(2).tensors["optim.norm.weight.exp_avg"], moments)
