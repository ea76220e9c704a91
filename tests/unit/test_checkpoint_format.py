"""Local checkpoints: exact round trip, the files on storage, chunks read back whatever their boxes,
manifest last, and refusal of damaged ones."""

import hashlib
import json

import pytest
import torch

from shadow.checkpoint import CheckpointError, locate_checkpoint, open_store
from shadow.checkpoint.format import MANIFEST
from shadow.checkpoint.tensor_index import INDEX
from shadow.checkpoint.validate import META
from shadow.snapshot import Snapshot

DATA = "rank-00000.bin"


def _snapshot(step=10):
    g = torch.Generator().manual_seed(step)
    tensors = {
        "model.w": torch.randn(8, 4, generator=g),
        "model.scale": torch.ones(3),
        "model.half": torch.randn(5, generator=g).bfloat16(),
        "optim.w.exp_avg": torch.randn(8, 4, generator=g),
        "optim.w.step": torch.tensor(5.0),
        "rng.torch_cpu": torch.get_rng_state(),
    }
    return Snapshot(step, tensors, {"precision": "fp8", "job_hash": "abc", "param_groups": [{"lr": 0.1}]})


def _assert_equal(loaded: dict, original: dict):
    assert set(loaded) == set(original)
    for key, value in original.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


def test_round_trip_is_exact(tmp_path):
    store = open_store(str(tmp_path), "run1")
    original = _snapshot()
    info = store.save(original)
    assert info.step == 10 and info.num_bytes > 0 and info.uri.endswith("run1/step-000000010")
    loaded = store.load(10, expected_job_hash="abc")
    assert loaded.step == 10 and loaded.meta["param_groups"] == [{"lr": 0.1}]
    _assert_equal(loaded.tensors, original.tensors)
    file_store, step = locate_checkpoint("file://" + info.uri)
    assert step == 10 and torch.equal(file_store.load(10).tensors["model.w"], original.tensors["model.w"])
    # the trainer's way: into tensors it already has, in place
    targets = {name: torch.zeros_like(value) for name, value in original.tensors.items()}
    store.open(10, expected_job_hash="abc").read_into(targets)
    _assert_equal(targets, original.tensors)


def test_files_on_storage_are_the_documented_ones(tmp_path):
    """A data file of raw chunk bytes, JSON that describes it, and a manifest of them all: nothing pickled."""
    store = open_store(str(tmp_path), "run1")
    original = _snapshot()
    info = store.save(original)
    step_dir = tmp_path / "run1" / "step-000000010"
    assert sorted(p.name for p in step_dir.iterdir()) == sorted([DATA, INDEX, META, MANIFEST])
    manifest = json.loads((step_dir / MANIFEST).read_text())
    assert manifest["format"] == "shadow-checkpoint/2" and manifest["job_hash"] == "abc"
    listed = {e["path"]: (e["bytes"], e["sha256"]) for e in manifest["files"]}
    assert listed == {name: ((step_dir / name).stat().st_size, hashlib.sha256((step_dir / name).read_bytes())
                             .hexdigest()) for name in (DATA, INDEX, META)}
    assert info.num_bytes == sum(p.stat().st_size for p in step_dir.iterdir())
    data = (step_dir / DATA).read_bytes()
    tensors = json.loads((step_dir / INDEX).read_text())["tensors"]
    assert set(tensors) == set(original.tensors)
    for name, entry in tensors.items():
        (chunk,) = entry["chunks"]  # one process: every tensor whole, in one chunk
        raw = data[chunk["offset"]: chunk["offset"] + chunk["bytes"]]
        assert chunk["sha256"] == hashlib.sha256(raw).hexdigest()
        assert raw == original.tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes(), name
    assert sum(c["bytes"] for e in tensors.values() for c in e["chunks"]) == len(data)
    assert json.loads((step_dir / META).read_text())["step"] == 10


