"""Shared test fixtures: a small job that trains in well under a second per step on one CPU thread."""

from pathlib import Path

import pytest

SMALL_JOB = """\
name: small
steps: 24
batch_size: 8
seed: 3
model: {num_layers: 2, d_model: 64, num_heads: 2, seq_len: 64, vocab_size: 256}
data: {source: pydoc, seed: 5}
optim: {lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 4}
precision: {mode: fp8, backend: emulated, format: hybrid, scaling: delayed, amax_history_len: 4}
checkpoint: {every_steps: 8}
eval: {batches: 2}
"""


@pytest.fixture
def small_job_file(tmp_path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_JOB)
    return path
