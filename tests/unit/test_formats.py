"""FP8/ExMy rounding: exact against torch's float8 casts, hand-computed values and properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shadow.precision.formats import E4M3, E5M2, _round_to_grid, ieee_like, parse_format, recipe_for, round_to_bf16


def _all_finite_codes(dtype):
    """Every finite value of a float8 dtype, plus midpoints and near-midpoints between neighbours."""
    codes = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    values = torch.unique(codes[torch.isfinite(codes)])
    mids = (values[1:] + values[:-1]) / 2
    eps = mids.abs() * 1e-6 + 1e-12
    return torch.cat([values, mids, mids + eps, mids - eps])


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_quantize_equals_torch_cast_on_every_code_and_tie(fmt):
    x = _all_finite_codes(fmt.torch_dtype)
    expected = x.to(fmt.torch_dtype).float()
    assert torch.equal(fmt.quantize(x), expected)


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_generic_grid_rounding_matches_torch_cast(fmt):
    """The arithmetic rounding used for other eXmY formats reproduces torch's casts bit for bit."""
    x = torch.cat([_all_finite_codes(fmt.torch_dtype), torch.randn(20000) * fmt.max_value / 8])
    x = x.clamp(-fmt.max_value, fmt.max_value)
    assert torch.equal(_round_to_grid(x, fmt.man_bits, fmt.min_normal_exp), x.to(fmt.torch_dtype).float())


def test_hand_computed_e8m3_round_to_nearest_even():
    fmt = parse_format("e8m3")
    cases = {
        1.0625: 1.0,  # halfway between 1.0 (mantissa 000) and 1.125 (001): ties to even -> 1.0
        1.1875: 1.25,  # halfway between 1.125 (001) and 1.25 (010): ties to even -> 1.25
        1.07: 1.125,  # above the midpoint
        -1.0625: -1.0,
        3.0: 3.0,
        100.0: 96.0,  # 100 = 1.5625 * 64; neighbours 1.5*64=96 and 1.625*64=104: nearest 96
    }
    for value, expected in cases.items():
        assert fmt.quantize(torch.tensor([value])).item() == expected, value
    assert fmt.max_value == (2 - 2**-3) * 2.0**127


def test_hand_computed_e3m2_subnormals_and_saturation():
    fmt = ieee_like(3, 2)  # bias 3: normals from 2**-2, subnormal spacing 2**-4, max 1.75 * 2**3 = 14
    assert fmt.max_value == 14.0 and fmt.min_subnormal == 1 / 16
    cases = {
        1 / 32: 0.0,  # exactly half the smallest subnormal: ties to even -> 0
        1 / 32 + 1e-4: 1 / 16,
        3 / 32: 2 / 16,  # tie between 1/16 (code 01, odd) and 2/16 (code 10, even) -> 2/16
        5 / 32: 2 / 16,  # tie between 2/16 (even) and 3/16 (odd) -> 2/16
        0.3: 0.3125,  # [0.25, 0.5) has spacing 1/16: 0.3 -> 5/16
        13.0: 12.0,  # [8, 16) has spacing 2: tie between 12 (mantissa 10, even) and 14 -> 12
        15.0: 14.0,  # saturates at max
        1e6: 14.0,
        -1e6: -14.0,
    }
    for value, expected in cases.items():
        got = fmt.quantize(torch.tensor([value])).item()
        assert got == expected, (value, got, expected)


def test_nan_and_inf_pass_through():
    for fmt in (E4M3, E5M2, parse_format("e8m3")):
        out = fmt.quantize(torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30]))
        assert math.isnan(out[0]) and out[1] == float("inf") and out[2] == -float("inf")
        assert out[3] == min(fmt.max_value, 1e30) or fmt.name == "e8m3"
    assert parse_format("e8m3").quantize(torch.tensor([1e39 / 3])).item() == parse_format("e8m3").max_value


def test_recipes():
    hybrid = recipe_for("hybrid")
    assert hybrid.forward is E4M3 and hybrid.backward is E5M2
    assert recipe_for("e5m2").forward is E5M2 and recipe_for("e5m2").backward is E5M2
    assert recipe_for("e8m3").forward.man_bits == 3
    with pytest.raises(ValueError, match="e9m2"):
        parse_format("e9m2")


finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@settings(max_examples=300, deadline=None)
@given(st.lists(finite, min_size=2, max_size=40), st.sampled_from(["e4m3", "e5m2", "e8m3", "e6m5", "e3m4"]))
def test_quantize_properties(values, name):
    fmt = parse_format(name)
    x = torch.tensor(values, dtype=torch.float32)
    q = fmt.quantize(x)
    assert torch.equal(fmt.quantize(q), q)  # idempotent: grid values are fixed points
    assert torch.equal(fmt.quantize(-x), -q)  # symmetric
    order = torch.argsort(x)
    assert bool((q[order][1:] >= q[order][:-1]).all())  # monotone
    in_range = x.abs() <= fmt.max_value
    if in_range.any():
        xs, qs = x[in_range], q[in_range]
        exponent = torch.clamp(torch.frexp(xs)[1] - 1, min=fmt.min_normal_exp)
        half_ulp = torch.ldexp(torch.ones_like(xs), exponent - fmt.man_bits - 1)
        assert bool(((qs - xs).abs() <= half_ulp).all())


def test_round_to_bf16_matches_bfloat16_dtype():
    x = torch.randn(10000) * 100
    assert torch.equal(round_to_bf16(x), x.to(torch.bfloat16).float())
    assert not torch.equal(round_to_bf16(x), x)
