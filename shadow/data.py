"""Step-addressed token data: the batch of global step `s` is a pure function of (data config, seed, s).

No iterator state exists, so a replay started at step k sees exactly the batches the main job saw,
whatever happened before k. Sources are a flat array of token ids (bytes for text, a memory-mapped
`.bin` for prepared data); the last `holdout_fraction` of it is the held-out split for evaluation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from shadow.config.job import DataConfig, DataSource

_EVAL_STREAM = 2**62  # step index of the evaluation batches' random stream (never a training step)


class DataError(ValueError):
    """A data source that cannot be used; the message names the file and the fix."""


def load_tokens(config: DataConfig) -> np.ndarray:
    """The whole corpus as a 1-D array of token ids (memory-mapped for token files)."""
    if config.source is DataSource.PYDOC:
        from pydoc_data.topics import topics

        text = "".join(topics[key] for key in sorted(topics))
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    path = Path(config.path)
    if not path.is_file():
        raise DataError(f"data.path: {path} does not exist or is not a file (source '{config.source.value}')")
    if config.source is DataSource.TEXT:
        return np.fromfile(path, dtype=np.uint8)
    dtype = np.dtype(config.token_dtype)
    if path.stat().st_size % dtype.itemsize:
        raise DataError(
            f"data.path: {path} has {path.stat().st_size} bytes, not a whole number of {config.token_dtype} "
            "tokens; is data.token_dtype right?"
        )
    return np.memmap(path, dtype=dtype, mode="r")


def _step_seed(seed: int, stream: int) -> int:
    """A well-mixed 64-bit seed for (seed, stream): neighbouring steps get unrelated batches."""
    digest = hashlib.blake2b(f"{seed}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class StepData:
    """Batches for any global step, and a fixed held-out evaluation set."""

    def __init__(self, config: DataConfig, seq_len: int, batch_size: int, vocab_size: int):
        self.config = config
        self.seq_len = seq_len
        self.batch_size = batch_size
        tokens = load_tokens(config)
        num_holdout = int(len(tokens) * config.holdout_fraction)
        self.train_tokens = tokens[: len(tokens) - num_holdout]
        self.eval_tokens = tokens[len(tokens) - num_holdout :]
        for name, split in (("training", self.train_tokens), ("held-out", self.eval_tokens)):
            if len(split) < seq_len + 2:
                raise DataError(
                    f"data: the {name} split has {len(split)} tokens, fewer than model.seq_len + 2 = {seq_len + 2}"
                )
        max_id = int(tokens.max()) if config.source is DataSource.TOKENS else 255
        if max_id >= vocab_size:
            raise DataError(f"model.vocab_size: {vocab_size} is too small for token id {max_id} in the data")

    def _windows(self, tokens: np.ndarray, seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.Generator(np.random.PCG64(seed))
        starts = rng.integers(0, len(tokens) - self.seq_len - 1, size=count)
        rows = np.stack([np.asarray(tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        chunk = torch.from_numpy(rows)
        return chunk[:, :-1], chunk[:, 1:]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of shape [batch_size, seq_len] for global step `step` (the global batch)."""
        return self._windows(self.train_tokens, _step_seed(self.config.seed, step), self.batch_size)

    def eval_batches(self, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same held-out batches on every call: evaluations at different steps are comparable."""
        inputs, targets = self._windows(
            self.eval_tokens, _step_seed(self.config.seed, _EVAL_STREAM), num_batches * self.batch_size
        )
        return list(zip(inputs.split(self.batch_size), targets.split(self.batch_size)))
