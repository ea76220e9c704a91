"""The checkpoint store over a real S3-protocol server (moto's server mode on 127.0.0.1, started here).

Round trip (a data file large enough for a multipart upload) and exact replay through `s3://`,
corruption and planted pickles refused and skipped, and the storage failures a user meets (missing
bucket, access denied, unreachable endpoint) reported with the URI and file and never with a credential.
"""

import contextlib
import hashlib
import json
import logging
import pickle
import time
import uuid

import boto3
import pytest
import torch
from s3_fixtures import (ACCESS_KEY, BUCKET, SECRET_KEY, free_port, object_key, s3_client, s3_env, s3_root,
                         s3_server)

from shadow.checkpoint import AsyncPersister, CheckpointError, StorageError, locate_checkpoint, open_store
from shadow.checkpoint.s3 import S3Options
from shadow.cli import main
from shadow.rundir import read_trajectory
from shadow.snapshot import Snapshot

__all__ = ["s3_env", "s3_root", "s3_server"]  # fixtures used here

FAST_FAIL = S3Options(max_attempts=2, connect_timeout_s=0.5, read_timeout_s=5)
SMALL_PARTS = S3Options(multipart_threshold_bytes=5 * 2**20, multipart_chunk_bytes=5 * 2**20)  # S3's minimum part


def _snapshot(step, big=False):
    g = torch.Generator().manual_seed(step)
    tensors = {"model.w": torch.randn(64, 32, generator=g), "model.scale": torch.ones(3, dtype=torch.bfloat16),
               "optim.w.exp_avg": torch.randn(3 * 2**20 if big else 64, generator=g),  # 12 MiB: multipart
               "optim.w.step": torch.tensor(7.0), "rng.torch_cpu": torch.get_rng_state()}
    return Snapshot(step, tensors, {"precision": "fp8", "job_hash": "job-a", "param_groups": [{"lr": 0.1}]})


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_round_trip_is_exact(kind, s3_root, tmp_path):
    store = open_store(s3_root if kind == "s3" else str(tmp_path), "run", s3_options=SMALL_PARTS)
    store.check()
    original = _snapshot(10, big=True)
    info = store.save(original)
    assert info.uri == f"{store.root}/run/step-000000010" and info.num_bytes > 12 * 2**20
    located, step = locate_checkpoint(info.uri)
    loaded = located.load(step, expected_job_hash="job-a")
    assert loaded.step == 10 and loaded.meta["param_groups"] == [{"lr": 0.1}]
    assert set(loaded.tensors) == set(original.tensors)
    for name, tensor in original.tensors.items():
        assert loaded.tensors[name].dtype == tensor.dtype and torch.equal(loaded.tensors[name], tensor), name
    if kind == "s3":  # the rank's data file (12 MiB and a little) really went up in three parts
        head = s3_client(store.endpoint).head_object(Bucket=BUCKET, Key=object_key(s3_root, 10, "rank-00000.bin"))
        assert head["ContentLength"] > 12 * 2**20 and head["ETag"].endswith('-3"')


