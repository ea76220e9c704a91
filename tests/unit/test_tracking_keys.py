"""What records look like in MLflow (keys, steps, params, batches) and how URIs lose their secrets."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shadow.config import ConfigError
from shadow.records import StepRecord
from shadow.tracking import keys
from shadow.tracking.sender import _batches
from shadow.tracking.uri import embedded_uri, redact, resolve_tracking_uri


def test_limits_match_mlflow():
    from mlflow.utils import validation

    for name in ("MAX_METRICS_PER_BATCH", "MAX_PARAMS_TAGS_PER_BATCH", "MAX_ENTITIES_PER_BATCH",
                 "MAX_PARAM_VAL_LENGTH", "MAX_TAG_VAL_LENGTH", "MAX_ENTITY_KEY_LENGTH"):
        assert getattr(keys, name) == getattr(validation, name), name


def _row(step, **extra):
    return StepRecord(step=step, loss=2.5, precision="fp8", tokens=512, step_time_s=0.1, grad_norm=1.5, lr=1e-3,
                      **extra)


def test_main_and_replay_rows_use_the_same_keys_at_the_same_step():
    main = {m[0]: m for m in keys.record_metrics(_row(7, lineage=2), 1000, main=True)}
    replay = {m[0]: m for m in keys.record_metrics(_row(7), 1000, main=False)}
    assert set(main) - set(replay) == {"shadow/lineage"}
    assert {"train/loss", "train/grad_norm", "train/lr", "train/step_time_s", "shadow/precision"} <= set(replay)
    assert all(m[3] == 7 and m[2] == 1000 for m in [*main.values(), *replay.values()])
    assert main["shadow/precision"][1] == 1.0 and main["shadow/lineage"][1] == 2.0
    assert "eval/loss" not in main


def test_eval_loss_and_telemetry_are_logged_when_present():
    row = _row(3, eval_loss=1.75, telemetry={"amax/layer 0[q]": 448.0})
    metrics = {m[0]: m[1] for m in keys.record_metrics(row, 0, main=True)}
    assert metrics["eval/loss"] == 1.75
    assert metrics["telemetry/amax/layer 0_q_"] == 448.0  # brackets are not allowed in MLflow names


def test_verdict_metrics_sit_at_the_window_end_and_parse_non_finite_strings():
    event = {"window_end": 125, "level": "violation",
             "verdict": {"rel_mean_gap": 0.14, "mean_gap": 0.3, "t_stat": "inf", "eval_gap": None}}
    metrics = {m[0]: m for m in keys.verdict_metrics(event, 5)}
    assert metrics["shadow/gap_rel"] == ["shadow/gap_rel", 0.14, 5, 125]
    assert math.isinf(metrics["shadow/gap_t_stat"][1])
    assert "shadow/gap_eval" not in metrics
    assert metrics["shadow/verdict_level"][1] == 2.0


def test_replay_run_name_and_tags():
    event = {"name": "003-probe-fp8-at-000000300", "purpose": "probe", "precision": "fp8", "start_step": 300,
             "num_steps": 25}
    assert keys.replay_run_name("probe", "fp8", 300) == "probe fp8 @ step 300"
    tags = keys.replay_tags(event)
    assert tags["shadow.window_start"] == "300" and tags["shadow.window_steps"] == "25"
    assert tags["shadow.window_end"] == "325" and tags["shadow.precision"] == "fp8"


def test_params_are_flattened_and_cut_to_mlflow_limits():
    params = keys.flatten_params("job", {"model": {"d_model": 64, "name": "x"}, "eval_at": [1, 2],
                                         "flag": True, "long": "y" * 10_000})
    assert params["job.model.d_model"] == "64" and params["job.model.name"] == "x"
    assert params["job.eval_at"] == "[1, 2]" and params["job.flag"] == "true"
    assert len(params["job.long"]) == keys.MAX_PARAM_VAL_LENGTH


@given(num_metrics=st.integers(0, 2500), num_params=st.integers(0, 250), num_tags=st.integers(0, 250))
def test_batches_respect_mlflow_limits_and_keep_everything(num_metrics, num_params, num_tags):
    metrics, params, tags = list(range(num_metrics)), [f"p{i}" for i in range(num_params)], [f"t{i}" for i in
                                                                                              range(num_tags)]
    batches = list(_batches(metrics, params, tags))
    for m, p, t in batches:
        assert len(m) <= keys.MAX_METRICS_PER_BATCH and len(p) + len(t) <= keys.MAX_PARAMS_TAGS_PER_BATCH
        assert len(m) + len(p) + len(t) <= keys.MAX_ENTITIES_PER_BATCH
        assert m or p or t
    assert [x for b in batches for x in b[0]] == metrics
    assert [x for b in batches for x in b[1]] == params and [x for b in batches for x in b[2]] == tags


@pytest.mark.parametrize("text, shown", [
    ("http://alice:s3cret@mlflow.example:5000", "http://***@mlflow.example:5000"),
    ("https://token@host/path", "https://***@host/path"),
    ("failed: https://u:p@h:1/api/2.0/runs?token=abc&x=1", "failed: https://***@h:1/api/2.0/runs?token=***&x=1"),
    ("sqlite:////runs/a/mlflow.db", "sqlite:////runs/a/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_redact_removes_credentials(text, shown):
    assert redact(text) == shown


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == embedded_uri(tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri(None, tmp_path, stored="http://h:1") == "http://h:1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:2")
    assert resolve_tracking_uri(None, tmp_path, stored="http://h:1") == "http://env:2"
    assert resolve_tracking_uri("http://flag:3", tmp_path) == "http://flag:3"


def test_a_stored_uri_that_had_credentials_must_be_given_again(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="--tracking-uri or set MLFLOW_TRACKING_URI"):
        resolve_tracking_uri(None, tmp_path, stored="http://***@h:1")
