"""Scaling behaviour of the emulated backend, BF16 emulation vs real bf16, and backend selection."""

import pytest
import torch

from shadow.config.job import Fp8Backend, Operand, PrecisionConfig
from shadow.config import load_job
from shadow.precision import BackendUnavailable, build_backend
from shadow.precision.base import bf16_linear
from shadow.precision.emulated import ROLE_GRAD_OUTPUT, ROLE_INPUT, ROLE_WEIGHT
from shadow.precision.formats import E4M3, E5M2

CPU = torch.device("cpu")


def _layer(**precision):
    config = load_job(None, [f"precision.{k}={v}" for k, v in precision.items()]).precision
    backend = build_backend(config, CPU)
    layer = backend.fp8_linear(torch.nn.Linear(8, 4, bias=False))
    torch.nn.init.normal_(layer.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    return backend, layer


def _run_step(backend, layer, x):
    layer(x.requires_grad_(True)).sum().backward()
    backend.end_step(layer)


def test_delayed_scaling_uses_previous_amax_and_keeps_history():
    backend, layer = _layer(scaling="delayed", amax_history_len=3)
    assert torch.equal(layer.scale, torch.ones(3))  # no history yet: scale 1, as in TE
    x1 = torch.full((2, 8), 2.0)
    _run_step(backend, layer, x1)
    assert layer.amax_history[ROLE_INPUT, 0] == 2.0
    assert layer.scale[ROLE_INPUT] == pytest.approx(E4M3.max_value / 2.0)
    assert layer.scale[ROLE_WEIGHT] == pytest.approx(E4M3.max_value / layer.weight.abs().max().item())
    assert layer.scale[ROLE_GRAD_OUTPUT] == pytest.approx(E5M2.max_value / 1.0)  # d(sum)/dy = 1
    _run_step(backend, layer, torch.full((2, 8), 0.5))
    # max over the history: the earlier, larger amax still sets the scale
    assert layer.amax_history[ROLE_INPUT, :2].tolist() == [0.5, 2.0]
    assert layer.scale[ROLE_INPUT] == pytest.approx(E4M3.max_value / 2.0)
    for _ in range(2):
        _run_step(backend, layer, torch.full((2, 8), 0.5))
    assert layer.scale[ROLE_INPUT] == pytest.approx(E4M3.max_value / 0.5)  # 2.0 rolled out of 3 steps


def test_most_recent_amax_compute():
    backend, layer = _layer(scaling="delayed", amax_compute="most_recent")
    _run_step(backend, layer, torch.full((2, 8), 2.0))
    _run_step(backend, layer, torch.full((2, 8), 0.25))
    assert layer.scale[ROLE_INPUT] == pytest.approx(E4M3.max_value / 0.25)


def test_margin_divides_scale_by_power_of_two():
    backend, layer = _layer(scaling="delayed", margin=2)
    _run_step(backend, layer, torch.full((2, 8), 2.0))
    assert layer.scale[ROLE_INPUT] == pytest.approx(E4M3.max_value / 2.0 / 4)


def test_scaling_none_underflows_small_values_and_current_scaling_keeps_them():
    x = torch.full((1, 8), 1e-5)
    _, unscaled = _layer(scaling="none")
    _, current = _layer(scaling="current")
    assert torch.equal(unscaled.quantize(x, ROLE_INPUT, E4M3), torch.zeros_like(x))  # below e4m3's 2**-9
    assert torch.allclose(current.quantize(x, ROLE_INPUT, E4M3), x, rtol=1e-6)  # amax maps to 448 exactly


def test_current_scaling_error_is_relative_to_tensor_range():
    torch.manual_seed(0)
    x = torch.randn(64, 8) * 1e-3
    _, current = _layer(scaling="current")
    q = current.quantize(x, ROLE_INPUT, E4M3)
    assert (q - x).abs().max() <= x.abs().max() * 2**-4  # e4m3 keeps ~3 mantissa bits of the range


def test_calibration_in_bf16_mode_and_eval_does_not_record():
    backend, layer = _layer(scaling="delayed", mode="bf16")
    _run_step(backend, layer, torch.full((2, 8), 3.0))
    assert layer.amax_history[ROLE_INPUT, 0] == 3.0  # amax recorded while in BF16 (calibrating)
    assert layer.amax_history[ROLE_GRAD_OUTPUT, 0] == 1.0
    with backend.not_recording():
        layer(torch.full((2, 8), 100.0))
    assert layer.step_amax[ROLE_INPUT] == 0.0


def test_fault_injection_multiplies_scales_only_inside_window():
    backend, layer = _layer(scaling="current", **{"fault.start_step": 5, "fault.end_step": 7, "fault.scale_factor": 1e4})
    x = torch.randn(4, 8)
    backend.begin_step(4)
    clean = layer.quantize(x, ROLE_INPUT, E4M3)
    backend.begin_step(5)
    faulty = layer.quantize(x, ROLE_INPUT, E4M3)
    backend.begin_step(7)
    after = layer.quantize(x, ROLE_INPUT, E4M3)
    assert torch.equal(clean, after)
    assert faulty.abs().max() < x.abs().max() / 100  # everything saturates to 448 / (scale * 1e4)



def _fault(**fields):
    return load_job(None, [f"precision.fault.{k}={v}" for k, v in fields.items()]).precision.fault


def test_fault_ramp_grows_geometrically_and_ends_at_full_strength_inside_the_fault():
    fault = _fault(start_step=10, end_step=16, scale_factor=16.0, ramp_steps=4)
    # steps 8..17: before, the ramp 16**(1/4), 16**(2/4), 16**(3/4), 16, then full strength, then after the end
    assert [fault.factor(step, Operand.INPUT) for step in range(8, 18)] == [1, 1, 2, 4, 8, 16, 16, 16, 1, 1]
    assert _fault(start_step=3, end_step=9, scale_factor=1000.0, ramp_steps=3).factor(5, Operand.WEIGHT) == 1000.0
    unramped = _fault(start_step=10, end_step=16, scale_factor=16.0)
    assert [unramped.factor(step, Operand.GRAD_OUTPUT) for step in (9, 10, 15, 16)] == [1, 16, 16, 1]


def test_fault_hits_only_its_roles():
    fault = _fault(start_step=0, end_step=5, scale_factor=0.5, roles="[grad_output]")
    assert [fault.factor(2, role) for role in Operand] == [1, 1, 0.5]
    backend, layer = _layer(scaling="current", **{"fault.start_step": 0, "fault.end_step": 5,
                                                 "fault.scale_factor": 1e4, "fault.roles": "[grad_output]"})
    _, clean = _layer(scaling="current")
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    outputs, input_grads = [], []
    for each in (layer, clean):
        xi = x.clone().requires_grad_(True)
        out = each(xi)
        (out * torch.linspace(-1, 1, 4)).sum().backward()
        outputs.append(out)
        input_grads.append(xi.grad)
    assert torch.equal(outputs[0], outputs[1])  # the forward (E4M3) path is exact
    assert not torch.equal(input_grads[0], input_grads[1])  # the gradient (E5M2) path saturates


def test_bf16_steps_never_see_a_fault():
    backend, layer = _layer(scaling="delayed", mode="bf16", **{"fault.start_step": 0, "fault.end_step": 5,
                                                               "fault.scale_factor": 1e4})
    _, clean = _layer(scaling="delayed", mode="bf16")
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    results = []
    for each in (layer, clean):
        xi = x.clone().requires_grad_(True)
        out = each(xi)
        out.square().sum().backward()
        results.append((out, xi.grad, each.weight.grad))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    torch.manual_seed(1)
    x = torch.randn(16, 8)
    backend, layer = _layer(scaling="current")
    fp8_out = layer(x)
    backend.set_mode("bf16")
    bf16_out = layer(x)
    assert torch.equal(bf16_out, bf16_linear(x, layer.weight))
    assert not torch.equal(fp8_out, bf16_out)
    assert torch.allclose(fp8_out, bf16_out, rtol=0.2, atol=0.1)


def test_bf16_emulation_matches_real_bf16_autocast_on_small_shapes():
    """On CPU the BF16 path is emulated over fp32 GEMMs; real bf16 is affordable at this size."""
    torch.manual_seed(2)
    x = torch.randn(4, 16, 32)
    w = torch.randn(24, 32) * 0.2
    xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ye = bf16_linear(xe, we)
    ye.backward(torch.ones_like(ye))
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yr = torch.nn.functional.linear(xr, wr)
    yr.float().backward(torch.ones_like(ye))
    ulp = 2.0**-7  # one bf16 ulp, relative: accumulation order inside the bf16 kernel may differ by one ulp
    assert yr.dtype == torch.bfloat16
    assert torch.allclose(ye, yr.float(), rtol=ulp, atol=1e-6)
    assert torch.allclose(xe.grad, xr.grad, rtol=ulp, atol=1e-6)
    assert torch.allclose(we.grad, wr.grad, rtol=ulp, atol=1e-6)
    assert (ye == yr.float()).float().mean() > 0.9  # and most outputs are bit-identical


def test_te_backend_refuses_cpu_with_a_message_naming_emulated():
    config = PrecisionConfig(backend=Fp8Backend.TE)
    with pytest.raises(BackendUnavailable, match="emulated"):
        build_backend(config, CPU)


def test_torchao_backend_runs_float8_on_cpu_with_emulation():
    config = load_job(None, ["precision.backend=torchao", "precision.scaling=current"]).precision
    backend = build_backend(config, CPU)
    layer = backend.fp8_linear(torch.nn.Linear(32, 16, bias=False))
    torch.nn.init.normal_(layer.weight, std=0.2)
    x = torch.randn(8, 32)
    fp8_out = layer(x)
    backend.set_mode("bf16")
    assert torch.equal(layer(x), bf16_linear(x, layer.weight))
    assert not torch.equal(fp8_out, layer(x))
    assert backend.emulate
