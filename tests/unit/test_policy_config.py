"""Policy files: every shipped one loads, and malformed ones give an error naming file and key."""

from pathlib import Path

import pytest
import yaml

from shadow.cli import main
from shadow.config.loader import MAX_CONFIG_BYTES, ConfigError, to_dict
from shadow.config.policy import Metric, OnSwitch, Policy, load_policy

POLICIES = sorted((Path(__file__).parents[2] / "policies").glob("*.yaml"))

BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n" + "".join(
    f"{chr(c)}: &{chr(c)} [{', '.join(['*' + chr(c - 1)] * 9)}]\n" for c in range(ord("c"), ord("j")))

# (id, file content, text the error must contain besides the file name: the key, or what is wrong)
MALFORMED = [
    ("unknown top-level key", "verfy: {every_n_steps: 10}\n", "verfy: "),
    ("unknown nested key", "verify:\n  every_n_step: 10\n", "verify.every_n_step: "),
    ("int given as string", "verify:\n  every_n_steps: ten\n", "verify.every_n_steps: "),
    ("float given as string", "thresholds:\n  warn: 1%\n", "thresholds.warn: "),
    ("bool where an int goes", "thresholds:\n  consecutive: true\n", "thresholds.consecutive: "),
    ("section not a mapping", "thresholds: 0.03\n", "thresholds: got 0.03, expected a mapping"),
    ("negative threshold", "thresholds:\n  warn: -0.01\n", "thresholds.warn: got -0.01"),
    ("NaN threshold", "thresholds:\n  switch: .nan\n", "thresholds.switch: got nan"),
    ("infinite threshold", "thresholds:\n  switch: .inf\n", "thresholds.switch: got inf"),
    ("warn above switch", "thresholds:\n  warn: 0.05\n  switch: 0.03\n",
     "thresholds.warn: got 0.05, expected at most switch"),
    ("window longer than cadence", "verify:\n  every_n_steps: 50\n  window_steps: 100\n",
     "verify.window_steps: got 100"),
    ("unknown metric", "compare:\n  metric: loss\n", "compare.metric: got 'loss'"),
    ("unknown on_switch", "action:\n  on_switch: restart\n", "action.on_switch: got 'restart'"),
    ("unknown mode", "action:\n  mode: dry_run\n", "action.mode: got 'dry_run'"),
    ("fp8 as the reference precision", "verify:\n  replay_precision: fp8\n", "verify.replay_precision: got 'fp8'"),
    ("zero consecutive", "thresholds:\n  consecutive: 0\n", "thresholds.consecutive: got 0"),
    ("trend over one window", "thresholds:\n  trend_windows: 1\n", "thresholds.trend_windows: got 1"),
    ("zero max_switches", "action:\n  max_switches: 0\n", "action.max_switches: got 0"),
    ("zero clean probes", "action:\n  return_to_fp8:\n    clean_probes: 0\n",
     "action.return_to_fp8.clean_probes: got 0"),
    ("ignore the whole window", "compare:\n  ignore_first_steps: 50\n", "compare.ignore_first_steps: got 50"),
    ("eval metric without eval", "compare:\n  metric: eval_gap\n", "compare.metric: got 'eval_gap'"),
    ("end fraction zero", "compare:\n  end_fraction: 0\n", "compare.end_fraction: got 0"),
    ("negative GPUs", "verify:\n  replay_resources:\n    num_gpus: -1\n", "verify.replay_resources.num_gpus: got -1"),
    ("zero noise multiplier", "noise:\n  multiplier: 0\n", "noise.multiplier: got 0"),
    ("maximum interval below the base", "verify:\n  max_every_n_steps: 50\n", "verify.max_every_n_steps: got 50"),
    ("early stop after one step", "verify:\n  early_stop:\n    min_steps: 1\n", "verify.early_stop.min_steps: got 1"),
    ("early stop no sooner than the end", "verify:\n  window_steps: 20\n  early_stop:\n    min_steps: 20\n",
     "verify.early_stop.min_steps: got 20, expected fewer than window_steps (20)"),
    ("certain confidence", "verify:\n  early_stop:\n    confidence: 1.0\n", "verify.early_stop.confidence: got 1.0"),
    ("early stop of an end gap", "compare:\n  metric: rel_end_gap\nverify:\n  early_stop:\n    min_steps: 8\n",
     "verify.early_stop.min_steps: got 8, expected 0 with compare.metric rel_end_gap"),
    ("negative evidence limit", "thresholds:\n  evidence_limit: -0.1\n", "thresholds.evidence_limit: got -0.1"),
    ("unknown fp8_must_pay act", "action:\n  fp8_must_pay:\n    act: complain\n",
     "action.fp8_must_pay.act: got 'complain'"),
    ("negative min speedup", "action:\n  fp8_must_pay:\n    min_speedup: -1\n",
     "action.fp8_must_pay.min_speedup: got -1"),
    ("interpolation is not evaluated", "compare:\n  metric: ${oc.env:HOME}\n", "compare.metric: got '${oc.env:HOME}'"),
    ("non-string key", "1: 2\n", "1: got 2, expected a known key"),
    ("empty file", "", "<top level>: got 'an empty file'"),
    ("only comments", "# nothing here\n", "<top level>: got 'an empty file'"),
    ("not YAML", "verify: [every_n_steps: 10\n", "<top level>: got 'invalid YAML'"),
    ("tabs for indentation", "verify:\n\tevery_n_steps: 10\n", "<top level>: got 'invalid YAML'"),
    ("alias bomb", BILLION_LAUGHS, "aliases (*name) are not allowed"),
    ("duplicate keys", "thresholds:\n  warn: 0.01\n  warn: 0.02\n", "duplicate key 'warn'"),
    ("huge file", "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1), f"at most {MAX_CONFIG_BYTES} bytes"),
    ("top-level list", "- verify\n- compare\n", "<top level>: got ['verify', 'compare'], expected a YAML mapping"),
    ("top-level scalar", "just some text\n", "<top level>: got 'just some text', expected a YAML mapping"),
    ("python object tag", "!!python/object/apply:os.system ['touch PWNED']\n", "python/object/apply:os.system"),
    ("unhashable key", "? [a, b]\n: 1\n", "a key must be a plain scalar"),
]


@pytest.fixture
def bad_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so a tag that ran `touch PWNED` would leave a file we can see

    def write(content):
        path = tmp_path / "bad_policy.yaml"
        path.write_text(content, encoding="utf-8")
        return path

    return write


@pytest.mark.parametrize("content, expected", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_policy_gives_an_error_naming_file_and_key(bad_file, content, expected):
    path = bad_file(content)
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    text = str(caught.value)
    assert expected in text
    assert all(line.startswith(f"{path}: ") for line in text.splitlines())
    assert not (path.parent / "PWNED").exists()


@pytest.mark.parametrize("content, expected", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_policy_check_exits_2_with_one_line_per_problem(bad_file, capsys, content, expected):
    path = bad_file(content)
    assert main(["policy", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert all(line.startswith(f"{path}: ") for line in err.strip().splitlines())


def test_every_problem_of_a_file_is_reported(bad_file):
    path = bad_file("verify:\n  every_n_steps: 0\nthresholds:\n  warn: .nan\n  consecutive: x\nextra: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    keys = sorted(p.key for p in caught.value.problems)
    assert keys == ["extra", "thresholds.consecutive", "thresholds.warn"]  # type errors first...
    path = bad_file("verify:\n  every_n_steps: 0\n  window_steps: 0\nthresholds:\n  warn: 0.5\n  switch: 0.1\n")
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    assert sorted(p.key for p in caught.value.problems) == [  # ...then every semantic one at once
        "thresholds.warn", "verify.every_n_steps", "verify.window_steps"]


def test_overrides_beat_the_file_and_name_their_source(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("thresholds:\n  switch: 0.05\n")
    assert load_policy(path, ["thresholds.switch=0.07"]).thresholds.switch == 0.07
    with pytest.raises(ConfigError) as caught:
        load_policy(path, ["thresholds.warn=0.09"])
    assert str(caught.value).startswith("--set: thresholds.warn: got 0.09")


@pytest.mark.parametrize("path", POLICIES, ids=[p.name for p in POLICIES])
def test_shipped_policy_loads_with_every_field_written_and_commented(path):
    policy = load_policy(path)
    written = yaml.safe_load(path.read_text())
    assert _leaves(written) == _leaves(to_dict(policy)), "every field is written out in a shipped policy"
    for line in path.read_text().splitlines():
        if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"{path.name}: field without a comment: {line.strip()}"


def test_the_three_policies_are_shipped_and_differ_where_they_should():
    assert {p.name for p in POLICIES} >= {"default.yaml", "strict.yaml", "observe_only.yaml"}
    default, strict, observe = (load_policy(p) for p in
                                (POLICIES[0].parent / n for n in ("default.yaml", "strict.yaml", "observe_only.yaml")))
    assert strict.thresholds.switch < default.thresholds.switch and strict.thresholds.consecutive == 1
    assert observe.action.mode.value == "observe" and default.action.mode.value == "enforce"


def test_defaults_are_a_valid_policy():
    policy = load_policy(None)
    assert policy == Policy() and policy.compare.metric is Metric.REL_MEAN_GAP
    assert policy.action.on_switch is OnSwitch.BF16


def _leaves(data, prefix=""):
    keys = set()
    for key, value in data.items():
        keys |= _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return keys
