"""Hand-made damage to a real checkpoint, each with the manifest re-signed to match: `shadow replay`
refuses it with exit code 2 and one line naming the checkpoint, the file, the key and what was expected.
(Random damage of the same kinds: test_checkpoint_fuzz.py.)"""

import json
import os
import shutil

import pytest
import torch
from checkpoint_damage import (STEP, copy_checkpoint, join_safetensors, make_checkpoint, planted_pickle, refusal,
                               replay, replay_subprocess, resign, rewrite_tensors, set_first_value,
                               split_safetensors)
from conftest import FAST, REPO

from shadow.checkpoint import CheckpointError, open_store
from shadow.checkpoint.format import MANIFEST
from shadow.config import load_job
from shadow.controller.resume import load_resume_point
from shadow.layout import expected_layout
from shadow.trainer import job_hash

META = "meta.json"


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("real"))


@pytest.fixture
def checkpoint(real_checkpoint, tmp_path):
    return copy_checkpoint(real_checkpoint, tmp_path)


def _edit_meta(step_dir, change):
    meta = json.loads((step_dir / META).read_text())
    change(meta)
    (step_dir / META).write_text(json.dumps(meta))


def _meta_text(step_dir, text):
    (step_dir / META).write_text(text)


def _header(step_dir, file, change):
    header, body = split_safetensors((step_dir / file).read_bytes())
    change(header)
    (step_dir / file).write_bytes(join_safetensors(header, body))


def _pop(key):
    return lambda d: d.pop(key)