def test_a_tensor_in_chunks_of_any_box_reads_back_whole(tmp_path):
    """As several ranks would have written it: the weight in two column blocks, appended as their own bytes."""
    store = open_store(str(tmp_path), "run1")
    original = _snapshot()
    store.save(original)
    step_dir = tmp_path / "run1" / "step-000000010"
    weight = original.tensors["model.w"]
    index = json.loads((step_dir / INDEX).read_text())
    chunks, end = [], (step_dir / DATA).stat().st_size
    with open(step_dir / DATA, "ab") as f:
        for start, width in ((0, 3), (3, 1)):
            raw = weight[:, start: start + width].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            f.write(raw)
            chunks.append({"offsets": [0, start], "sizes": [8, width], "file": DATA, "offset": end,
                           "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()})
            end += len(raw)
    index["tensors"]["model.w"]["chunks"] = chunks
    (step_dir / INDEX).write_text(json.dumps(index))
    manifest = json.loads((step_dir / MANIFEST).read_text())
    for entry in manifest["files"]:
        data = (step_dir / entry["path"]).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (step_dir / MANIFEST).write_text(json.dumps(manifest))

    fresh = open_store(str(tmp_path), "run1")
    _assert_equal(fresh.load(10).tensors, original.tensors)
    targets = {name: torch.zeros_like(value) for name, value in original.tensors.items()}
    fresh.open(10).read_into(targets)
    _assert_equal(targets, original.tensors)


def test_checkpoint_without_manifest_does_not_exist(tmp_path):
    store = open_store(str(tmp_path), "run1")
    store.save(_snapshot(10))
    store.save(_snapshot(20))
    (tmp_path / "run1" / "step-000000020" / MANIFEST).unlink()  # as if the save died before the manifest
    assert store.list_committed() == [10] and store.latest_committed() == 10
    with pytest.raises(CheckpointError, match="step-000000020/MANIFEST.json: missing"):
        store.load(20)


@pytest.mark.parametrize("file, damage, expected", [
    (DATA, "flip_byte", r"rank-00000\.bin: tensor '.+': the bytes of its chunk at \[.*\] do not match their "
                        r"sha256 in tensors\.json \(corrupted\)"),
    (DATA, "truncate", r"rank-00000\.bin: \d+ bytes, manifest says \d+ \(truncated or replaced\)"),
    (DATA, "delete", r"rank-00000\.bin: listed in the manifest but missing"),
    (INDEX, "flip_byte", r"tensors\.json: sha256 does not match the manifest \(corrupted\)"),
    (INDEX, "truncate", r"tensors\.json: \d+ bytes, manifest says \d+ \(truncated or replaced\)"),
    (META, "delete", r"meta\.json: listed in the manifest but missing"),
], ids=["data-flipped", "data-truncated", "data-deleted", "index-flipped", "index-truncated", "meta-deleted"])
def test_damaged_file_is_named(tmp_path, file, damage, expected):
    store = open_store(str(tmp_path), "run1")
    store.save(_snapshot())
    victim = tmp_path / "run1" / "step-000000010" / file
    data = victim.read_bytes()
    if damage == "flip_byte":
        victim.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        victim.unlink()
    with pytest.raises(CheckpointError, match=f"^{tmp_path}/run1/step-000000010/{expected}$"):
        store.load(10)


def test_manifest_path_traversal_and_foreign_job_are_refused(tmp_path):
    store = open_store(str(tmp_path), "run1")
    store.save(_snapshot())
    with pytest.raises(CheckpointError, match="this job is 'other'"):
        store.load(10, expected_job_hash="other")
    manifest_path = tmp_path / "run1" / "step-000000010" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][0]["path"] = "../../../etc/passwd"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        store.load(10)


def test_bad_checkpoint_uri():
    with pytest.raises(CheckpointError, match="step-000000050"):
        locate_checkpoint("/tmp/not-a-checkpoint")
