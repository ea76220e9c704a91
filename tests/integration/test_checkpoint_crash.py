"""Crash safety: a save interrupted before its manifest leaves the previous checkpoint as the latest
and nothing readable of the interrupted one, whether the writer is killed (local and S3) or the
network dies halfway through a multipart upload (S3)."""

import subprocess
import sys

import pytest
import torch
from s3_fixtures import BUCKET, object_key, s3_client, s3_env, s3_root, s3_server
from tcp_relay import TcpRelay

from shadow.checkpoint import CheckpointError, StorageError, open_store
from shadow.checkpoint.s3 import S3Options
from shadow.snapshot import Snapshot

__all__ = ["s3_env", "s3_root", "s3_server"]  # fixtures used here

# Saves step 10, then starts step 20 and hangs right after the last file before the manifest
# (`meta.json`) is stored, so the kill lands between the files and the manifest every time.
WRITER = """
import sys, time, torch
from shadow.checkpoint import open_store
from shadow.snapshot import Snapshot

def snapshot(step):
    return Snapshot(step, {"model.w": torch.full((256, 256), float(step)), "optim.w.exp_avg": torch.ones(256)},
                    {"job_hash": "j", "param_groups": []})

store = open_store(sys.argv[1], "run")
store.save(snapshot(10))
put = store._put
def put_then_hang(path, data):
    put(path, data)
    if path.endswith("meta.json"):
        print("midway", flush=True)
        time.sleep(120)
store._put = put_then_hang
store.save(snapshot(20))
"""


def _assert_only_previous_is_readable(store):
    assert store.list_committed() == [10] and store.latest_committed() == 10
    with pytest.raises(CheckpointError, match=r"step-000000020/MANIFEST.json: missing \(not committed"):
        store.load(20)
    with pytest.raises(CheckpointError, match="MANIFEST.json: missing"):
        store.pin(20, "replay-1")
    assert torch.equal(store.load(10).tensors["model.w"], torch.full((256, 256), 10.0))


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_killed_writer_leaves_previous_checkpoint_latest(kind, request, tmp_path):
    uri = request.getfixturevalue("s3_root") if kind == "s3" else str(tmp_path)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, uri], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "midway"
    finally:
        writer.kill()
        writer.wait()
    store = open_store(uri, "run")
    _assert_only_previous_is_readable(store)
    # the interrupted save did store its files: it died just before the commit, not before it began
    assert sorted(store._list("step-000000020")[1]) == ["meta.json", "rank-00000.bin", "tensors.json"]
    # a later save of the same step replaces the leftovers and commits normally
    store.save(Snapshot(20, {"model.w": torch.zeros(2)}, {"job_hash": "j", "param_groups": []}))
    assert store.latest_committed() == 20 and torch.equal(store.load(20).tensors["model.w"], torch.zeros(2))
    assert sorted(store._list("step-000000020")[1]) == ["MANIFEST.json", "meta.json", "rank-00000.bin",
                                                         "tensors.json"]


def test_network_dying_mid_upload_leaves_previous_checkpoint_latest(s3_env, s3_root, monkeypatch):
    proxy = TcpRelay(s3_env.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    options = S3Options(max_attempts=2, connect_timeout_s=0.5, read_timeout_s=5,
                        multipart_threshold_bytes=5 * 2**20, multipart_chunk_bytes=5 * 2**20)
    store = open_store(s3_root, "run", s3_options=options)

    def snapshot(step):  # the rank's data file (12 MiB and a little) goes up in three parts
        tensors = {"model.w": torch.full((256, 256), float(step)), "optim.w.exp_avg": torch.ones(3 * 2**20)}
        return Snapshot(step, tensors, {"job_hash": "j", "param_groups": []})

    try:
        store.save(snapshot(10))
        proxy.arm(budget_bytes=6 * 2**20)  # about half of the data file
        with pytest.raises(StorageError, match=r"step-000000020/rank-00000.bin: uploading part \d failed after 2 "
                                               r"attempts at http://127.0.0.1:\d+ \(EndpointConnectionError"):
            store.save(snapshot(20))
        assert proxy.cut.is_set()
    finally:
        proxy.down()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.url)  # a reader with a working network
    _assert_only_previous_is_readable(open_store(s3_root, "run"))
    # it died in the middle of the data file's upload (which the dead network kept it from aborting): the
    # upload was begun, and none of its parts is visible as an object
    client, key = s3_client(s3_env.url), object_key(s3_root, 20, "rank-00000.bin")
    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=BUCKET, Prefix=key).get("Uploads", [])] == [key]
    assert client.list_objects_v2(Bucket=BUCKET, Prefix=object_key(s3_root, 20, ""))["KeyCount"] == 0
