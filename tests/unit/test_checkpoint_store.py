"""The store protocol on a local directory: verified latest, cached verification, no unpickling,
pins and retention, deletion manifest-first. (The same protocol over S3: tests/integration/test_s3_store.py.)"""

import hashlib
import json
import pickle

import pytest
import torch

from shadow.checkpoint import CheckpointError, StorageError, open_store
from shadow.checkpoint.format import MANIFEST
from shadow.checkpoint.local import LocalStore
from shadow.snapshot import Snapshot


def _snapshot(step, job_hash="job-a"):
    g = torch.Generator().manual_seed(step)
    tensors = {"model.w": torch.randn(16, 8, generator=g), "optim.w.exp_avg": torch.randn(16, 8, generator=g),
               "rng.torch_cpu": torch.get_rng_state()}
    return Snapshot(step, tensors, {"precision": "bf16", "job_hash": job_hash, "param_groups": []})


class CountingStore(LocalStore):
    """Counts file reads, to see what verification re-reads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = []

    def _get(self, path):
        self.reads.append(path)
        return super()._get(path)


def _damage(path, how):
    data = path.read_bytes()
    if how == "flip_byte":
        path.write_bytes(data[:40] + bytes([data[40] ^ 0x01]) + data[41:])
    elif how == "truncate":
        path.write_bytes(data[:-7])
    else:
        path.unlink()


class Exploit:
    """A pickle whose loading creates `marker`: proof of execution if it is ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["flip_byte", "truncate", "delete"])
def test_latest_committed_skips_damaged_checkpoint(tmp_path, how):
    store = open_store(str(tmp_path), "run")
    for step in (10, 20):
        store.save(_snapshot(step))
    _damage(tmp_path / "run" / "step-000000020" / "model.safetensors", how)
    fresh = open_store(str(tmp_path), "run")  # no verification remembered from the saves
    assert fresh.list_committed() == [10, 20]  # the manifest is there ...
    assert fresh.latest_committed() == 10  # ... but the files do not match it
    with pytest.raises(CheckpointError, match=r"step-000000020/model\.safetensors"):
        fresh.load(20)


def test_latest_committed_skips_foreign_job_and_run(tmp_path):
    store = open_store(str(tmp_path), "run")
    store.save(_snapshot(10))
    store.save(_snapshot(20, job_hash="job-b"))
    assert store.latest_committed("job-a") == 10 and store.latest_committed() == 20
    with pytest.raises(CheckpointError, match=r"step-000000020/MANIFEST\.json: written by job 'job-b'"):
        store.load(20, expected_job_hash="job-a")
    other = open_store(str(tmp_path), "other")
    other.save(_snapshot(30))
    (tmp_path / "other" / "step-000000030").rename(tmp_path / "run" / "step-000000030")  # copied in
    assert store.latest_committed() == 20
    with pytest.raises(CheckpointError, match=r"step-000000030/MANIFEST\.json: written by run 'other'"):
        store.load(30)


def test_verification_is_cached_per_manifest(tmp_path):
    open_store(str(tmp_path), "run").save(_snapshot(10))
    store = CountingStore(str(tmp_path), "run")
    assert store.latest_committed() == 10
    assert len(store.reads) == 1 + 4 + 1  # manifest, four tensor files, meta.json
    store.reads.clear()
    assert store.latest_committed() == 10
    assert store.reads == ["step-000000010/MANIFEST.json"]
    # a new manifest (a re-save of the step) is verified afresh
    open_store(str(tmp_path), "run").save(_snapshot(10, job_hash="job-c"))
    store.reads.clear()
    assert store.latest_committed() == 10 and len(store.reads) == 6
    # load() verifies what it reads even when the checkpoint verified before
    _damage(tmp_path / "run" / "step-000000010" / "optim.safetensors", "flip_byte")
    with pytest.raises(CheckpointError, match="optim.safetensors: sha256 does not match"):
        store.load(10)
    assert store.latest_committed() is None  # and remembers the failure


