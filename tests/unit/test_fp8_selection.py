"""`precision.fp8_layers`: which linear layers run in FP8, by block counts, patterns and the auto rule,
for the built-in model and plug-in models; in BF16 mode every layer is BF16 whatever the selection."""

import pytest
import torch
from plugins.gpt import build

from shadow.architecture import find_structure
from shadow.config import load_job
from shadow.model_factory import next_token_loss
from shadow.precision import build_backend
from shadow.precision.base import Bf16Linear
from shadow.precision.convert import fp8_layers_report, prepare_model
from shadow.precision.emulated import EmulatedFp8Linear
from shadow.precision.selection import select_fp8_layers

CPU = torch.device("cpu")
SMALL = ["model.num_layers=3", "model.d_model=32", "model.num_heads=2", "model.seq_len=16"]
KINDS = ("attn.wqkv", "attn.wo", "ffn.w_gate", "ffn.w_up", "ffn.w_down")


def _fp8_names(*overrides) -> list[str]:
    return fp8_layers_report(load_job(None, [*SMALL, *overrides]))["fp8"]


def test_by_default_every_block_linear_is_fp8_and_the_head_is_bf16():
    report = fp8_layers_report(load_job(None, SMALL))
    assert report["fp8"] == [f"blocks.{b}.{k}" for b in range(3) for k in KINDS]
    assert list(report["bf16"]) == ["lm_head"] and "outside the blocks" in report["bf16"]["lm_head"]
    assert report["num_fp8"] == 15 and report["num_linear"] == 16


def test_first_and_last_blocks_kept_in_bf16():
    names = _fp8_names("precision.fp8_layers.bf16_first_layers=1", "precision.fp8_layers.bf16_last_layers=1")
    assert names == [f"blocks.1.{k}" for k in KINDS]


def test_include_then_exclude_patterns_on_module_names():
    names = _fp8_names('precision.fp8_layers.include=["*.ffn.*"]', 'precision.fp8_layers.exclude=["*.w_down"]')
    assert names == [f"blocks.{b}.ffn.{k}" for b in range(3) for k in ("w_gate", "w_up")]
    report = fp8_layers_report(load_job(None, [*SMALL, 'precision.fp8_layers.exclude=["blocks.0.*"]']))
    assert report["bf16"]["blocks.0.attn.wo"] == "exclude: blocks.0.*"


@pytest.mark.parametrize("recipe, width, expected", [
    # width 1024, SwiGLU 2816 (K -> N): wqkv 1024 -> 3072, wo 1024 -> 1024, gate/up 1024 -> 2816, down 2816 -> 1024
    ("tensorwise", 1024, ["attn.wqkv", "ffn.w_gate", "ffn.w_up"]),  # K <= 4096 and N <= 1024: wo, w_down stay BF16
    ("rowwise", 1024, []),  # K <= 1024 or N <= 2048: every layer stays BF16
    # width 2048, SwiGLU 5632: wqkv 2048 -> 6144, wo 2048 -> 2048, gate/up 2048 -> 5632, down 5632 -> 2048
    ("rowwise", 2048, ["attn.wqkv", "ffn.w_gate", "ffn.w_up"]),  # N <= 2048: wo, w_down stay BF16
])
def test_auto_keeps_small_gemms_in_bf16_by_torchao_thresholds(recipe, width, expected):
    job = load_job(None, ["model.num_layers=1", f"model.d_model={width}", "model.num_heads=8",
                          f"model.ffn_hidden={width * 11 // 4}", "precision.backend=torchao",
                          "precision.scaling=current",
                          f"precision.torchao_recipe={recipe}", "precision.fp8_layers.auto=true"])
    report = fp8_layers_report(job)
    assert report["fp8"] == [f"blocks.0.{k}" for k in expected]
    rule = "K <= 4096 and N <= 1024" if recipe == "tensorwise" else "N <= 2048 or K <= 1024"
    assert rule in report["bf16"]["blocks.0.attn.wo"]


def test_auto_at_width_4096_converts_every_block_gemm_and_the_tiny_job_none():
    wide = load_job(None, ["model.num_layers=1", "model.d_model=4096", "model.num_heads=32",
                           "precision.fp8_layers.auto=true"])
    assert fp8_layers_report(wide)["num_fp8"] == 5
    assert _fp8_names("precision.fp8_layers.auto=true") == []  # width 32: nothing gains


