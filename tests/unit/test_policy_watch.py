"""Hot reload with real file edits: valid, invalid, deleted, replaced atomically, huge, immutable key."""

import os

import pytest

from shadow.config.loader import MAX_CONFIG_BYTES
from shadow.config.policy import load_policy
from shadow.config.policy_watch import IMMUTABLE_KEYS, PolicyWatcher

GOOD = "thresholds:\n  warn: 0.01\n  switch: 0.03\n"


@pytest.fixture
def watched(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    return path, PolicyWatcher(path, load_policy(path))


def test_unchanged_file_gives_no_event(watched):
    path, watcher = watched
    result = watcher.poll()
    assert result.event is None and result.policy is watcher.policy
    os.utime(path, ns=(1, 1))  # a touch without a content change is not an edit
    assert watcher.poll().event is None


def test_valid_edit_is_reloaded_with_a_diff(watched):
    path, watcher = watched
    path.write_text(GOOD.replace("0.03", "0.05") + "action:\n  on_switch: rollback\n")
    result = watcher.poll()
    assert result.event["event"] == "policy_reloaded"
    assert result.event["changes"] == {"thresholds.switch": {"old": 0.03, "new": 0.05},
                                       "action.on_switch": {"old": "bf16", "new": "rollback"}}
    assert result.policy.thresholds.switch == 0.05 and watcher.policy is result.policy
    assert watcher.poll().event is None  # one event per change


def test_invalid_edit_is_rejected_and_the_old_policy_stays(watched):
    path, watcher = watched
    before = watcher.policy
    path.write_text("thresholds:\n  warn: 0.5\n  switch: 0.03\n")
    result = watcher.poll()
    assert result.event["event"] == "policy_rejected" and result.policy is before
    assert f"{path}: thresholds.warn: got 0.5" in result.event["error"]
    assert watcher.poll().event is None  # rejected once, not at every poll
    path.write_text(GOOD.replace("0.01", "0.02"))
    fixed = watcher.poll()
    assert fixed.event["event"] == "policy_reloaded" and fixed.policy.thresholds.warn == 0.02


def test_yaml_syntax_error_is_rejected(watched):
    path, watcher = watched
    path.write_text("thresholds: [warn\n")
    result = watcher.poll()
    assert result.event["event"] == "policy_rejected" and "invalid YAML" in result.event["error"]
    assert result.policy.thresholds.warn == 0.01


def test_deleted_file_is_rejected_and_restoring_it_reloads(watched):
    path, watcher = watched
    path.unlink()
    result = watcher.poll()
    assert result.event["event"] == "policy_rejected" and "a readable file" in result.event["error"]
    assert result.policy.thresholds.switch == 0.03
    assert watcher.poll().event is None
    path.write_text(GOOD)
    restored = watcher.poll()
    assert restored.event == {"event": "policy_reloaded", "path": str(path), "changes": {}}


def test_atomic_replace_is_reloaded(watched):
    path, watcher = watched
    tmp = path.with_name("policy.yaml.tmp")
    tmp.write_text(GOOD.replace("0.03", "0.04"))
    os.replace(tmp, path)
    result = watcher.poll()
    assert result.event["event"] == "policy_reloaded"
    assert result.event["changes"] == {"thresholds.switch": {"old": 0.03, "new": 0.04}}


def test_huge_file_is_rejected_without_reading_it_all(watched):
    path, watcher = watched
    path.write_text("# x\n" * (MAX_CONFIG_BYTES // 2))
    result = watcher.poll()
    assert result.event["event"] == "policy_rejected"
    assert f"at most {MAX_CONFIG_BYTES} bytes" in result.event["error"]


def test_binary_file_is_rejected(watched):
    path, watcher = watched
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert "UTF-8" in watcher.poll().event["error"]


def test_immutable_key_is_named_in_the_rejection(watched):
    path, watcher = watched
    assert "compare.metric" in IMMUTABLE_KEYS
    path.write_text(GOOD + "compare:\n  metric: end_gap\n")
    result = watcher.poll()
    assert result.event["event"] == "policy_rejected"
    assert "compare.metric: got 'end_gap'" in result.event["error"] and "cannot change mid-run" in result.event["error"]
    assert result.policy.compare.metric.value == "rel_mean_gap"


def test_command_line_overrides_keep_applying_on_reload(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    overrides = ["thresholds.consecutive=4"]
    watcher = PolicyWatcher(path, load_policy(path, overrides), overrides)
    path.write_text(GOOD.replace("0.03", "0.04") + "  consecutive: 1\n")
    result = watcher.poll()
    assert result.policy.thresholds.consecutive == 4 and result.policy.thresholds.switch == 0.04