def test_exact_replay_from_an_s3_checkpoint(s3_root, tmp_path, small_job_file):
    main_dir = tmp_path / "main"
    assert main(["train", "--job", str(small_job_file), "--precision", "bf16", "--set", f"checkpoint.uri={s3_root}",
                 "--out", str(main_dir)]) == 0
    main_losses = {r.step: r.loss for r in read_trajectory(main_dir)}
    summary = json.loads((main_dir / "summary.json").read_text())
    assert summary["checkpoints"] == [f"{s3_root}/main/step-{s:09d}" for s in (0, 8, 16, 24)]
    assert not (main_dir / "checkpoints").exists()
    replay_dir = tmp_path / "replay"
    assert main(["replay", "--job", str(small_job_file), "--checkpoint", f"{s3_root}/main/step-000000008",
                 "--steps", "8", "--precision", "bf16", "--out", str(replay_dir)]) == 0
    replay_losses = {r.step: r.loss for r in read_trajectory(replay_dir)}
    assert sorted(replay_losses) == list(range(8, 16))
    assert all(replay_losses[s] == main_losses[s] for s in replay_losses), "replay from S3 is not bit-exact"


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete", "pickle", "pickle_forged_manifest"])
def test_damaged_checkpoint_is_refused_and_skipped(s3_root, tmp_path, damage):
    store = open_store(s3_root, "run")
    for step in (10, 20):
        store.save(_snapshot(step))
    client, key = s3_client(store.endpoint), object_key(s3_root, 20, "rank-00000.bin")
    data = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Exploit(str(marker)))
    # loading reads chunk by chunk (each checked against its sha256 in tensors.json); finding the latest
    # hashes whole files against the manifest
    expected = r"rank-00000.bin: tensor '.*': the bytes of its chunk at \[.*\] do not match their sha256"
    skipped = "rank-00000.bin: sha256 does not match the manifest"
    if damage == "flip_byte":
        client.put_object(Bucket=BUCKET, Key=key, Body=data[:200] + bytes([data[200] ^ 0x10]) + data[201:])
    elif damage == "truncate":
        client.put_object(Bucket=BUCKET, Key=key, Body=data[: len(data) // 2])
        expected = skipped = rf"rank-00000.bin: {len(data) // 2} bytes, manifest says {len(data)}"
    elif damage == "delete":
        client.delete_object(Bucket=BUCKET, Key=key)
        expected = skipped = "rank-00000.bin: listed in the manifest but missing"
    else:  # DCP's own reader would unpickle `.metadata`; shadow never opens a file the manifest does not list
        client.put_object(Bucket=BUCKET, Key=object_key(s3_root, 20, ".metadata"), Body=payload)
        client.put_object(Bucket=BUCKET, Key=key, Body=payload)
        expected = skipped = rf"rank-00000.bin: {len(payload)} bytes, manifest says {len(data)}"
        if damage == "pickle_forged_manifest":
            manifest_key = object_key(s3_root, 20, "MANIFEST.json")
            manifest = json.loads(client.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read())
            for entry in manifest["files"]:
                if entry["path"] == "rank-00000.bin":
                    entry.update(bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
            client.put_object(Bucket=BUCKET, Key=manifest_key, Body=json.dumps(manifest).encode())
            expected = skipped = (rf"tensors.json: tensor '.*' chunks\[0\]: bytes \[.*\) of rank-00000.bin; "
                                  rf"expected a range inside its {len(payload)} bytes")
    fresh = open_store(s3_root, "run")
    where = f"{s3_root}/run/step-000000020/"
    with pytest.raises(CheckpointError, match=where + expected):
        fresh.load(20)
    with pytest.raises(CheckpointError, match=where + skipped):  # a new store: no remembered verdict
        open_store(s3_root, "run").verify(20)
    assert fresh.latest_committed() == 10
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_data_file_emptied_after_opening_reads_as_truncated(kind, s3_root, tmp_path):
    """Replaced after its size was checked: every chunk now starts past the end. That is a damaged
    checkpoint (skipped in a search for the latest), not a storage failure (which stops the search)."""
    store = open_store(s3_root if kind == "s3" else str(tmp_path), "run")
    store.save(_snapshot(10))
    opened = store.open(10)
    if kind == "s3":
        s3_client(store.endpoint).put_object(Bucket=BUCKET, Key=object_key(s3_root, 10, "rank-00000.bin"), Body=b"")
    else:
        (tmp_path / "run/step-000000010/rank-00000.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"step-000000010/rank-00000.bin: tensor '.*': read 0 bytes at \d+, "
                                              r"expected \d+ \(truncated\)") as caught:
        opened.read_full()
    assert not isinstance(caught.value, StorageError)


def test_pins_and_retention_on_s3(s3_root):
    store = open_store(s3_root, "run", keep_last=1)
    for step in (0, 10, 20):
        store.save(_snapshot(step))
    store.pin(0, "rollback")
    assert [d.step for d in store.prune()] == [10]
    assert store.list_committed() == [0, 20] and store.pins() == {0: {"rollback"}}
    remaining = s3_client(store.endpoint).list_objects_v2(Bucket=BUCKET, Prefix=object_key(s3_root, 10, ""))
    assert remaining["KeyCount"] == 0


def test_missing_bucket(s3_env):
    store = open_store("s3://no-such-bucket/ckpt", "run", s3_options=FAST_FAIL)
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/ckpt/run/: bucket 'no-such-bucket' does not exist"):
        store.check()
    with pytest.raises(StorageError, match=r"run/step-000000010/MANIFEST.json: bucket 'no-such-bucket' does not"):
        store.save(_snapshot(10))  # its first request clears an earlier partial save of the step


def test_access_denied_is_a_real_403(s3_server, s3_root, monkeypatch):
    """moto checks IAM permissions once authentication is switched on: a user without policies is denied."""
    open_store(s3_root, "run").save(_snapshot(10))
    iam = boto3.client("iam", endpoint_url=s3_server.url, aws_access_key_id=ACCESS_KEY,
                       aws_secret_access_key=SECRET_KEY, region_name="us-east-1")
    user = f"nobody-{uuid.uuid4().hex[:6]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    store = open_store(s3_root, "run", s3_options=FAST_FAIL)
    s3_server.require_auth(True)
    try:
        errors = []
        for attempt in (store.check, lambda: store.load(10), lambda: store.save(_snapshot(20)),
                        store.latest_committed):
            with pytest.raises(StorageError, match="access denied .*check the credentials") as caught:
                attempt()
            errors.append(str(caught.value))
    finally:
        s3_server.require_auth(False)
    assert f"{s3_root}/run/step-000000010/MANIFEST.json: access denied (AccessDenied)" in errors[1]
    assert not any(key["SecretAccessKey"] in e or key["AccessKeyId"] in e for e in errors)


def test_unreachable_endpoint_fails_after_bounded_retries(s3_env, monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    store = open_store(f"s3://{BUCKET}/x", "run", s3_options=S3Options(max_attempts=3, connect_timeout_s=0.5))
    started = time.monotonic()
    with pytest.raises(StorageError, match=rf"step-000000010/MANIFEST.json: deleting failed after 3 attempts at "
                                           rf"{closed} \(EndpointConnectionError.*check AWS_ENDPOINT_URL"):
        store.save(_snapshot(10))
    with pytest.raises(StorageError, match="listing failed after 3 attempts"):
        store.latest_committed()  # an unreachable store is an error, not "no checkpoint"
    assert time.monotonic() - started < 10


@contextlib.contextmanager
def _every_log_record():
    """The records logged at any level inside the block (without pytest's logging plugin, which a run
    may switch off)."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_credentials_appear_in_no_message_event_or_log(s3_env, s3_root, monkeypatch):
    secret = "ShadowTestSecret/9f3c2a7e+DoNotLeak"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    texts = []
    with _every_log_record() as records:
        stores = [open_store(s3_root, "run"), open_store("s3://no-such-bucket/p", "run", s3_options=FAST_FAIL)]
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        stores.append(open_store(s3_root, "run", s3_options=FAST_FAIL))
        for store in stores:
            texts.append(repr(store))
            with AsyncPersister(store) as persister:
                persister.submit(_snapshot(10))
                persister.wait()
                texts += [json.dumps(e.to_event()) for e in persister.poll()]
            try:
                store.load(10)
            except CheckpointError as exc:
                texts.append(str(exc))
    assert sum("checkpoint_committed" in t for t in texts) == 1 and sum("checkpoint_failed" in t for t in texts) == 2
    assert records, "nothing was logged: the check below would pass vacuously"
    texts += [record.getMessage() for record in records]
    assert not [t for t in texts if secret in t or "DoNotLeak" in t]
