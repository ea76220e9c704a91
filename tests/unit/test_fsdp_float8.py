"""The weight wrapper behind `precision.fsdp_float8_all_gather`, on one process (no all-gather): what stays
wrapped, what the all-gather hooks hand FSDP2 in each precision mode, and the FSDP2 internals it resets.
tests/integration/test_fsdp_float8_all_gather.py runs it on 2 ranks."""

import inspect

import pytest
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

from shadow.config import load_job
from shadow.model_errors import ModelError
from shadow.precision import build_backend
from shadow.precision.fsdp_float8 import Float8AllGatherWeight

pytest.importorskip("torchao", reason="torchao is not installed (pip install 'shadow[torchao]')")
from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic  # noqa: E402
from torchao.float8.float8_training_tensor import Float8TrainingTensor  # noqa: E402

CPU = torch.device("cpu")


class TwoRankMesh:
    """What the hooks ask of FSDP2's mesh: its size (the amax all-reduce needs a process group: none here)."""

    def size(self) -> int:
        return 2


def _wrapped_layer(rows: int = 32):
    config = load_job(None, ["precision.backend=torchao", "precision.scaling=current",
                             "precision.fsdp_float8_all_gather=true"]).precision
    backend = build_backend(config, CPU)
    model = torch.nn.Sequential(backend.fp8_linear(torch.nn.Linear(16, rows, bias=False)))
    torch.nn.init.normal_(model[0].weight, std=0.3, generator=torch.Generator().manual_seed(0))
    backend.before_sharding(model)
    return backend, model[0]


def _pre_all_gather(shard: Float8AllGatherWeight, rows: int):
    """FSDP2's call for a shard of a `rows`-row weight (the module and mixed-precision policy are not used)."""
    return shard.fsdp_pre_all_gather(TwoRankMesh(), torch.Size([rows, shard.shape[1]]), (shard.shape[1], 1), None, None)


def test_fsdp_ops_keep_the_weight_wrapped_and_the_rest_gives_plain_tensors():
    _, layer = _wrapped_layer()
    weight = layer.weight
    assert isinstance(weight, torch.nn.Parameter) and isinstance(weight, Float8AllGatherWeight)
    for derived in (weight.detach(), weight.view(-1), weight.narrow(0, 2, 4), weight.chunk(2)[1],
                    weight.new_zeros(3, 16)):
        assert type(derived) is Float8AllGatherWeight
    for derived in (weight * 2, torch.zeros_like(weight), weight.to("cpu", copy=True), weight.clone()):
        assert type(derived) is torch.Tensor  # optimizer state, checkpoint copies
    before = weight.hp.clone()
    with torch.no_grad():
        weight.narrow(0, 0, 4).mul_(2.0)  # an optimizer's in-place update reaches the values
    assert torch.equal(weight.hp[:4], before[:4] * 2) and torch.equal(weight.hp[4:], before[4:])


def test_fp8_mode_gathers_the_torchao_cast_and_bf16_mode_the_weight_itself():
    backend, layer = _wrapped_layer()
    shard = layer.weight.detach()[:16]  # rank 0's half of 32 rows
    (data,), scale = _pre_all_gather(shard, 32)
    expected = hp_tensor_to_float8_dynamic(shard.hp, torch.float8_e4m3fn, layer.linear_mm_config)
    assert data.dtype == torch.float8_e4m3fn
    assert torch.equal(data.view(torch.uint8), expected._data.view(torch.uint8)) and torch.equal(scale, expected._scale)
    gathered, inner = shard.fsdp_post_all_gather((data,), scale, torch.float32)
    assert isinstance(gathered, Float8TrainingTensor) and inner == (data,)
    assert torch.equal(gathered.to_original_precision(), expected.to_original_precision())

    backend.set_mode("bf16")
    (hp,), metadata = _pre_all_gather(shard, 32)
    assert metadata is None and torch.equal(hp, shard.hp) and hp.dtype == torch.float32
    assert shard.fsdp_post_all_gather((hp,), None, torch.float32) == (hp, (hp,))


def test_a_short_last_shard_is_padded_with_zeros_to_fsdp2s_shard_size():
    _, layer = _wrapped_layer(rows=48)
    shard = layer.weight.detach()[32:]  # 16 rows: the last shard of an 80-row weight on 2 ranks (shards of 40)
    (data,), _ = _pre_all_gather(shard, 80)
    assert data.shape == (40, 16)
    assert torch.equal(data[16:].float(), torch.zeros(24, 16))


def test_a_weight_gathered_in_the_other_mode_is_refused():
    backend, layer = _wrapped_layer()
    shard = layer.weight.detach()
    (data,), scale = _pre_all_gather(shard, 32)
    fp8_weight, _ = shard.fsdp_post_all_gather((data,), scale, torch.float32)
    backend.set_mode("bf16")
    with pytest.raises(RuntimeError, match="other precision mode"):
        shard.fsdp_post_all_gather((shard.hp,), None, torch.float32, out=fp8_weight)


def test_a_tied_fp8_weight_is_refused():
    config = load_job(None, ["precision.backend=torchao", "precision.scaling=current",
                             "precision.fsdp_float8_all_gather=true"]).precision
    backend = build_backend(config, CPU)
    linear = torch.nn.Linear(16, 16, bias=False)
    model = torch.nn.Sequential(backend.fp8_linear(linear), torch.nn.Linear(16, 16, bias=False))
    model[1].weight = model[0].weight
    with pytest.raises(ModelError, match="untie the tied weight of 0"):
        backend.before_sharding(model)


def test_the_fsdp2_internals_a_switch_resets_are_still_there():
    """`drop_gathered_weights` resets FSDP2 private state (torch 2.13); if torch renames or stops reusing it,
    this fails here rather than as a wrong dtype in the middle of a run."""
    assert {"all_gather_outputs", "_unsharded_param", "_unsharded_inner_tensors"} <= set(FSDPParam.__annotations__)
    assert "if len(self.all_gather_outputs) > 0" in inspect.getsource(FSDPParam.init_all_gather_outputs)
    assert 'if hasattr(self, "_unsharded_param")' in inspect.getsource(FSDPParam.init_unsharded_param)
    assert "self._fsdp_param_groups" in inspect.getsource(FSDPState.__init__)
    assert callable(FSDPModule._get_fsdp_state)
    assert "outer_size" in inspect.getsource(FSDPParam.all_gather_inputs.fget)  # the 5-argument pre-all-gather hook


def test_the_option_is_not_part_of_the_job_hash():
    """It changes no number (the integration test shows equal losses), so either job replays the other's
    checkpoints."""
    from shadow.trainer import job_hash

    torchao = ["precision.backend=torchao", "precision.scaling=current"]
    assert job_hash(load_job(None, [*torchao, "precision.fsdp_float8_all_gather=true"])) == job_hash(
        load_job(None, torchao))
