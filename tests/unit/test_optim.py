"""The optimizer: FP8 moments are torch's AdamW with rounded storage; they cost a quarter of the memory."""

import copy

import torch

from shadow.config import load_job
from shadow.optim import ScaledMomentAdamW, build_optimizer, optimizer_state_bytes
from shadow.precision.formats import E4M3, E5M2


def _params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(16, 8, generator=generator)),
            torch.nn.Parameter(torch.randn(8, generator=generator))]


def _steps(optimizer, params, num_steps=6):
    generator = torch.Generator().manual_seed(1)
    for _ in range(num_steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * 1e-2
        optimizer.step()


def _groups(params):
    return [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]


def test_unrounded_storage_is_torch_adamw_bit_for_bit():
    ours, theirs = _params(), _params()
    _steps(ScaledMomentAdamW(_groups(ours), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, formats=(None, None)), ours)
    _steps(torch.optim.AdamW(_groups(theirs), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False), theirs)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_fp8_moments_round_the_state_and_stay_close_to_fp32():
    fp8, fp32 = _params(), _params()
    fp8_opt = ScaledMomentAdamW(_groups(fp8), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, formats=(E4M3, E5M2))
    fp32_opt = torch.optim.AdamW(_groups(fp32), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    _steps(fp8_opt, fp8)
    _steps(fp32_opt, fp32)
    assert not torch.equal(fp8[0], fp32[0])  # the rounding shows
    assert torch.allclose(fp8[0], fp32[0], atol=0.01, rtol=0)  # 6 steps of lr 1e-2 move weights by ~0.06
    state, reference = fp8_opt.state[fp8[0]], fp32_opt.state[fp32[0]]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_sq"].dtype == torch.uint8
    m = state["exp_avg"].view(torch.float8_e4m3fn).float() / state["exp_avg_scale"]
    v = state["exp_avg_sq"].view(torch.float8_e5m2).float() / state["exp_avg_sq_scale"]
    assert torch.allclose(m, reference["exp_avg"], rtol=0.15, atol=1e-4)  # E4M3: 3 mantissa bits
    assert torch.allclose(v, reference["exp_avg_sq"], rtol=0.3, atol=1e-7)  # E5M2: 2 mantissa bits
    assert state["exp_avg_scale"] == 2.0 ** torch.log2(state["exp_avg_scale"]).round()  # powers of two


def test_state_round_trip_is_exact_and_memory_is_a_quarter():
    params = _params()
    job = load_job(None, ["optim.moments=fp8"])
    module = torch.nn.ParameterList(params)
    optimizer = build_optimizer(job.optim, module)
    _steps(optimizer, params, 3)
    saved = copy.deepcopy(optimizer.state_dict())
    restored_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = build_optimizer(job.optim, torch.nn.ParameterList(restored_params))
    restored.load_state_dict(saved)
    for a, b in zip(params, restored_params):
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale", "step"):
            assert torch.equal(optimizer.state[a][key], restored.state[b][key])
            assert optimizer.state[a][key].dtype == restored.state[b][key].dtype
    _steps(optimizer, params, 2)
    _steps(restored, restored_params, 2)
    assert all(torch.equal(a, b) for a, b in zip(params, restored_params))

    fp32 = build_optimizer(load_job(None).optim, torch.nn.ParameterList(_params()))
    _steps(fp32, fp32.param_groups[0]["params"] + fp32.param_groups[1]["params"], 1)
    num_params = sum(p.numel() for p in params)
    assert optimizer_state_bytes(fp32) == 8 * num_params + 4 * len(params)  # two fp32 moments and a step
    assert optimizer_state_bytes(optimizer) == 2 * num_params + 12 * len(params)  # two bytes, two scales, a step


def test_tiny_and_zero_moments_are_stored_finite_and_zeros_stay_zero():
    # a second moment decays by beta2 each step: after ~1,000 steps of (near) zero gradients its amax
    # is below 1e-34, where a float32 fp8_max / amax overflows to inf
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = ScaledMomentAdamW([param], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, formats=(E4M3, E5M2))
    for tiny in (1e-38, 1e-36, 1e-34, 0.0):
        moment = torch.tensor([tiny, tiny / 2, 0.0, -tiny])
        optimizer.set_state(param, step=torch.tensor(1000.0), exp_avg=moment, exp_avg_sq=moment.abs())
        state = optimizer.state[param]
        m = state["exp_avg"].view(torch.float8_e4m3fn).float() / state["exp_avg_scale"]
        v = state["exp_avg_sq"].view(torch.float8_e5m2).float() / state["exp_avg_sq_scale"]
        assert torch.allclose(m, moment, rtol=0.15, atol=0) and torch.allclose(v, moment.abs(), rtol=0.3, atol=0)
        assert m[2] == 0 and v[2] == 0
        param.grad = torch.zeros(4)
        optimizer.step()
        assert torch.isfinite(param).all()
