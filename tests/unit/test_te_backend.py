"""The Transformer Engine adapter, exercised against a stand-in `transformer_engine` module.

TE cannot be imported without an NVIDIA driver, so these tests check the adapter's own logic: which
recipe it builds, how autocast is entered per mode, and that scaling state travels as plain tensors.
The real TE run happens on a GPU machine (see the scale-out issue's note).
"""

import contextlib
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

from shadow.config import load_job
from shadow.precision import BackendUnavailable, build_backend

CUDA = torch.device("cuda")
# torch.autocast("cuda") warns and disables itself on a machine without CUDA; the adapter is the subject.
pytestmark = pytest.mark.filterwarnings("ignore:CUDA is not available")


@dataclass
class FakeMeta:
    scale: torch.Tensor = field(default_factory=lambda: torch.ones(3))
    amax_history: torch.Tensor = field(default_factory=lambda: torch.zeros(4, 3))


class FakeTeLinear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device="cuda"):
        super().__init__()
        assert params_dtype == torch.float32 and device == CUDA  # master weights in fp32, on the GPU
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.zeros(out_features, in_features))  # (on the CPU: no GPU here)
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None
        self.fp8_meta = {}

    def init_fp8_metadata(self):
        assert FAKE.autocast_calls and FAKE.autocast_calls[-1]["enabled"], "must be called under fp8_autocast"
        self.fp8_meta["scaling_fwd"] = FakeMeta()
        self.fp8_meta["scaling_bwd"] = FakeMeta(torch.ones(2), torch.zeros(4, 2))


class FakeTe:
    def __init__(self):
        self.autocast_calls = []
        self.recipes = []
        recipe = types.SimpleNamespace(
            Format=types.SimpleNamespace(HYBRID="HYBRID", E4M3="E4M3"),
            DelayedScaling=lambda **kw: self.recipes.append(("delayed", kw)) or ("delayed", kw),
            Float8CurrentScaling=lambda **kw: self.recipes.append(("current", kw)) or ("current", kw),
        )
        self.pytorch = types.ModuleType("transformer_engine.pytorch")
        self.pytorch.Linear = FakeTeLinear
        self.pytorch.fp8_autocast = self.fp8_autocast
        self.common = types.ModuleType("transformer_engine.common")
        self.common.recipe = recipe

    @contextlib.contextmanager
    def fp8_autocast(self, enabled, calibrating=False, fp8_recipe=None):
        self.autocast_calls.append({"enabled": enabled, "calibrating": calibrating, "recipe": fp8_recipe})
        yield


FAKE = FakeTe()


@pytest.fixture
def fake_te(monkeypatch):
    global FAKE
    FAKE = FakeTe()
    package = types.ModuleType("transformer_engine")
    package.pytorch, package.common = FAKE.pytorch, FAKE.common
    monkeypatch.setitem(sys.modules, "transformer_engine", package)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", FAKE.pytorch)
    monkeypatch.setitem(sys.modules, "transformer_engine.common", FAKE.common)
    monkeypatch.setitem(sys.modules, "transformer_engine.common.recipe", FAKE.common.recipe)
    return FAKE


def _te_layer(backend):
    return backend.fp8_linear(torch.nn.Linear(4, 4, bias=False))


def _two_layers(backend):
    return torch.nn.Sequential(_te_layer(backend), _te_layer(backend))


def _backend(*overrides):
    return build_backend(load_job(None, ["precision.backend=te", *overrides]).precision, CUDA)


def test_delayed_recipe_carries_the_job_settings(fake_te):
    _backend("precision.amax_history_len=32", "precision.margin=1", "precision.amax_compute=most_recent")
    kind, kwargs = fake_te.recipes[-1]
    assert kind == "delayed"
    assert kwargs == {"margin": 1, "fp8_format": "HYBRID", "amax_history_len": 32, "amax_compute_algo": "most_recent"}


def test_current_scaling_and_e4m3_recipe(fake_te):
    _backend("precision.scaling=current", "precision.format=e4m3")
    assert fake_te.recipes[-1] == ("current", {"fp8_format": "E4M3"})


def test_autocast_enables_fp8_or_calibrates_per_mode(fake_te):
    backend = _backend()
    with backend.autocast():
        pass
    assert fake_te.autocast_calls[-1] == {"enabled": True, "calibrating": False, "recipe": backend.recipe}
    backend.set_mode("bf16")
    with backend.autocast():
        pass
    assert fake_te.autocast_calls[-1]["enabled"] is False
    assert fake_te.autocast_calls[-1]["calibrating"] is True  # delayed scaling keeps amax fresh in BF16