def test_fp8_hardware_needs_multiples_of_16_but_emulation_does_not():
    odd = [*SMALL, "model.d_model=40", "model.num_heads=2", "model.ffn_hidden=104"]  # 40 is not a multiple of 16
    emulated = fp8_layers_report(load_job(None, odd))
    torchao = fp8_layers_report(load_job(None, [*odd, "precision.backend=torchao", "precision.scaling=current"]))
    assert emulated["num_fp8"] == 15 and torchao["num_fp8"] == 0
    assert "multiples of 16" in torchao["bf16"]["blocks.0.attn.wo"]


def test_a_plug_in_model_is_selected_by_its_own_blocks_and_names():
    job = load_job(None, ["model.factory=plugins.gpt:build", "model.kwargs={width: 32, layers: 2, heads: 2}",
                          'precision.fp8_layers.include=["*.c_fc", "*.mlp_proj"]'])
    report = fp8_layers_report(job)
    assert report["block_class"] == "GptBlock" and report["num_blocks"] == 2 and not report["swiglu_telemetry"]
    assert report["fp8"] == ["h.0.c_fc", "h.0.mlp_proj", "h.1.c_fc", "h.1.mlp_proj"]
    assert report["factory"] == "plugins.gpt:build"


@pytest.mark.parametrize("backend", ["emulated", "torchao"])
def test_in_bf16_mode_every_layer_is_bf16_whatever_the_selection(backend):
    """Losses and gradients of a BF16 step are bit-identical with all block layers FP8-capable or none."""
    results = []
    for include in ('[]', '["none"]'):
        job = load_job(None, [*SMALL, "precision.mode=bf16", f"precision.backend={backend}",
                              "precision.scaling=current",
                              "model.factory=plugins.gpt:build", "model.kwargs={width: 32, layers: 2, heads: 2}",
                              f"precision.fp8_layers.include={include}"])
        prepared = prepare_model(job, build_backend(job.precision, CPU))
        fp8_capable = [m for m in prepared.model.modules() if not isinstance(m, Bf16Linear) and hasattr(m, "weight")
                       and isinstance(m.weight, torch.nn.Parameter) and m.weight.dim() == 2
                       and type(m).__name__ != "Embedding"]
        assert len(fp8_capable) == (8 if include == "[]" else 0)
        idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        loss = next_token_loss(prepared.model, idx[:, :-1], idx[:, 1:])
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in prepared.model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_emulated_fp8_layer_with_bias_quantizes_and_its_bf16_path_equals_a_bf16_layer():
    job = load_job(None, ["precision.scaling=current"])
    backend = build_backend(job.precision, CPU)
    linear = torch.nn.Linear(16, 8)
    layer, reference = EmulatedFp8Linear(linear, backend), Bf16Linear(linear)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    fp8_out = layer(x)
    fp8_out.sum().backward()
    assert layer.bias.grad is not None and torch.equal(layer.bias.grad, torch.full((8,), 4.0))
    backend.set_mode("bf16")
    assert torch.equal(layer(x), reference(x)) and not torch.equal(fp8_out, reference(x))


def test_selection_sees_the_blocks_found_before_any_swap():
    model = build(width=32, layers=2, heads=2)
    structure = find_structure(model)
    job = load_job(None, ["precision.fp8_layers.bf16_first_layers=1"])
    selection = select_fp8_layers(model, structure, job.precision)
    assert selection.fp8_names == ["h.1.c_attn", "h.1.c_proj", "h.1.c_fc", "h.1.mlp_proj"]


def test_torchao_converts_only_the_selected_layers_and_trains_them_in_float8():
    job = load_job(None, [*SMALL, "precision.backend=torchao", "precision.scaling=current",
                          'precision.fp8_layers.include=["*.ffn.*"]'])
    backend = build_backend(job.precision, CPU)
    model = prepare_model(job, backend).model
    kinds = {name: type(module).__name__ for name, module in model.named_modules()
             if name.endswith(("wqkv", "wo", "w_gate", "w_up", "w_down", "lm_head"))}
    assert {kinds[f"blocks.0.ffn.{k}"] for k in ("w_gate", "w_up", "w_down")} == {"TorchaoFp8Linear"}
    assert {kinds["blocks.0.attn.wqkv"], kinds["blocks.0.attn.wo"], kinds["lm_head"]} == {"Bf16Linear"}
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    fp8_loss = next_token_loss(model, idx[:, :-1], idx[:, 1:])
    fp8_loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    backend.set_mode("bf16")
    with torch.no_grad():
        assert not torch.equal(next_token_loss(model, idx[:, :-1], idx[:, 1:]), fp8_loss.detach())