# (damage, file it is in, the rest of the message after "<checkpoint>/<file>: ")
CASES = {
    "meta_step_string": (lambda d: _edit_meta(d, lambda m: m.update(step="3")), META,
                         "'step': string \"3\"; expected the integer 3 (the checkpoint's step)"),
    "meta_step_bool": (lambda d: _edit_meta(d, lambda m: m.update(step=True)), META,
                       "'step': boolean true; expected the integer 3 (the checkpoint's step)"),
    "meta_precision_int": (lambda d: _edit_meta(d, lambda m: m.update(precision=8)), META,
                           "'precision': integer 8; expected one of ['fp8', 'bf16']"),
    "meta_param_groups_object": (lambda d: _edit_meta(d, lambda m: m.update(param_groups={"lr": 1})), META,
                                 "'param_groups': object {\"lr\": 1}; expected an array of objects "
                                 "(the optimizer's param groups)"),
    "meta_betas_string": (lambda d: _edit_meta(d, lambda m: m["param_groups"][0].update(betas="0.9")), META,
                          "param_groups[0]['betas']: string \"0.9\"; expected array [0.9, 0.95] (the job's "
                          "optimizer)"),
    "meta_lr_negative": (lambda d: _edit_meta(d, lambda m: m["param_groups"][1].update(lr=-1.0)), META,
                         "param_groups[1]['lr']: number -1.0; expected a non-negative number"),
    "meta_job_hash_missing": (lambda d: _edit_meta(d, _pop("job_hash")), META,
                              "'job_hash': missing; expected the manifest's job hash"),
    "meta_unknown_key": (lambda d: _edit_meta(d, lambda m: m.update(hook="os.system")), META,
                         "'hook': unknown key; expected only the keys ['step', 'precision', 'job_hash', "
                         "'job_name', 'param_groups']"),
    "meta_nan_literal": (lambda d: _meta_text(d, '{"step": NaN}'), META, "not valid JSON (NaN is not a JSON number)"),
    "meta_huge_number": (lambda d: _meta_text(d, '{"step": 1e999}'), META,
                         "not valid JSON (number 1e999 overflows a 64-bit float)"),
    "meta_long_integer": (lambda d: _meta_text(d, '{"step": ' + "9" * 5000 + "}"), META,
                          "not valid JSON (integer of 5000 digits)"),
    "meta_deep_nesting": (lambda d: _meta_text(d, '{"step": ' + "[" * 100_000 + "]" * 100_000 + "}"), META,
                          "not valid JSON (nested more than 16 levels deep)"),
    "meta_duplicate_key": (lambda d: _meta_text(d, '{"step": 3, "step": 3}'), META,
                           "not valid JSON (duplicate key 'step')"),
    "meta_top_level_array": (lambda d: _meta_text(d, "[3]"), META, "top level is a JSON array; expected an object"),
    "meta_not_utf8": (lambda d: (d / META).write_bytes(b'{"step": "\xff"}'), META,
                      "not valid JSON (not UTF-8: invalid start byte at byte 10)"),
    "header_dtype_unknown": (lambda d: _header(d, "model.safetensors", lambda h: h["norm.weight"].update(dtype="F4")),
                             "model.safetensors", "tensor 'norm.weight': dtype string \"F4\"; expected one of "
                             "['BF16', 'BOOL', 'F16', 'F32', 'F64', 'F8_E4M3', 'F8_E5M2', 'I16', 'I32', 'I64', 'I8', "
                             "'U8']"),
    "header_offsets_overlap": (lambda d: _header(d, "model.safetensors",
                                                 lambda h: h["norm.weight"].update(data_offsets=[0, 256])),
                               "model.safetensors", "tensor 'norm.weight': data starts at byte 0; expected"),
    "wrong_shape": (lambda d: rewrite_tensors(d / "model.safetensors",
                                              lambda t: t.update({"tok_emb.weight": t["tok_emb.weight"][:-1]})),
                    "model.safetensors", "tensor 'tok_emb.weight': shape [255, 64]; expected [256, 64] (the job's "
                    "model)"),
    "wrong_dtype": (lambda d: rewrite_tensors(d / "optim.safetensors", lambda t: t.update(
        {"norm.weight.exp_avg": t["norm.weight.exp_avg"].bfloat16()})),
                    "optim.safetensors", "tensor 'norm.weight.exp_avg': dtype bfloat16; expected float32 (the job's "
                    "optimizer)"),
    "unexpected_tensor": (lambda d: rewrite_tensors(d / "model.safetensors",
                                                    lambda t: t.update({"extra.weight": torch.zeros(2)})),
                          "model.safetensors", "tensor 'extra.weight': unexpected tensor; expected only tensors of "
                          "the job's model, which has none by this name"),
    "missing_tensor": (lambda d: rewrite_tensors(d / "model.safetensors", _pop("norm.weight")),
                       "model.safetensors", "tensor 'norm.weight': missing; expected shape [64] of float32 (the job's "
                       "model)"),
    "partial_optimizer_state": (lambda d: rewrite_tensors(d / "optim.safetensors", _pop("norm.weight.exp_avg_sq")),
                                "optim.safetensors", "tensor 'norm.weight.exp_avg_sq': missing (the state ['step', "
                                "'exp_avg'] of this parameter is there); expected shape [64] of float32 (the job's "
                                "optimizer)"),
    "rng_state_refused": (lambda d: rewrite_tensors(d / "rng.safetensors", lambda t: t["torch_cpu"].zero_()),
                          "rng.safetensors", "tensor 'torch_cpu': refused by torch (Invalid mt19937 state); expected "
                          "a torch CPU generator state"),
    "manifest_bytes_bool": (None, MANIFEST, "files[0].bytes: boolean true; expected the size of meta.json (a "
                            "non-negative integer)"),
    "manifest_extra_pickle": (None, MANIFEST, "files[5].path: string \"data.pkl\"; expected one of"),
    "manifest_absolute_path": (None, MANIFEST, "file path '/etc/passwd' is outside the checkpoint directory"),
    "pickle_in_place_of_optim": (lambda d: (d / "optim.safetensors").write_bytes(planted_pickle(d / "pwned")),
                                 "optim.safetensors", "not a valid safetensors file (header length"),
    "file_is_symlink": (None, "optim.safetensors", "a symbolic link, not a regular file inside the checkpoint "
                        "directory; links are not followed"),
    "file_is_fifo": (None, "rng.safetensors", "not a regular file (a FIFO, device or directory); a checkpoint holds "
                     "regular files only"),
    "nonfinite_weights": (lambda d: set_first_value(d, "model.safetensors", "tok_emb.weight", float("nan")),
                          "model.safetensors", "tensor 'tok_emb.weight': 1 NaN and 0 Inf among 16384 values; "
                          "expected finite values (--allow-nonfinite replays it anyway)"),
    "nonfinite_optimizer_state": (lambda d: set_first_value(d, "optim.safetensors", "lm_head.weight.exp_avg_sq",
                                                            float("inf")),
                                  "optim.safetensors", "tensor 'lm_head.weight.exp_avg_sq': 0 NaN and 1 Inf among "
                                  "16384 values; expected finite values (--allow-nonfinite replays it anyway)"),
}


