"""Job YAML loading: every shipped job loads; bad files fail with the file and the full key named."""

from pathlib import Path

import pytest

from shadow.cli import main
from shadow.config import ConfigError, load_job
from shadow.config.job import Fp8Backend, PrecisionMode, Scaling

JOBS = sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_shipped_job_loads(path):
    job = load_job(str(path))
    assert job.steps > 0 and job.name


def test_defaults_and_overrides_precedence(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("steps: 40\noptim:\n  lr: 1e-3\nprecision:\n  scaling: current\n")
    job = load_job(str(path), ["optim.lr=2e-3", "precision.mode=bf16"])
    assert job.steps == 40  # YAML over default
    assert job.optim.lr == 2e-3  # --set over YAML
    assert job.precision.mode is PrecisionMode.BF16 and job.precision.scaling is Scaling.CURRENT
    assert job.precision.backend is Fp8Backend.EMULATED  # default kept
    assert job.model.ffn_width == 352  # 8/3 * 128 rounded up to a multiple of 32


BAD_JOBS = {
    "unknown_key": ("model:\n  num_layerz: 2\n", "model.num_layerz"),
    "unknown_section": ("modle:\n  num_layers: 2\n", "modle"),
    "wrong_type": ("steps: ten\n", "steps"),
    "float_for_int": ("batch_size: 2.5\n", "batch_size"),
    "bool_for_int": ("steps: true\n", "steps"),
    "bad_enum": ("precision:\n  scaling: sometimes\n", "precision.scaling"),
    "bad_format": ("precision:\n  format: e9m9\n", "precision.format"),
    "odd_head_width": ("model:\n  d_model: 100\n  num_heads: 4\n", "model.d_model"),
    "dropout_one": ("model:\n  dropout: 1.0\n", "model.dropout"),
    "negative_lr": ("optim:\n  lr: -1.0\n", "optim.lr"),
    "nan_lr": ("optim:\n  lr: .nan\n", "optim.lr"),
    "min_lr_above_lr": ("optim:\n  lr: 1e-3\n  min_lr: 1e-2\n", "optim.min_lr"),
    "text_without_path": ("data:\n  source: text\n", "data.path"),
    "section_not_mapping": ("optim: 3\n", "optim"),
    "torchao_with_delayed": ("precision:\n  backend: torchao\n  scaling: delayed\n", "precision.scaling"),
    "float8_all_gather_without_torchao": ("precision:\n  fsdp_float8_all_gather: true\n",
                                          "precision.fsdp_float8_all_gather"),
    "float8_all_gather_rowwise": ("precision: {backend: torchao, scaling: current, torchao_recipe: rowwise, "
                                  "fsdp_float8_all_gather: true}\n", "precision.fsdp_float8_all_gather"),
    "bad_name": ("name: ../../etc\n", "name"),
    "fault_unknown_role": ("precision:\n  fault: {roles: [gradient]}\n", "precision.fault.roles"),
    "fault_no_roles": ("precision:\n  fault: {roles: []}\n", "precision.fault.roles"),
    "fault_repeated_role": ("precision:\n  fault: {roles: [input, input]}\n", "precision.fault.roles"),
    "fault_ramp_past_end": ("precision:\n  fault: {start_step: 10, end_step: 20, scale_factor: 10.0, ramp_steps: 11}\n",
                            "precision.fault.ramp_steps"),
    "empty": ("", "empty file"),
    "not_yaml": ("steps: [1, 2\n", "valid YAML"),
    "top_level_list": ("- 1\n- 2\n", "mapping"),
    "duplicate_key": ("steps: 1\nsteps: 2\n", "duplicate key"),
    "alias": ("a: &x 3\nsteps: *x\n", "aliases"),
    "python_object": ("steps: !!python/object/apply:os.system ['true']\n", "valid YAML"),
}


@pytest.mark.parametrize("name", sorted(BAD_JOBS))
def test_malformed_job_names_file_and_key(tmp_path, name, capsys):
    text, expected = BAD_JOBS[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_job(str(path))
    message = str(info.value)
    assert str(path) in message and expected in message, message
    # the CLI turns it into exit code 2 and one readable line per problem, no traceback
    assert main(["train", "--job", str(path), "--steps", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_huge_job_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("steps: 1\n" + "#" * (300 * 1024))
    with pytest.raises(ConfigError, match="at most"):
        load_job(str(path))


def test_compile_needs_telemetry_off():
    """Telemetry hooks do not run inside a compiled forward: the combination would record nothing."""
    with pytest.raises(ConfigError, match=r"resources\.compile.*telemetry\.every_steps"):
        load_job(None, ["resources.compile=true"])
    assert load_job(None, ["resources.compile=true", "telemetry.every_steps=0"]).resources.compile


def test_bad_override_names_the_key():
    with pytest.raises(ConfigError, match=r"--set: optim\.lrr"):
        load_job(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_job(None, ["optim.lr"])


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text("steps: x\nbatch_size: y\nmodel:\n  bogus: 1\n")
    with pytest.raises(ConfigError) as info:
        load_job(str(path))
    assert [p.key for p in info.value.problems] == ["steps", "batch_size", "model.bogus"]


def test_flatten_joins_nested_keys():
    from shadow.config import flatten

    data = {"a": {"b": {"c": 1}, "d": [1, 2]}, "e": "x", "empty": {}}
    assert flatten(data) == {"a.b.c": 1, "a.d": [1, 2], "e": "x"}
    assert flatten(data, "job.") == {"job.a.b.c": 1, "job.a.d": [1, 2], "job.e": "x"}
    assert flatten({"speed": {"wall": 1.0}}, sep="_") == {"speed_wall": 1.0}