def test_planted_pickles_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Exploit(str(marker)))
    pickle.loads(pickle.dumps(Exploit(str(tmp_path / "live"))))
    assert (tmp_path / "live").exists()  # the payload is live: loading it would leave the marker

    store = open_store(str(tmp_path / "ckpt"), "run")
    store.save(_snapshot(10))
    store.save(_snapshot(20))
    step_dir = tmp_path / "ckpt" / "run" / "step-000000020"
    (step_dir / "model.pt").write_bytes(payload)  # an extra file: not in the manifest, never opened
    assert torch.equal(store.load(20).tensors["model.w"], _snapshot(20).tensors["model.w"])
    (step_dir / "model.safetensors").write_bytes(payload)  # a replaced file: fails its hash
    with pytest.raises(CheckpointError, match="model.safetensors: .* bytes, manifest says"):
        store.load(20)
    # even with the manifest forged to match, the file is parsed as safetensors, never unpickled
    manifest = json.loads((step_dir / MANIFEST).read_text())
    for entry in manifest["files"]:
        if entry["path"] == "model.safetensors":
            entry.update(bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    (step_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="model.safetensors: not a valid safetensors file"):
        store.load(20)
    with pytest.raises(CheckpointError, match="model.safetensors: not a valid safetensors file"):
        open_store(str(tmp_path / "ckpt"), "run").verify(20)
    assert open_store(str(tmp_path / "ckpt"), "run").latest_committed() == 10
    assert not marker.exists()


def test_retention_keeps_newest_pinned_and_latest_valid(tmp_path):
    store = open_store(str(tmp_path), "run", keep_last=2)
    for step in range(0, 60, 10):
        store.save(_snapshot(step))
    store.pin(10, "replay-1")
    store.pin(10, "rollback")
    deleted = store.prune()
    assert [d.step for d in deleted] == [0, 20, 30] and "keep_last=2" in deleted[0].reason
    assert store.list_committed() == [10, 40, 50] and store.pins() == {10: {"replay-1", "rollback"}}
    store.unpin(10, "replay-1")
    assert store.prune() == []  # still held for the rollback
    store.unpin(10, "rollback")
    assert [d.step for d in store.prune()] == [10]
    # the two newest are damaged: the newest valid one is kept although it is beyond keep_last
    store.save(_snapshot(60))
    for step in (50, 60):
        _damage(tmp_path / "run" / f"step-{step:09d}" / "optim.safetensors", "truncate")
    fresh = open_store(str(tmp_path), "run", keep_last=2)
    assert fresh.prune() == [] and fresh.latest_committed() == 40


def test_pin_and_delete_rules(tmp_path):
    store = open_store(str(tmp_path), "run")
    store.save(_snapshot(10))
    with pytest.raises(CheckpointError, match="step-000000020/MANIFEST.json: missing"):
        store.pin(20, "replay-2")
    store.pin(10, "replay-1")
    with pytest.raises(CheckpointError, match=r"pinned by \['replay-1'\]; unpin it"):
        store.delete(10)
    store.unpin(10, "replay-1")
    store.delete(10)
    assert store.list_committed() == [] and not (tmp_path / "run" / "step-000000010").exists()


def test_deletion_removes_the_manifest_first(tmp_path):
    class FailingTreeRemoval(LocalStore):
        def _remove_tree(self, directory):
            if (self._path(directory) / "model.safetensors").exists():
                raise StorageError(f"{directory}: disk went away")

    store = FailingTreeRemoval(str(tmp_path), "run")
    store.save(_snapshot(10))
    with pytest.raises(StorageError, match="disk went away"):
        store.delete(10)
    step_dir = tmp_path / "run" / "step-000000010"
    assert (step_dir / "model.safetensors").exists() and not (step_dir / MANIFEST).exists()
    assert store.list_committed() == [] and store.latest_committed() is None


def test_unwritable_location_fails_fast(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="cannot create the checkpoint directory"):
        open_store(str(blocker / "ckpt"), "run").check()
