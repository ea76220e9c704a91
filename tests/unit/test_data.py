"""Step-addressed data: batches are a pure function of (config, seed, step); sources and their errors."""

import numpy as np
import pytest
import torch

from shadow.config import load_job
from shadow.data import DataError, StepData


def _data(*overrides, seq_len=32, batch_size=4, vocab_size=256):
    job = load_job(None, list(overrides))
    return StepData(job.data, seq_len, batch_size, vocab_size)


def test_batch_is_a_pure_function_of_step():
    a, b = _data(), _data()
    for step in (0, 1, 17, 10_000):
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # order of access does not matter: no iterator state
    later_first = _data()
    later_first.batch(99)
    assert torch.equal(later_first.batch(3)[0], a.batch(3)[0])
    assert not torch.equal(a.batch(3)[0], a.batch(4)[0])
    assert not torch.equal(a.batch(3)[0], _data("data.seed=1").batch(3)[0])


def test_targets_are_inputs_shifted_by_one():
    x, y = _data().batch(5)
    assert x.shape == (4, 32) and y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_heldout_split_is_disjoint_and_fixed():
    data = _data()
    assert len(data.train_tokens) + len(data.eval_tokens) > 400_000
    evals1, evals2 = data.eval_batches(2), data.eval_batches(2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(evals1, evals2))
    # eval windows come from the tail of the corpus, training windows never reach it
    assert len(data.eval_tokens) == int((len(data.train_tokens) + len(data.eval_tokens)) * 0.1)


def test_token_file_source_memory_maps_uint16_and_uint32(tmp_path):
    ids = (np.arange(5000) * 7919 % 1000).astype(np.uint16)
    path16 = tmp_path / "tokens16.bin"
    ids.tofile(path16)
    data = _data("data.source=tokens", f"data.path={path16}", vocab_size=1000)
    assert isinstance(data.train_tokens, np.memmap)
    x, y = data.batch(0)
    assert int(x.max()) < 1000 and torch.equal(x[:, 1:], y[:, :-1])
    path32 = tmp_path / "tokens32.bin"
    (ids.astype(np.uint32) + 70_000).tofile(path32)
    data32 = _data("data.source=tokens", f"data.path={path32}", "data.token_dtype=uint32", vocab_size=71_000)
    assert int(data32.batch(0)[0].min()) >= 70_000


def test_text_file_source(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    x, _ = _data("data.source=text", f"data.path={path}").batch(0)
    assert set(bytes(x[0].tolist()).decode()) <= set("the quick brown fox jumps over the lazy dog.")


def test_data_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _data("data.source=text", f"data.path={tmp_path / 'missing.txt'}")
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 4001)
    with pytest.raises(DataError, match="token_dtype"):
        _data("data.source=tokens", f"data.path={odd}")
    big = tmp_path / "big.bin"
    np.full(5000, 3000, dtype=np.uint16).tofile(big)
    with pytest.raises(DataError, match="vocab_size"):
        _data("data.source=tokens", f"data.path={big}", vocab_size=256)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("short")
    with pytest.raises(DataError, match="fewer than model.seq_len"):
        _data("data.source=text", f"data.path={tiny}")
