"""The optimizer: torch AdamW, or AdamW with its moments stored in FP8 (`optim.moments: fp8`).

FP8 moments follow Fishman et al. 2024 ("Scaling FP8 training to trillion-token LLMs"): the first
moment is stored in E4M3 (it needs precision), the second in E5M2 (it needs range: squared gradients
span many decades). Each moment of each parameter has its own per-tensor scale (fp8_max / amax, just
in time), so storage costs 2 bytes per parameter instead of torch's 8.

The update itself is torch's single-tensor AdamW, operation for operation, in fp32 over the
dequantized moments; only what is kept between steps is rounded. With `formats=(None, None)` nothing
is rounded and the update equals `torch.optim.AdamW(foreach=False)` bit for bit (a unit test shows
it), so any difference under FP8 storage is the storage's.

The stored moments are uint8 bit patterns (`.view(float8 dtype)` reads them), which every checkpoint
format and device handle. torch's `Optimizer.load_state_dict` casts state to the parameter's dtype (it would
turn the patterns into numbers), so `load_state_dict` puts the saved patterns back: a checkpoint round
trip is bit for bit.
"""

from __future__ import annotations

import torch

from shadow.config.job import Moments, OptimConfig
from shadow.precision.formats import E4M3, E5M2, FPFormat
from shadow.snapshot import TensorSpec


def build_optimizer(config: OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm gains are not decayed)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    hyper = {"lr": config.lr, "betas": (config.beta1, config.beta2), "eps": config.eps}
    if config.moments is Moments.FP8:
        return ScaledMomentAdamW(groups, formats=(E4M3, E5M2), **hyper)
    return torch.optim.AdamW(groups, foreach=False, **hyper)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensors the optimizer keeps between steps (moments, their scales, step counts)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


def state_layout(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, TensorSpec]:
    """The state `optimizer.step()` keeps for `param` once it has updated it, as a checkpoint holds it.

    Stated here, next to the code that creates the state, so a checkpoint can be checked against a job
    without running a step; the checkpoint tests compare it with the state real steps leave.
    """
    shape = tuple(param.shape)
    step = TensorSpec((), torch.float32)  # torch keeps the step count as a float32 scalar tensor
    if not isinstance(optimizer, ScaledMomentAdamW):
        return {"step": step, "exp_avg": TensorSpec(shape, param.dtype), "exp_avg_sq": TensorSpec(shape, param.dtype)}
    specs = {"step": step}
    for key, fmt in zip(("exp_avg", "exp_avg_sq"), optimizer.formats):
        if fmt is None:
            specs[key] = TensorSpec(shape, param.dtype)
        else:
            specs[key] = TensorSpec(shape, torch.uint8, bits_of=fmt.torch_dtype)
            specs[key + "_scale"] = TensorSpec((), torch.float32)
    return specs


class ScaledMomentAdamW(torch.optim.Optimizer):
    """AdamW whose moments are stored rounded to `formats` (first, second), each with a per-tensor scale."""

    def __init__(self, params, *, lr: float, betas: tuple[float, float], eps: float,
                 formats: tuple[FPFormat | None, FPFormat | None]):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.formats = formats

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "closures are not used by the trainer"
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    self._store(state, "exp_avg", torch.zeros_like(param), self.formats[0])
                    self._store(state, "exp_avg_sq", torch.zeros_like(param), self.formats[1])
                exp_avg = self._load(state, "exp_avg", self.formats[0])
                exp_avg_sq = self._load(state, "exp_avg_sq", self.formats[1])
                # torch's _single_tensor_adam (decoupled weight decay), in the same order of operations
                state["step"] += 1
                step = state["step"].item()
                if weight_decay != 0:
                    param.mul_(1 - lr * weight_decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1**step)
                bias_correction2_sqrt = (1 - beta2**step) ** 0.5
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                param.addcdiv_(exp_avg, denom, value=-step_size)
                self._store(state, "exp_avg", exp_avg, self.formats[0])
                self._store(state, "exp_avg_sq", exp_avg_sq, self.formats[1])

    def set_state(self, param: torch.nn.Parameter, *, step: torch.Tensor, exp_avg: torch.Tensor,
                  exp_avg_sq: torch.Tensor) -> None:
        """Continue `param` from AdamW state given in full precision (e.g. torch AdamW's), the moments
        rounded as this optimizer stores them: what a switch to FP8 moments mid-run starts from."""
        state = self.state[param]
        state["step"] = step.clone()
        self._store(state, "exp_avg", exp_avg.clone(), self.formats[0])
        self._store(state, "exp_avg_sq", exp_avg_sq.clone(), self.formats[1])

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loading, then the stored bit patterns put back as saved (torch casts all
        non-step state to the parameter's dtype, which would turn the uint8 patterns into numbers)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for index, param in zip(saved_ids, params):
            saved = state_dict["state"].get(index, {})
            for key, fmt in (("exp_avg", self.formats[0]), ("exp_avg_sq", self.formats[1])):
                if fmt is not None and key in saved:
                    self.state[param][key] = saved[key].to(param.device, copy=True)

    @staticmethod
    def _store(state: dict, key: str, value: torch.Tensor, fmt: FPFormat | None) -> None:
        if fmt is None:
            state[key] = value
            return
        amax = value.abs().amax().double()
        # a power-of-two scale: scaling and unscaling are exact, only the FP8 rounding loses bits. The
        # exponent is found in float64 and capped at 127 (float32's largest power of two): for a tiny
        # amax (a second moment decaying by beta2 for ~1,000 steps) the ratio would overflow float32 to
        # inf, and 0 * inf stores NaN. An all-zero tensor gets the cap too, and stays zero.
        scale = torch.exp2(torch.floor(torch.log2(fmt.max_value / amax)).clamp(max=127)).float()
        state[key] = fmt.quantize(value.float() * scale).to(fmt.torch_dtype).view(torch.uint8)
        state[key + "_scale"] = scale

    @staticmethod
    def _load(state: dict, key: str, fmt: FPFormat | None) -> torch.Tensor:
        if fmt is None:
            return state[key]
        return state[key].view(fmt.torch_dtype).float() / state[key + "_scale"]
