"""Telemetry on a tiny model: NaN activations read as NaN (what a `non_finite` trigger watches for),
constant ones as 0."""

import math

import pytest
import torch

from shadow.config import load_job
from shadow.precision import build_backend
from shadow.precision.convert import prepare_model
from shadow.telemetry import TelemetryCollector, token_kurtosis

TINY = ["precision.mode=bf16", "model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.seq_len=8",
        "model.vocab_size=64"]


def test_token_kurtosis_is_nan_for_a_nan_token_and_zero_for_a_constant_one():
    tokens = torch.tensor([[1.0, float("nan"), 2.0, 3.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 4.0]])
    kurtosis = token_kurtosis(tokens)
    assert math.isnan(kurtosis[0]) and kurtosis[1] == 0.0
    assert kurtosis[2] == pytest.approx(21 / 9)  # centred (-1, -1, -1, 3): E[c^4] = 21, var = 3


def _telemetry(block: int, w_up_value: float) -> dict[str, float]:
    """One forward of a tiny model whose `block`'s SwiGLU w_up weights all hold `w_up_value`."""
    job = load_job(None, TINY)
    backend = build_backend(job.precision, torch.device("cpu"))
    prepared = prepare_model(job, backend)
    with torch.no_grad():
        prepared.model.blocks[block].ffn.w_up.weight.fill_(w_up_value)
    collector = TelemetryCollector(prepared.model, backend, prepared.structure)
    with collector.recording():
        prepared.model(torch.zeros(2, 8, dtype=torch.long))
    return collector.finish()


def test_nan_activations_read_as_nan_not_as_calm():
    values = _telemetry(1, float("nan"))  # the last block: the maxima over blocks see a finite value first
    for key in ("swiglu/blocks.1/crest", "swiglu/crest_max", "act/blocks.1/kurtosis", "act/kurtosis_max"):
        assert math.isnan(values[key]), key
    assert values["swiglu/blocks.0/crest"] > 1.0 and values["act/blocks.0/kurtosis"] > 1.0


def test_a_zero_swiglu_output_has_crest_zero():
    values = _telemetry(0, 0.0)
    assert values["swiglu/blocks.0/crest"] == 0.0 and values["swiglu/blocks.1/crest"] > 1.0
    assert values["swiglu/crest_max"] == values["swiglu/blocks.1/crest"]
