"""The collectives' pure parts: the world-size-independent gradient norm and when layouts are exact."""

import math

import pytest
import torch

from shadow.distributed import clip_grad_norm, exact_across_world_sizes


def _params(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.zeros(shape))
        param.grad = torch.randn(shape, generator=generator)
        params.append(param)
    return params


def test_norm_is_the_float64_norm_of_all_gradients_and_clips_to_max_norm():
    params = _params((50, 7), (7,), (3, 4, 5))
    expected = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params))
    grads = [p.grad.clone() for p in params]
    norm = clip_grad_norm(params, max_norm=1.0)
    assert norm == pytest.approx(expected, rel=1e-12)
    coefficient = 1.0 / (norm + 1e-6)
    for param, grad in zip(params, grads):
        assert torch.equal(param.grad, grad * coefficient)
    assert math.sqrt(sum(float(p.grad.double().square().sum()) for p in params)) == pytest.approx(1.0, rel=1e-5)


def test_norm_below_max_leaves_gradients_untouched():
    params = _params((4, 4))
    grad = params[0].grad.clone()
    clip_grad_norm(params, max_norm=1e9)
    assert torch.equal(params[0].grad, grad)


def test_norm_does_not_depend_on_how_rows_are_split():
    """What a dim-0 shard computes for its rows is what the whole tensor computes for them: the exact sum
    (fsum) of per-row float64 sums does not depend on the order the rows are added in."""
    (whole,) = _params((64, 33), seed=3)
    halves = [torch.nn.Parameter(torch.zeros(32, 33)) for _ in range(2)]
    halves[0].grad, halves[1].grad = whole.grad[:32].clone(), whole.grad[32:].clone()
    reversed_rows = torch.nn.Parameter(torch.zeros(64, 33))
    reversed_rows.grad = whole.grad.flip(0).clone()
    norm = clip_grad_norm([whole], float("inf"))
    assert clip_grad_norm(halves, float("inf")) == norm == clip_grad_norm([reversed_rows], float("inf"))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_gradient_gives_a_non_finite_norm_and_no_clipping(bad):
    params = _params((3, 2))
    params[0].grad[1, 1] = bad
    grad = params[0].grad.clone()
    assert not math.isfinite(clip_grad_norm(params, max_norm=1.0))
    assert torch.equal(params[0].grad.isnan(), grad.isnan())


@pytest.mark.parametrize(("micro", "main", "replay", "exact"), [
    (2, 2, 1, True), (4, 2, 2, True), (4, 2, 1, False), (4, 4, 1, False), (8, 8, 8, True), (1, 1, 1, True)])
def test_layouts_that_add_gradients_in_the_same_order(micro, main, replay, exact):
    assert exact_across_world_sizes(micro, main, replay) is exact
