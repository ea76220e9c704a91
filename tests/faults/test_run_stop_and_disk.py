"""`shadow run` stopped by a signal (what `ray job stop` sends) or starved of disk, and config strings
never reaching a shell."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, FIXED_POLICY, REPO

from shadow.rundir import read_events

pytestmark = pytest.mark.slow

TINY = str(REPO / "jobs/tiny.yaml")


def _start(out, *args, env=None, log_path=None):
    log = open(log_path or out.parent / f"{out.name}.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "shadow", "run", "--job", TINY, *FAST, *FIXED_POLICY,
                                "--out", str(out), *args],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    return process, log


def _wait_for(out, condition, process, timeout_s=180):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if (out / "events.jsonl").exists() and condition(read_events(out)):
            return
        assert process.poll() is None, "the run ended before the fault was injected"
        time.sleep(0.05)
    raise AssertionError("condition never met")


def _all_lines_are_json(path: Path) -> bool:
    """Every line whole: an empty file passes, a file ending in half a line does not."""
    text = path.read_text()
    return (not text or text.endswith("\n")) and all(json.loads(line) is not None for line in text.splitlines())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_commits_a_final_checkpoint_and_closes_the_log(tmp_path, sig):
    out = tmp_path / "run"
    process, log = _start(out, "--set", "steps=400")
    try:
        _wait_for(out, lambda ev: any(e["event"] == "checkpoint_committed" and e["step"] >= 100 for e in ev), process)
        process.send_signal(sig)
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
    assert code == 128 + sig  # non-zero: 143 for SIGTERM, 130 for SIGINT
    events = read_events(out)
    assert _all_lines_are_json(out / "events.jsonl")
    phase = [e for e in events if e["event"] == "controller_phase"][-1]
    assert phase["new"] == "interrupted" and signal.Signals(sig).name in phase["reason"]
    assert events[-1]["event"] == "run_finished" and events[-1]["phase"] == "interrupted"
    summary = json.loads((out / "summary.json").read_text())
    last_commit = max(e["step"] for e in events if e["event"] == "checkpoint_committed")
    assert last_commit == summary["final_step"]  # the state it stopped at is committed
    assert 100 <= last_commit < 400


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    return result.returncode == 0


def test_full_disk_stops_the_run_with_a_clear_error_and_whole_log_lines(tmp_path):
    disk = tmp_path / "small-disk"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("this machine does not let the test mount a small tmpfs (needs root with CAP_SYS_ADMIN)")
    try:
        out = disk / "run"
        process, log = _start(out, "--set", "steps=400", "--set", "checkpoint.every_steps=10",
                              log_path=tmp_path / "run.log")
        code = process.wait(timeout=300)
        log.close()
        output = (tmp_path / "run.log").read_text()
        assert code == 1, output[-2000:]
        assert "No space left on device" in output
        assert re.search(r"checkpoint saves failed in a row|cannot append to .*events\.jsonl|cannot append to "
                         r".*trajectory\.jsonl", output)
        for name in ("events.jsonl", "trajectory.jsonl"):
            assert _all_lines_are_json(out / name), name  # never a torn line
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_config_strings_never_reach_a_shell():
    """shadow runs no shell: nothing in the package calls os.system/popen or subprocess with shell=True."""
    offenders = []
    for path in (REPO / "shadow").rglob("*.py"):
        text = path.read_text()
        if re.search(r"os\.system\(|os\.popen\(|shell\s*=\s*True|subprocess\.", text):
            offenders.append(str(path))
    assert offenders == []
