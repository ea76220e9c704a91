"""The checkpoint store fails under a running `shadow run`: S3 goes away for a while or for good.

A real S3-protocol server (moto) on 127.0.0.1 sits behind a relay the test can switch off and on,
which is what an S3 outage looks like to the trainer (connections refused), while the server keeps
its objects. The Ray workers read the standard AWS environment, so it is set before Ray starts.
"""

import json
import os
import secrets
import sqlite3
import threading
import time
import uuid

import pytest
import ray
from conftest import FAST, FIXED_POLICY, REPO
from s3_fixtures import BUCKET, MotoServer, s3_client
from tcp_relay import TcpRelay

from shadow.checkpoint import open_store
from shadow.cli import main
from shadow.config import load_job
from shadow.rundir import read_events
from shadow.trainer import job_hash

pytestmark = pytest.mark.slow

TINY = str(REPO / "jobs/tiny.yaml")
SECRET = f"planted-secret-{secrets.token_hex(8)}"


@pytest.fixture(scope="module")
def s3_relay():
    """moto behind a switchable relay, the AWS environment pointing at the relay, then a local Ray."""
    moto = MotoServer()
    s3_client(moto.url).create_bucket(Bucket=BUCKET)
    relay = TcpRelay(moto.port)
    saved = dict(os.environ)
    os.environ.update({"AWS_ENDPOINT_URL": relay.url, "AWS_ACCESS_KEY_ID": "AKIATESTSHADOW000000",
                       "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"})
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        yield relay, f"s3://{BUCKET}"
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        relay.down()
        moto.stop()


def _watch(out, condition, action, timeout_s=120):
    """Run `action` once the run's events satisfy `condition` (a thread beside the controller)."""
    def loop():
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if (out / "events.jsonl").exists() and condition(read_events(out)):
                action()
                return
            time.sleep(0.02)
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def _committed(events, at_least=0):
    return [e["step"] for e in events if e["event"] == "checkpoint_committed" and e["step"] >= at_least]


def _failed(events):
    return [e for e in events if e["event"] == "checkpoint_failed"]


def _run(tmp_path, root, *args):
    out = tmp_path / "run"
    code = main(["run", "--job", TINY, *FAST, "--set", "steps=150", "--set", "checkpoint.every_steps=10",
                 "--set", f"checkpoint.uri={root}/{uuid.uuid4().hex[:8]}", *FIXED_POLICY, "--out", str(out), *args])
    return code, out


def test_short_s3_outage_costs_some_checkpoints_and_the_run_goes_on(s3_relay, tmp_path, capsys):
    relay, root = s3_relay
    out = tmp_path / "run"
    down = _watch(out, lambda ev: _committed(ev, at_least=50), relay.down)
    back = _watch(out, lambda ev: len(_failed(ev)) >= 2, relay.up)
    try:
        code, out = _run(tmp_path, root)
    finally:
        down.join(1)
        back.join(1)
        relay.up()
    events = read_events(out)
    assert code == 0, capsys.readouterr().err[-2000:]
    failures = _failed(events)
    assert len(failures) >= 2 and max(f["failures_in_row"] for f in failures) <= 2
    assert all("s3://" in f["uri"] and f["error"] for f in failures)
    first_failure = events.index(failures[0])
    assert any(e["event"] == "checkpoint_committed" for e in events[first_failure:])  # commits resumed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["phase"] == "finished" and summary["final_step"] == 150
    _assert_secret_absent(out, capsys.readouterr())


def test_s3_gone_for_good_stops_the_run_with_the_last_checkpoint_intact(s3_relay, tmp_path, capsys):
    relay, root = s3_relay
    out = tmp_path / "run"
    down = _watch(out, lambda ev: _committed(ev, at_least=50), relay.down)
    try:
        code, out = _run(tmp_path, root)
    finally:
        down.join(1)
        relay.up()
    err = capsys.readouterr().err
    assert code == 1
    assert "checkpoint saves failed in a row (run.max_checkpoint_failures=3)" in err
    assert "shadow run --resume" in err
    events = read_events(out)
    assert [f["failures_in_row"] for f in _failed(events) if f["stage"] == "save"][-1] == 3
    assert events[-1]["event"] == "run_finished" and events[-1]["phase"] == "failed"
    last = max(_committed(events))
    started = next(e for e in events if e["event"] == "run_started")
    job = load_job(str(out / "job.yaml"))
    store = open_store(started["store_uri"], started["run"])
    assert store.latest_committed(job_hash(job)) == last  # the previous checkpoint stays latest, and loads
    assert store.load(last, job_hash(job)).step == last


def _assert_secret_absent(out, captured) -> None:
    """S3 credentials never reach events, logs, summary, the console or MLflow: every file of the run
    directory is searched as bytes (the embedded MLflow store `mlflow.db` and its artifacts included),
    and the store's params and tags, where the job's settings are logged, are read back through sqlite."""
    assert SECRET not in captured.out and SECRET not in captured.err
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"events.jsonl", "summary.json", "mlflow.db"} <= {p.name for p in files}
    assert not [p for p in files if SECRET.encode() in p.read_bytes()]
    with sqlite3.connect(f"file:{out / 'mlflow.db'}?mode=ro", uri=True) as db:
        params = db.execute("SELECT key, value FROM params").fetchall()
        tags = db.execute("SELECT key, value FROM tags").fetchall()
    logged = dict(params)
    assert logged["job.checkpoint.uri"].startswith("s3://")  # the store's settings were logged, so they were read
    assert not [(k, v) for k, v in params + tags if SECRET in f"{k}={v}"]
