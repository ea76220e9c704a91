"""What shadow needs to know about any model's structure: its repeated blocks and their SwiGLU MLPs.

Blocks are what FSDP2 shards one at a time, what `bf16_first_layers`/`bf16_last_layers` count, and
where FP8 candidates live (`shadow/precision/selection.py`). They are the modules of class
`model.block_class`, or, when it is not set, the modules of the largest `nn.ModuleList` whose
entries share one class (the built-in `blocks`, a Hugging Face model's `layers`).

A SwiGLU MLP is recognised by its three linear layers, named as in the built-in model (`w_gate`,
`w_up`, `w_down`), LLaMA-family Hugging Face models (`gate_proj`, `up_proj`, `down_proj`) or the
original LLaMA code (`w1`, `w3`, `w2`); the input of its down projection is the SwiGLU output that
telemetry watches. A block without one has no SwiGLU statistics (they are absent, not zero).

Found once, before sharding: FSDP2 replaces each sharded module's class with a subclass of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from shadow.model_errors import ModelError

_GATED_MLP_NAMES = (("w_gate", "w_up", "w_down"), ("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))



@dataclass(frozen=True)
class Block:
    name: str  # module name in the model, e.g. "blocks.0" or "model.layers.0"
    module: nn.Module
    swiglu_down: str | None  # module name of its SwiGLU MLP's down projection (its input is the SwiGLU output)


@dataclass(frozen=True)
class ModelStructure:
    block_class: str
    blocks: tuple[Block, ...]

    @property
    def has_swiglu(self) -> bool:
        return any(block.swiglu_down is not None for block in self.blocks)

    def block_of(self, module_name: str) -> int | None:
        """Index of the block a module (by name) lies in, or None outside every block."""
        for index, block in enumerate(self.blocks):
            if module_name.startswith(block.name + "."):
                return index
        return None

    def describe(self) -> dict:
        return {"block_class": self.block_class, "num_blocks": len(self.blocks), "swiglu_telemetry": self.has_swiglu}


def find_structure(model: nn.Module, block_class: str = "") -> ModelStructure:
    named = _named_blocks(model, block_class)
    blocks = tuple(Block(name, module, _swiglu_down(name, module)) for name, module in named)
    return ModelStructure(type(named[0][1]).__name__, blocks)


def _named_blocks(model: nn.Module, block_class: str) -> list[tuple[str, nn.Module]]:
    if block_class:
        found = [(name, m) for name, m in model.named_modules() if type(m).__name__ == block_class and name]
        # a block nested in another block of its class is part of the outer one
        found = [(n, m) for n, m in found if not any(n.startswith(outer + ".") for outer, _ in found)]
        if not found:
            raise ModelError(f"model.block_class {block_class!r}: the model has no module of that class; "
                                      f"candidates: {', '.join(_repeated_classes(model)) or 'none'}")
        return found
    lists = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) and len({type(child) for child in m}) == 1]
    if not lists:
        raise ModelError(f"cannot find the repeated blocks of {type(model).__name__} (no nn.ModuleList of "
                                  "modules of one class); set model.block_class to the class name of its block")
    name, blocks = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    return [(f"{name}.{index}", child) for index, child in enumerate(blocks)]


def _repeated_classes(model: nn.Module) -> list[str]:
    counts: dict[str, int] = {}
    for module in model.modules():
        counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return sorted(name for name, count in counts.items() if count > 1)


def _swiglu_down(block_name: str, block: nn.Module) -> str | None:
    """By name: the precision backend replaces the linear layers themselves after this runs."""
    for name, module in block.named_modules():
        for gate, up, down in _GATED_MLP_NAMES:
            if all(isinstance(getattr(module, attr, None), nn.Linear) for attr in (gate, up, down)):
                return ".".join(part for part in (block_name, name, down) if part)
    return None
