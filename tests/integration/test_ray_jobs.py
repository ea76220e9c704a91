"""`shadow run` through Ray Jobs against a Ray head on 127.0.0.1 with token authentication.

The head is started the way a secured cluster is (RAY_AUTH_MODE=token with a generated token). A
client without the token is refused with "Missing authentication token"; the submitting user passes
the token (here as the Authorization header of the Job Submission SDK; on the command line,
`RAY_AUTH_MODE=token RAY_AUTH_TOKEN=... ray job submit`).
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_head(env: dict, token: str, log_path: Path):
    """A token-authenticated head on free ports: (process, dashboard address), or None when a port it was
    given was taken by another process before the head bound it (tests run side by side)."""
    gcs_port, dashboard_port = _free_port(), _free_port()
    log = open(log_path, "w")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         "--num-cpus=3", "--include-dashboard=true", "--disable-usage-stats",
         # free ports for the agents too, so another Ray on this machine (a test's local Ray) cannot collide
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()  # the head has its own descriptor
    address = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.time() + 90
    while True:
        try:
            JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"}).list_jobs()
            return head, address
        except Exception:
            taken = "address already in use" in log_path.read_text()
            if taken or time.time() > deadline or head.poll() is not None:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()
                if taken:
                    return None
                raise RuntimeError(f"Ray head did not come up; see {log_path}") from None
            time.sleep(1)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    token = secrets.token_hex(16)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    directory = tmp_path_factory.mktemp("head")
    for attempt in range(3):
        started = _start_head(env, token, directory / f"head-{attempt}.log")
        if started is not None:
            break
    else:
        raise RuntimeError(f"Ray head found no free ports in 3 attempts; see {directory}")
    head, address = started
    yield address, token
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def _submit(client, **kwargs) -> str:
    """Submit, retrying while the freshly started head's job agent is not up yet (HTTP 500)."""
    deadline = time.time() + 90
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)


def _wait(client, job_id, timeout_s=300):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still {client.get_job_status(job_id)} after {timeout_s}s")


def test_client_without_the_token_is_refused(ray_head):
    """"Missing" on a machine without a token file; "Invalid" where ~/.ray/auth_token holds another
    cluster's token (a local `ray.init` with token auth writes one)."""
    address, _ = ray_head
    with pytest.raises(AuthenticationError, match="(Missing|Invalid) authentication token"):
        JobSubmissionClient(address).list_jobs()


def test_shadow_run_as_a_ray_job_succeeds_and_writes_the_run_directory(ray_head, tmp_path):
    address, token = ray_head
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    out = tmp_path / "job-run"
    job_id = _submit(
        client, entrypoint=f"shadow run --job jobs/tiny.yaml --set steps=40 --set model.num_layers=2 --out {out}",
        runtime_env={"working_dir": str(REPO), "excludes": ["runs/", "tests/"]})
    status = _wait(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["phase"] == "finished" and summary["final_step"] == 40
    assert summary["num_verifications"] >= 1
    assert "effective speedup" in logs


def test_a_failing_run_fails_the_ray_job(ray_head, tmp_path):
    address, token = ray_head
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: many\n")
    job_id = _submit(client, entrypoint=f"shadow run --job {bad} --out {tmp_path / 'bad-run'}",
                               runtime_env={"working_dir": str(REPO), "excludes": ["runs/", "tests/"]})
    assert _wait(client, job_id) == JobStatus.FAILED
    assert "steps: got 'many', expected an integer" in client.get_job_logs(job_id)
