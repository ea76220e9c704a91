"""Smooth-SwiGLU: the same function (BF16 bit for bit, gradients too); under FP8 no channel outlier
reaches w_down's input quantizer."""

import pytest
import torch

from shadow.config import load_job
from shadow.model_factory import next_token_loss
from shadow.precision import build_backend
from shadow.precision.convert import prepare_model
from shadow.precision.emulated import power_of_two_channel_amax
from shadow.telemetry import TelemetryCollector

CPU = torch.device("cpu")
SMALL = ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.seq_len=16"]


def _model(smooth: bool, mode: str, scaling: str = "current"):
    job = load_job(None, SMALL + [f"model.smooth_swiglu={str(smooth).lower()}", f"precision.mode={mode}",
                                  f"precision.scaling={scaling}"])
    backend = build_backend(job.precision, CPU)
    prepared = prepare_model(job, backend)
    with torch.no_grad():  # an outlier channel in each SwiGLU output, as late in long trainings
        for block in prepared.model.blocks:
            block.ffn.w_up.weight[3] *= 300.0
    return prepared, backend


def _loss_and_grads(model):
    idx = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    loss = next_token_loss(model, idx[:, :-1], idx[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_power_of_two_scale_is_exact_and_above_each_channel_amax():
    x = torch.tensor([[0.3, -5.0, 0.0, 1.0], [0.1, 2.0, 0.0, -1.0]])
    scale = power_of_two_channel_amax(x)
    assert scale.tolist() == [0.5, 8.0, 1.0, 2.0]
    assert torch.equal((x / scale) * scale, x)


@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_bf16_is_bit_identical_and_fp8_changes(mode):
    plain_loss, plain_grads = _loss_and_grads(_model(False, mode)[0].model)
    smooth_loss, smooth_grads = _loss_and_grads(_model(True, mode)[0].model)
    same = torch.equal(plain_loss, smooth_loss) and all(
        torch.equal(plain_grads[n], smooth_grads[n]) for n in plain_grads)
    assert same == (mode == "bf16")
    if mode == "fp8":
        assert torch.allclose(plain_loss, smooth_loss, rtol=0.02)


def test_fp8_w_down_input_has_no_outlier_channel():
    """The quantizer of w_down's input sees channels whose amax all lie in [0.5, 1): the per-tensor scale
    is no longer set by one channel, so the small channels keep their precision."""
    stats = {}
    for smooth in (False, True):
        prepared, backend = _model(smooth, "fp8", "delayed")  # delayed scaling reports the operand amax
        collector = TelemetryCollector(prepared.model, backend, prepared.structure)
        with collector.recording():
            _loss_and_grads(prepared.model)
        backend.end_step(prepared.model)
        stats[smooth] = collector.finish()
    key = "fp8/blocks.0.ffn.w_down/input/amax"
    assert 0.5 <= stats[True][key] < 1.0 < stats[False][key]
    # the SwiGLU output itself (the function) is the same
    assert stats[True]["swiglu/blocks.0/amax"] == pytest.approx(stats[False]["swiglu/blocks.0/amax"], rel=0.02)
