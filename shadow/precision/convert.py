"""A job's model, ready for its precision backend: built, its blocks found, its linear layers swapped.

Every caller that needs the job's model goes through `prepare_model`: the trainer (real weights), the
checkpoint layout and the memory plan (on the meta device: shapes only) and the controller's start-up
log of which layers run in FP8. So they all see the same modules under the same names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shadow.architecture import ModelStructure, find_structure
from shadow.config.job import JobConfig
from shadow.model_factory import build_model, check_output_on_meta, factory_name
from shadow.precision.base import PrecisionBackend
from shadow.precision.selection import Fp8Selection, select_fp8_layers


@dataclass(frozen=True)
class PreparedModel:
    model: nn.Module
    structure: ModelStructure  # its blocks and SwiGLU MLPs, found before any swap or sharding
    selection: Fp8Selection  # which linear layers run in FP8


def prepare_model(job: JobConfig, backend: PrecisionBackend) -> PreparedModel:
    """Build the job's model on the current default device and convert its linear layers for `backend`."""
    model = build_model(job.model, job.seed)
    structure = find_structure(model, job.model.block_class)
    selection = select_fp8_layers(model, structure, job.precision)
    backend.convert(model, selection)
    return PreparedModel(model, structure, selection)


def fp8_layers_report(job: JobConfig) -> dict:
    """Which layers of the job's model run in FP8 and why the others do not, with the model's blocks: what
    a run logs at start (events.jsonl `fp8_layers`, MLflow params). Built on the meta device: no memory;
    a model whose logits have the wrong shape is refused here already (`check_output_on_meta`)."""
    with torch.device("meta"):
        model = build_model(job.model, job.seed)
    check_output_on_meta(model, job.model)
    structure = find_structure(model, job.model.block_class)
    selection = select_fp8_layers(model, structure, job.precision)
    return {"factory": factory_name(job.model), **structure.describe(), "auto": job.precision.fp8_layers.auto,
            **selection.to_event()}