def _damage_outside_content(name, step_dir, tmp_path):
    """Damage that is not an edit of a file's bytes (or that must come after re-signing)."""
    if name == "file_is_symlink":  # same bytes, so the manifest still matches: only the link is wrong
        outside = tmp_path / "elsewhere.safetensors"
        (step_dir / "optim.safetensors").rename(outside)
        (step_dir / "optim.safetensors").symlink_to(outside)
    elif name == "file_is_fifo":
        (step_dir / "rng.safetensors").unlink()
        os.mkfifo(step_dir / "rng.safetensors")  # opening it for reading would block for ever
    else:
        manifest = json.loads((step_dir / MANIFEST).read_text())
        if name == "manifest_bytes_bool":
            manifest["files"][0]["bytes"] = True
        elif name == "manifest_absolute_path":
            manifest["files"][1]["path"] = "/etc/passwd"
        else:
            payload = planted_pickle(tmp_path / "pwned")
            (step_dir / "data.pkl").write_bytes(payload)
            manifest["files"].append({"path": "data.pkl", "bytes": len(payload), "sha256": "0" * 64})
        (step_dir / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", list(CASES))
def test_damage_is_refused_with_a_named_one_line_error(checkpoint, tmp_path, name):
    damage, file, expected = CASES[name]
    if damage is None:
        _damage_outside_content(name, checkpoint, tmp_path)
    else:
        damage(checkpoint)
        resign(checkpoint)
    code, stderr = replay(checkpoint, tmp_path / "replay")
    message = refusal(code, stderr, checkpoint, file)
    assert message.startswith(f"{checkpoint}/{file}: {expected}"), message
    assert not (tmp_path / "pwned").exists() and not (checkpoint / "pwned").exists()
    assert not (tmp_path / "replay").exists()  # refused before anything was written


def test_symlinked_step_directory_is_not_followed(real_checkpoint, tmp_path):
    elsewhere = copy_checkpoint(real_checkpoint, tmp_path / "elsewhere")
    link = tmp_path / "ckpt" / "main" / elsewhere.name
    link.parent.mkdir(parents=True)
    link.symlink_to(elsewhere)
    message = refusal(*replay(link, tmp_path / "replay"), link, MANIFEST)
    assert message.endswith("its directory is a symbolic link or not a directory; links are not followed")


def test_nonfinite_weights_replay_only_when_asked(checkpoint, tmp_path):
    set_first_value(checkpoint, "model.safetensors", "norm.weight", float("-inf"))
    resign(checkpoint)
    refusal(*replay(checkpoint, tmp_path / "refused"), checkpoint, "model.safetensors")
    code, stderr = replay(checkpoint, tmp_path / "asked", "--allow-nonfinite")
    assert code == 0, stderr
    rows = [json.loads(line) for line in (tmp_path / "asked" / "trajectory.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [STEP]


def test_amax_history_may_hold_nonfinite_values(checkpoint, tmp_path):
    """An amax history records what a step saw, including the Inf amax of an overflowed step: not damage."""
    set_first_value(checkpoint, "model.safetensors", "blocks.0.attn.wqkv.amax_history", float("inf"))
    resign(checkpoint)
    code, stderr = replay(checkpoint, tmp_path / "replay")
    assert code == 0, stderr


@pytest.mark.parametrize("name", ["meta_step_string", "wrong_shape", "nonfinite_weights"])
def test_refusal_in_a_real_process(checkpoint, tmp_path, name):
    damage, file, expected = CASES[name]
    damage(checkpoint)
    resign(checkpoint)
    message = refusal(*replay_subprocess(checkpoint, tmp_path / "replay"), checkpoint, file)
    assert message.startswith(f"{checkpoint}/{file}: {expected}")


def test_resume_falls_back_past_a_checkpoint_that_does_not_fit_the_job(real_checkpoint, tmp_path):
    """`shadow run --resume` picks its restore point with the same checks (seen here without Ray; the
    whole resume with its `checkpoint_rejected` event: tests/faults/test_input_faults.py)."""
    shutil.copytree(real_checkpoint.parent, tmp_path / "ckpt" / "main")
    step_dir = tmp_path / "ckpt" / "main" / real_checkpoint.name
    set_first_value(step_dir, "model.safetensors", "tok_emb.weight", float("nan"))
    resign(step_dir)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    events = [{"event": "run_started", "precision": "fp8"}] + [
        {"event": "checkpoint_committed", "step": step, "lineage": 0} for step in (0, STEP)]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run_dir / "trajectory.jsonl").write_text("")
    job = load_job(str(REPO / "jobs/tiny.yaml"), FAST[1::2])
    point = load_resume_point(run_dir, "main", str(tmp_path / "ckpt"), job_hash(job), expected_layout(job))
    assert point.restore_step == 0
    (step, error), = point.rejected
    assert step == STEP and error.startswith(f"{step_dir}/model.safetensors: tensor 'tok_emb.weight': 1 NaN")


def test_s3_keys_with_path_walks_are_refused():
    with pytest.raises(CheckpointError, match=r"s3://bucket/a/\.\./b/main: '\.', '\.\.' and empty components"):
        open_store("s3://bucket/a/../b", "main")

