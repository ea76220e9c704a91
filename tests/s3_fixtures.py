"""A real S3-protocol server for tests (moto's server mode on 127.0.0.1, one per test module), the
fixtures that point boto3's standard environment at it (a relay that cuts the network: `tcp_relay.py`).

Test modules import the fixtures they use: `from s3_fixtures import s3_env, s3_root, s3_server`.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import boto3
import pytest

BUCKET = "shadow-test"
# dummy credentials: moto accepts any unless authentication is switched on (see `require_auth`)
ACCESS_KEY = "AKIATESTSHADOW000000"
SECRET_KEY = "test-secret-not-real"


@pytest.fixture(scope="module")
def s3_server():
    moto = MotoServer()
    try:
        s3_client(moto.url).create_bucket(Bucket=BUCKET)
        yield moto
    finally:
        moto.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """boto3's standard environment pointing at the test server; nothing is read from ~/.aws."""
    for name, value in {"AWS_ENDPOINT_URL": s3_server.url, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                        "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    return s3_server


@pytest.fixture
def s3_root(s3_env):
    """A fresh prefix in the test bucket."""
    return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:8]}"


def s3_client(url):
    """A client of its own, for tampering with objects behind the store's back."""
    return boto3.client("s3", endpoint_url=url, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                        region_name="us-east-1")


def object_key(root, step, name, run="run"):
    return f"{root[len(f's3://{BUCKET}/'):]}/{run}/step-{step:09d}/{name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).read()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start on port {self.port}") from None
                time.sleep(0.1)

    def require_auth(self, enabled: bool) -> None:
        """Switch moto's IAM authentication on (every request checked) or off (any credentials pass)."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset-auth", data=b"0" if enabled else b"inf",
                                         method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=5).read()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

