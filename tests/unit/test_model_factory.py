"""`model.factory`: a user's model is built from its kwargs with the job's seed, and anything that is not
a causal LM returning logits is refused at start with a message naming the factory."""

import pytest
import torch
from plugins.gpt import build

from shadow.architecture import find_structure
from shadow.config import load_job
from shadow.config.loader import ConfigError
from shadow.model_errors import ModelError
from shadow.model_factory import build_model, check_output
from shadow.trainer import job_hash

PLUGIN = ["model.factory=plugins.gpt:build", "model.kwargs={width: 32, layers: 2, heads: 2}"]


def _built(*overrides):
    job = load_job(None, [*PLUGIN, *overrides])
    return job, build_model(job.model, job.seed)


def test_the_factory_is_called_with_the_kwargs_under_the_job_seed():
    job, model = _built("seed=5")
    torch.manual_seed(5)
    reference = build(width=32, layers=2, heads=2)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    check_output(model, job.model, torch.device("cpu"))  # (batch, seq, 256) logits: accepted


def test_kwargs_merge_key_by_key_over_the_file():
    job = load_job(None, [*PLUGIN, "model.kwargs.layers=3"])
    assert job.model.kwargs == {"width": 32, "layers": 3, "heads": 2}


@pytest.mark.parametrize("overrides, message", [
    (["model.factory=no_such_package.models:build"], r"cannot import module 'no_such_package.models'"),
    (["model.factory=plugins.gpt:nothing"], r"module 'plugins.gpt' has no 'nothing'"),
    (["model.factory=plugins.gpt:GptBlock", "model.kwargs={}"], r"'plugins.gpt:GptBlock' failed with model.kwargs"),
    (["model.kwargs={width: 32, no_such_argument: 1}"], r"failed with model.kwargs.*no_such_argument"),
    (["model.factory=builtins:dict", "model.kwargs={a: 1}"], r"'builtins:dict' returned a dict, expected a torch.nn"),
])
def test_a_factory_that_cannot_build_a_module_is_named(overrides, message):
    with pytest.raises(ModelError, match=message):
        _built(*overrides)


def test_logits_of_the_wrong_shape_are_refused_naming_the_factory():
    job, model = _built("model.factory=plugins.gpt:wrong_vocab")
    with pytest.raises(ModelError, match=r"'plugins.gpt:wrong_vocab'.*logits of shape \(1, 8, 100\).*"
                                         r"expected \(1, 8, 256\)"):
        check_output(model, job.model, torch.device("cpu"))


def test_an_output_without_logits_is_refused():
    job, model = _built()
    model.forward = lambda idx: {"hidden": idx}
    with pytest.raises(ModelError, match=r"returned a dict; expected logits"):
        check_output(model, job.model, torch.device("cpu"))


def test_bad_factory_settings_are_config_errors():
    with pytest.raises(ConfigError, match=r"model.factory: got 'plugins.gpt'"):
        load_job(None, ["model.factory=plugins.gpt"])
    with pytest.raises(ConfigError, match=r"model.kwargs: .*no kwargs without a factory"):
        load_job(None, ["model.kwargs={width: 32}"])


def test_blocks_come_from_the_named_class_or_the_largest_module_list():
    _, model = _built()
    assert [b.name for b in find_structure(model).blocks] == ["h.0", "h.1"]
    assert [b.name for b in find_structure(model, "LayerNorm").blocks] == ["h.0.ln_1", "h.0.ln_2", "h.1.ln_1",
                                                                            "h.1.ln_2", "ln_f"]
    with pytest.raises(ModelError, match=r"model.block_class 'Missing': the model has no module of that class"):
        find_structure(model, "Missing")
    with pytest.raises(ModelError, match="set model.block_class"):
        find_structure(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_the_job_hash_covers_the_factory_its_kwargs_and_the_fp8_selection():
    base = load_job(None, PLUGIN)
    changed = [load_job(None, [*PLUGIN, "model.kwargs.layers=3"]),
               load_job(None, [*PLUGIN, "model.factory=plugins.gpt:wrong_vocab"]),
               load_job(None, [*PLUGIN, "model.block_class=GptBlock"]),
               load_job(None, [*PLUGIN, "precision.fp8_layers.bf16_last_layers=1"]),
               load_job(None, [*PLUGIN, "precision.fp8_layers.auto=true"]),
               load_job(None, [*PLUGIN, 'precision.fp8_layers.exclude=["*.c_fc"]'])]
    hashes = {job_hash(base), *(job_hash(job) for job in changed)}
    assert len(hashes) == 1 + len(changed)
    assert job_hash(load_job(None, [*PLUGIN, "precision.mode=bf16"])) == job_hash(base)  # replays switch mode


def test_the_meta_device_check_refuses_wrong_logits_before_any_rank_starts():
    from shadow.precision.convert import fp8_layers_report

    with pytest.raises(ModelError, match=r"'plugins.gpt:wrong_vocab'.*expected \(1, 8, 256\)"):
        fp8_layers_report(load_job(None, ["model.factory=plugins.gpt:wrong_vocab"]))
    assert fp8_layers_report(load_job(None, PLUGIN))["num_fp8"] == 8