def test_scaling_state_round_trips_as_plain_tensors(fake_te):
    backend = _backend()
    model = _two_layers(backend)
    with backend.autocast():
        for module in model:
            module.init_fp8_metadata()
    model[1].fp8_meta["scaling_fwd"].scale.fill_(7.0)
    model[1].fp8_meta["scaling_bwd"].amax_history.fill_(0.5)
    exported = backend.extra_state(model)
    assert set(exported) == {f"{i}.{m}.{t}" for i in (0, 1) for m in ("scaling_fwd", "scaling_bwd")
                             for t in ("scale", "amax_history")}
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in exported.values())

    fresh = _two_layers(backend)  # metadata not created yet
    backend.load_extra_state(fresh, exported)
    assert torch.equal(fresh[1].fp8_meta["scaling_fwd"].scale, torch.full((3,), 7.0))
    assert torch.equal(fresh[1].fp8_meta["scaling_bwd"].amax_history, torch.full((4, 2), 0.5))

    exported["0.scaling_fwd.scale"] = torch.ones(5)
    with pytest.raises(ValueError, match="0.scaling_fwd.scale"):
        backend.load_extra_state(fresh, exported)


def test_saved_scaling_state_without_a_matching_layer_is_an_error(fake_te):
    """A saved tensor that finds no TE layer (another model, another layer selection) would leave the
    scale it stands for at its default and change the numbers: an error naming it, not a skip."""
    backend = _backend()
    model = _two_layers(backend)
    with backend.autocast():
        for module in model:
            module.init_fp8_metadata()
    exported = backend.extra_state(model)
    smaller = torch.nn.Sequential(_te_layer(backend))
    with pytest.raises(ValueError, match=r"1\.scaling_bwd\.amax_history, 1\.scaling_bwd\.scale, .*no matching"):
        backend.load_extra_state(smaller, exported)
    exported["2.scaling_fwd.scale"] = torch.ones(3)  # a layer this model does not have
    with pytest.raises(ValueError, match=r"2\.scaling_fwd\.scale.*no matching"):
        backend.load_extra_state(_two_layers(backend), exported)
    del exported["2.scaling_fwd.scale"], exported["1.scaling_fwd.scale"]  # a layer's tensor missing
    with pytest.raises(ValueError, match=r"1\.scaling_fwd\.scale: not in the checkpoint"):
        backend.load_extra_state(_two_layers(backend), exported)
    backend.load_extra_state(_two_layers(backend), {})  # nothing saved: fine


def test_missing_transformer_engine_names_the_alternatives(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    with pytest.raises(BackendUnavailable, match="shadow\\[te\\].*emulated"):
        _backend()


def test_te_converts_the_selected_layers_of_any_model_and_keeps_the_rest_bf16(fake_te):
    """Layer selection with TE: a plug-in model's selected linear layers become te.Linear holding a copy of
    their weights and bias; the others and the tied output head become BF16 layers."""
    from plugins.gpt import build

    from shadow.precision.base import Bf16Linear
    from shadow.precision.convert import prepare_model

    job = load_job(None, ["precision.backend=te", "model.factory=plugins.gpt:build",
                          "model.kwargs={width: 32, layers: 3, heads: 2}", "precision.fp8_layers.bf16_last_layers=1",
                          "precision.fp8_layers.exclude=[\"*.c_proj\"]"])
    backend = build_backend(job.precision, CUDA)
    prepared = prepare_model(job, backend)
    model = prepared.model
    te_layers = {name for name, m in model.named_modules() if isinstance(m, FakeTeLinear)}
    assert te_layers == {f"h.{i}.{n}" for i in (0, 1) for n in ("c_attn", "c_fc", "mlp_proj")}
    assert set(prepared.selection.fp8_names) == te_layers
    assert isinstance(model.h[2].c_attn, Bf16Linear) and isinstance(model.h[0].c_proj, Bf16Linear)
    assert model.lm_head.weight is model.wte.weight  # the tie survives the swap
    torch.manual_seed(0)  # the job's seed: the factory's initial weights and biases, copied into TE's parameters
    reference = build(width=32, layers=3, heads=2).h[0].c_fc
    assert torch.equal(model.h[0].c_fc.weight, reference.weight) and torch.equal(model.h[0].c_fc.bias, reference.bias)


def test_te_refuses_to_untie_a_weight_shared_by_a_selected_layer(fake_te):
    from shadow.architecture import find_structure
    from shadow.model_errors import ModelError
    from shadow.precision.selection import select_fp8_layers

    backend = _backend()
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(16, 16)) for _ in range(2))
    model.blocks[1][0].weight = model.blocks[0][0].weight  # tied across blocks
    selection = select_fp8_layers(model, find_structure(model), load_job(None, ["precision.backend=te"]).precision)
    with pytest.raises(ModelError, match=r"untie the tied weight of blocks.0.0, blocks.1.0"):
        backend.convert(model, selection)
