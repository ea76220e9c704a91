"""The store protocol on a local directory: verified latest, cached verification, no unpickling,
pins and retention, deletion manifest-first. (The same protocol over S3: tests/integration/test_s3_store.py.)"""

import pickle

import pytest
import torch
from checkpoint_damage import resign

from shadow.checkpoint import CheckpointError, StorageError, open_store
from shadow.checkpoint.format import MANIFEST
from shadow.checkpoint.local import LocalStore
from shadow.checkpoint.tensor_index import INDEX
from shadow.checkpoint.validate import META
from shadow.snapshot import Snapshot

DATA = "rank-00000.bin"


def _snapshot(step, job_hash="job-a"):
    g = torch.Generator().manual_seed(step)
    tensors = {"model.w": torch.randn(16, 8, generator=g), "optim.w.exp_avg": torch.randn(16, 8, generator=g),
               "rng.torch_cpu": torch.get_rng_state()}
    return Snapshot(step, tensors, {"precision": "bf16", "job_hash": job_hash, "param_groups": []})


class CountingStore(LocalStore):
    """Records file reads (whole, or a byte range of a data file), to see what verification re-reads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = []

    def _get(self, path):
        self.reads.append(path)
        return super()._get(path)

    def _read_range(self, path, offset, length):
        self.reads.append(path)
        return super()._read_range(path, offset, length)


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
    _damage(tmp_path / "run" / "step-000000020" / DATA, how)
    fresh = open_store(str(tmp_path), "run")  # no verification remembered from the saves
    assert fresh.list_committed() == [10, 20]  # the manifest is there ...
    assert fresh.latest_committed() == 10  # ... but the files do not match it
    with pytest.raises(CheckpointError, match=r"step-000000020/rank-00000\.bin: "):
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
    every_file = [f"step-000000010/{name}" for name in (MANIFEST, META, DATA, INDEX)]  # the data file: one block
    assert store.latest_committed() == 10
    assert store.reads == every_file
    store.reads.clear()
    assert store.latest_committed() == 10
    assert store.reads == ["step-000000010/MANIFEST.json"]
    # a new manifest (a re-save of the step) is verified afresh
    open_store(str(tmp_path), "run").save(_snapshot(10, job_hash="job-c"))
    store.reads.clear()
    assert store.latest_committed() == 10 and store.reads == every_file
    # load() checks every chunk it reads even when the checkpoint verified before ...
    _damage(tmp_path / "run" / "step-000000010" / DATA, "flip_byte")
    with pytest.raises(CheckpointError, match=r"rank-00000\.bin: tensor 'model\.w': the bytes of its chunk at "
                       r"\[0, 0\] do not match their sha256 in tensors\.json"):
        store.load(10)
    store.reads.clear()
    assert store.latest_committed() is None  # ... and remembers the failure
    assert store.reads == ["step-000000010/MANIFEST.json"]
    with pytest.raises(CheckpointError, match=r"rank-00000\.bin: tensor 'model\.w': the bytes of its chunk"):
        store.verify(10)


def test_planted_pickles_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Exploit(str(marker)))
    pickle.loads(pickle.dumps(Exploit(str(tmp_path / "live"))))
    assert (tmp_path / "live").exists()  # the payload is live: loading it would leave the marker

    store = open_store(str(tmp_path / "ckpt"), "run")
    store.save(_snapshot(10))
    store.save(_snapshot(20))
    step_dir = tmp_path / "ckpt" / "run" / "step-000000020"
    # extra files, not in the manifest, are never opened (the last two are the names DCP's own writer pickles to)
    for name in ("model.pt", ".metadata", "__0_0.distcp"):
        (step_dir / name).write_bytes(payload)
    assert torch.equal(store.load(20).tensors["model.w"], _snapshot(20).tensors["model.w"])
    original = {name: (step_dir / name).read_bytes() for name in (INDEX, DATA)}
    for name, expected in ((INDEX, r"tensors\.json: not valid JSON \(not UTF-8: invalid start byte at byte 0\)"),
                           (DATA, r"tensors\.json: tensor '.+' chunks\[0\]: bytes \[\d+, \d+\) of "
                                  r"rank-00000\.bin; expected a range inside its \d+ bytes")):
        (step_dir / name).write_bytes(payload)  # a replaced file: fails its size
        with pytest.raises(CheckpointError, match=f"{name}: .* bytes, manifest says"):
            store.load(20)
        # even with the manifest forged to match, JSON is parsed as JSON and data is read as raw bytes
        resign(step_dir)
        with pytest.raises(CheckpointError, match=expected):
            store.load(20)
        with pytest.raises(CheckpointError, match=expected):
            open_store(str(tmp_path / "ckpt"), "run").verify(20)
        (step_dir / name).write_bytes(original[name])
        resign(step_dir)
    assert open_store(str(tmp_path / "ckpt"), "run").latest_committed() == 20  # restored, and never executed
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
        _damage(tmp_path / "run" / f"step-{step:09d}" / DATA, "truncate")
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
            if (self._path(directory) / DATA).exists():
                raise StorageError(f"{directory}: disk went away")

    store = FailingTreeRemoval(str(tmp_path), "run")
    store.save(_snapshot(10))
    with pytest.raises(StorageError, match="disk went away"):
        store.delete(10)
    step_dir = tmp_path / "run" / "step-000000010"
    assert (step_dir / DATA).exists() and not (step_dir / MANIFEST).exists()
    assert store.list_committed() == [] and store.latest_committed() is None


def test_unwritable_location_fails_fast(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="cannot create the checkpoint directory"):
        open_store(str(blocker / "ckpt"), "run").check()
