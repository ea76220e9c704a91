"""Model structure: causal, deterministic init, GEMMs converted by the backend, lm head in BF16."""

import torch

from shadow.config import load_job
from shadow.precision import build_backend
from shadow.precision.base import Bf16Linear
from shadow.precision.convert import prepare_model
from shadow.precision.emulated import EmulatedFp8Linear

CPU = torch.device("cpu")


def _model(seed=0, *extra):
    job = load_job(None, ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.seq_len=16",
                          f"seed={seed}", *extra])
    return prepare_model(job, build_backend(job.precision, CPU)).model


def test_causal_future_tokens_do_not_change_earlier_logits():
    model = _model()
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.equal(a[:, 10:], b[:, 10:])


def _seeded(model, idx, seed):
    torch.manual_seed(seed)  # as the trainer seeds each micro-batch
    return model(idx)


def test_dropout_masks_come_from_the_seeded_generator_and_evaluation_has_none():
    plain, dropping = _model(0), _model(0, "model.dropout=0.2")
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked = _seeded(dropping, idx, 7)
        assert torch.equal(_seeded(dropping, idx, 7), masked)  # same seed, same masks
        assert not torch.equal(_seeded(dropping, idx, 8), masked)
        assert not torch.equal(masked, plain(idx))
        dropping.eval()
        assert torch.equal(dropping(idx), plain(idx))  # evaluation: no dropout


def test_init_is_deterministic_per_seed():
    a, b, c = _model(0), _model(0), _model(1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.dim() >= 2:
            assert not torch.equal(pa, pc), name


def test_block_gemms_come_from_the_backend_and_lm_head_is_bf16():
    model = _model()
    fp8_layers = [m for m in model.modules() if isinstance(m, EmulatedFp8Linear)]
    assert len(fp8_layers) == 2 * 5  # wqkv, wo, w_gate, w_up, w_down per block
    assert isinstance(model.lm_head, Bf16Linear)
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 256)
