"""Building the job's model: the built-in one, or the user's own through `model.factory`.

A factory is any importable callable, named "package.module:function", that returns an `nn.Module`
when called with `model.kwargs`. Its forward takes token ids (batch, seq) and returns logits
(batch, seq, vocab), or an object with a `.logits` attribute (as Hugging Face models do). shadow
computes the loss itself, in fp32, so every model is trained and compared the same way.

The model must be built from plain `nn.Linear` layers where it wants FP8: the precision backend
swaps them afterwards (`shadow/precision/convert.py`), as torchao does, so the model never calls a
shadow API. Weights are initialised from torch's global generator seeded with the job's seed, so
every rank and every replay builds the same model.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from shadow.config.job import ModelConfig
from shadow.model import Transformer
from shadow.model_errors import ModelError

BUILT_IN = "shadow.model:Transformer"  # how the built-in model is named in messages and events



def factory_name(config: ModelConfig) -> str:
    return config.factory or BUILT_IN


def build_model(config: ModelConfig, seed: int) -> nn.Module:
    """The job's model with its initial weights, on the current default device (meta: shapes only)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if not config.factory:
            return Transformer(config)
        factory = _import_factory(config.factory)
        try:
            model = factory(**config.kwargs)
        except Exception as exc:
            raise ModelError(f"model.factory {config.factory!r} failed with model.kwargs "
                                    f"{config.kwargs!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.factory {config.factory!r} returned a {type(model).__name__}, "
                                "expected a torch.nn.Module")
    return model


def _import_factory(name: str) -> Callable[..., Any]:
    module_name, _, attribute = name.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"model.factory {name!r}: cannot import module {module_name!r} ({exc}); it must "
                                "be importable where shadow runs (installed, or on PYTHONPATH)") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelError(f"model.factory {name!r}: module {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"model.factory {name!r}: {attribute!r} is not callable")
    return target


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, or its `.logits` (Hugging Face)."""
    return output if isinstance(output, torch.Tensor) else output.logits


def next_token_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the model's logits against the targets, in fp32, for any model."""
    logits = logits_of(model(inputs))
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def check_output(model: nn.Module, config: ModelConfig, device: torch.device) -> None:
    """Run one short sequence through the model and refuse anything but (batch, seq, vocab) logits, so
    a model that does not fit shadow fails at start, naming its factory, not at the first step."""
    seq = min(8, config.seq_len)
    name = factory_name(config)
    try:
        output = _probe(model, seq, device)
    except Exception as exc:
        raise ModelError(f"model.factory {name!r}: its model failed on token ids of shape (1, {seq}): "
                         f"{type(exc).__name__}: {exc}") from exc
    _check_logits(output, name, seq, config.vocab_size)


@torch.no_grad()
def check_output_on_meta(model: nn.Module, config: ModelConfig) -> None:
    """`check_output` for a model built on the meta device, before any rank starts. A forward that meta
    tensors cannot run (code that reads values, as Hugging Face's masks do) proves nothing either way
    and is left to the ranks' own check; logits of the wrong shape are refused here."""
    seq = min(8, config.seq_len)
    try:
        output = _probe(model, seq, torch.device("meta"))
    except Exception:
        return
    _check_logits(output, factory_name(config), seq, config.vocab_size)


def _probe(model: nn.Module, seq: int, device: torch.device) -> Any:
    was_training = model.training
    model.eval()
    try:
        return model(torch.zeros(1, seq, dtype=torch.long, device=device))
    finally:
        model.train(was_training)


def _check_logits(output: Any, name: str, seq: int, vocab_size: int) -> None:
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    expected = (1, seq, vocab_size)
    if not isinstance(logits, torch.Tensor):
        raise ModelError(f"model.factory {name!r}: its forward returned a {type(output).__name__}; expected "
                         f"logits of shape {expected} or an object with a .logits tensor")
    if tuple(logits.shape) != expected:
        raise ModelError(f"model.factory {name!r}: its forward returned logits of shape "
                         f"{tuple(logits.shape)} for token ids (1, {seq}); expected {expected} "
                         "(batch, seq, model.vocab_size)")
