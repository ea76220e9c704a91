"""Telemetry and the FP8 options on the real trainer: reading signals changes no number, the options
are in the job hash, and FP8 moments with Smooth-SwiGLU checkpoint and replay bit for bit."""

import torch

from shadow.checkpoint import open_store
from shadow.config import load_job
from shadow.trainer import Trainer, job_hash

SMALL = ["steps=40", "batch_size=8", "model.num_layers=2", "model.d_model=64", "model.num_heads=2",
         "model.seq_len=64", "optim.warmup_steps=2", "precision.amax_history_len=4"]


def _job(*extra):
    return load_job(None, SMALL + list(extra))


def test_telemetry_changes_no_number_and_reports_every_group():
    with_telemetry, without = Trainer(_job("telemetry.every_steps=2")), Trainer(_job("telemetry.every_steps=0"))
    rows = [with_telemetry.train_step() for _ in range(5)]
    assert [r.loss for r in rows] == [without.train_step().loss for _ in range(5)]
    assert [bool(r.telemetry) for r in rows] == [True, False, True, False, True]
    values = rows[4].telemetry
    assert values["act/blocks.1/kurtosis"] > 1.0 and values["swiglu/blocks.0/crest"] > 1.0
    assert values["swiglu/amax_max"] == max(values[f"swiglu/blocks.{i}/amax"] for i in range(2))
    # delayed scaling: this step's amax is the one that entered the history, the scale the one used
    layer = with_telemetry.model.blocks[0].ffn.w_up
    assert values["fp8/blocks.0.ffn.w_up/input/amax"] == float(layer.amax_history[0, 0])
    assert values["fp8/blocks.0.ffn.w_up/weight/scale"] > 1.0  # the weights' small amax: scaled up
    # step 4 of this small job (amax history of 4 steps while the loss falls fast) clips ~1% of an operand;
    # a scale fault clips more than half (next test), the tiny job's healthy steps 10-90 under 0.05%
    assert 0.0 <= values["fp8/underflow_max"] <= 1.0 and values["fp8/saturation_max"] < 0.05


def test_a_scale_fault_shows_as_saturation():
    trainer = Trainer(_job("telemetry.every_steps=1", "precision.fault.start_step=3", "precision.fault.end_step=5",
                           "precision.fault.scale_factor=1000"))
    saturation = [trainer.train_step().telemetry["fp8/saturation_max"] for _ in range(5)]
    assert max(saturation[:3]) < 0.01 and min(saturation[3:]) > 0.5


def test_job_hash_has_the_numeric_options_but_not_the_telemetry_cadence():
    base = job_hash(_job())
    assert job_hash(_job("telemetry.every_steps=1")) == base
    assert job_hash(_job("model.smooth_swiglu=true")) != base
    assert job_hash(_job("optim.moments=fp8")) != base
    assert job_hash(_job("model.dropout=0.1")) != base
    compiled = _job("resources.compile=true", "telemetry.every_steps=0")
    assert job_hash(compiled) != base  # fused kernels round differently
    assert job_hash(_job("resources.num_ranks=2", "resources.grad_accum=1")) == job_hash(
        _job("resources.num_ranks=1", "resources.grad_accum=2"))


def test_fp8_moments_and_smooth_swiglu_checkpoint_and_replay_bit_for_bit(tmp_path):
    job = _job("optim.moments=fp8", "model.smooth_swiglu=true", "telemetry.every_steps=3")
    main = Trainer(job)
    for _ in range(4):
        main.train_step()
    store = open_store(str(tmp_path), "main")
    store.save(main.snapshot())  # through the on-storage format
    expected = [main.train_step().loss for _ in range(4)]
    replay = Trainer(job)
    replay.load_checkpoint(store.open(4, replay.job_hash, layout=replay.checkpoint_layout))
    assert [replay.train_step().loss for _ in range(4)] == expected
    state = next(iter(replay.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.uint8
