"""Local checkpoints: exact round trip, manifest last, and refusal of damaged ones."""

import json

import pytest
import torch

from shadow.checkpoint import CheckpointError, locate_checkpoint, open_store
from shadow.checkpoint.format import MANIFEST
from shadow.snapshot import Snapshot


def _snapshot(step=10):
    g = torch.Generator().manual_seed(step)
    tensors = {
        "model.w": torch.randn(8, 4, generator=g),
        "model.scale": torch.ones(3),
        "optim.w.exp_avg": torch.randn(8, 4, generator=g),
        "optim.w.step": torch.tensor(5.0),
        "rng.torch_cpu": torch.get_rng_state(),
    }
    return Snapshot(step, tensors, {"precision": "fp8", "job_hash": "abc", "param_groups": [{"lr": 0.1}]})


def test_round_trip_is_exact(tmp_path):
    store = open_store(str(tmp_path), "run1")
    original = _snapshot()
    info = store.save(original)
    assert info.step == 10 and info.num_bytes > 0 and info.uri.endswith("run1/step-000000010")
    loaded = store.load(10, expected_job_hash="abc")
    assert loaded.step == 10 and loaded.meta["param_groups"] == [{"lr": 0.1}]
    assert set(loaded.tensors) == set(original.tensors)
    for key, value in original.tensors.items():
        assert torch.equal(loaded.tensors[key], value), key
    file_store, step = locate_checkpoint("file://" + info.uri)
    assert step == 10 and torch.equal(file_store.load(10).tensors["model.w"], original.tensors["model.w"])


def test_checkpoint_without_manifest_does_not_exist(tmp_path):
    store = open_store(str(tmp_path), "run1")
    store.save(_snapshot(10))
    store.save(_snapshot(20))
    (tmp_path / "run1" / "step-000000020" / MANIFEST).unlink()  # as if the save died before the manifest
    assert store.list_committed() == [10] and store.latest_committed() == 10
    with pytest.raises(CheckpointError, match="step-000000020/MANIFEST.json: missing"):
        store.load(20)


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete"])
def test_damaged_file_is_named(tmp_path, damage):
    store = open_store(str(tmp_path), "run1")
    store.save(_snapshot())
    victim = tmp_path / "run1" / "step-000000010" / "optim.safetensors"
    data = victim.read_bytes()
    if damage == "flip_byte":
        victim.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        victim.unlink()
    with pytest.raises(CheckpointError, match="optim.safetensors"):
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
