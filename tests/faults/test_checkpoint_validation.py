"""Hand-made damage to a real checkpoint, most with the manifest re-signed to match: `shadow replay`
refuses it with exit code 2 and one line naming the checkpoint, the file, the key and what was expected.
(Random damage of the same kinds: test_checkpoint_fuzz.py.)"""

import json
import os
import re
import shutil

import pytest
import torch
from checkpoint_damage import (DATA, STEP, copy_checkpoint, edit_index, edit_json, flip_byte, make_checkpoint,
                               planted_pickle, refusal, replay, replay_subprocess, resign, rewrite_tensors,
                               set_first_value)
from conftest import FAST, REPO

from shadow.checkpoint import CheckpointError, locate_checkpoint, open_store
from shadow.checkpoint.format import MANIFEST
from shadow.checkpoint.tensor_index import INDEX
from shadow.checkpoint.validate import META
from shadow.config import load_job
from shadow.controller.resume import load_resume_point
from shadow.layout import expected_layout
from shadow.trainer import job_hash

JOB = load_job(str(REPO / "jobs/tiny.yaml"), FAST[1::2])
EMB = "model.tok_emb.weight"  # [256, 64] float32: the first 65536 bytes of the data file


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("real"))


@pytest.fixture
def checkpoint(real_checkpoint, tmp_path):
    return copy_checkpoint(real_checkpoint, tmp_path)


def _edit_meta(step_dir, change):
    edit_json(step_dir / META, change)


def _meta_text(step_dir, text):
    (step_dir / META).write_text(text)


def _edit_chunk(step_dir, name, change):
    """Edit the first (here the only) chunk of tensor `name` in the index."""
    edit_index(step_dir, lambda tensors: change(tensors[name]["chunks"][0]))


def _split_overlapping(tensors):
    """Two chunks of the embedding whose boxes share rows 128..159 (each byte range holds its own box)."""
    first = tensors[EMB]["chunks"][0]
    tensors[EMB]["chunks"] = [dict(first, sizes=[160, 64], bytes=160 * 64 * 4),
                              dict(first, offsets=[128, 0], sizes=[128, 64], offset=128 * 64 * 4, bytes=128 * 64 * 4)]


def _pop(key):
    return lambda d: d.pop(key)


def _truncate(step_dir, length):
    (step_dir / DATA).write_bytes((step_dir / DATA).read_bytes()[:length])


def _old_format_manifest(step_dir):
    """A shadow-checkpoint/1 manifest: one safetensors file per group, written before sharded checkpoints."""
    def change(manifest):
        manifest["format"] = "shadow-checkpoint/1"
        manifest["files"] = [dict(manifest["files"][0], path=name) for name in
                             ("model.safetensors", "optim.safetensors", "rng.safetensors", "meta.json")]

    edit_json(step_dir / MANIFEST, change)


def _any(pattern):
    """An expected message part with a variable middle: `...` stands for any text."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("...")))


# (damage, whether to re-sign the manifest after it, file the message names, the rest of the message after
# "<checkpoint>/<file>: ": its start, or a pattern it must match whole)
CASES = {
    # meta.json: values and JSON that a strict reader refuses
    "meta_step_string": (lambda d: _edit_meta(d, lambda m: m.update(step="3")), True, META,
                         "'step': string \"3\"; expected the integer 3 (the checkpoint's step)"),
    "meta_step_bool": (lambda d: _edit_meta(d, lambda m: m.update(step=True)), True, META,
                       "'step': boolean true; expected the integer 3 (the checkpoint's step)"),
    "meta_precision_int": (lambda d: _edit_meta(d, lambda m: m.update(precision=8)), True, META,
                           "'precision': integer 8; expected one of ['fp8', 'bf16']"),
    "meta_param_groups_object": (lambda d: _edit_meta(d, lambda m: m.update(param_groups={"lr": 1})), True, META,
                                 "'param_groups': object {\"lr\": 1}; expected an array of objects "
                                 "(the optimizer's param groups)"),
    "meta_betas_string": (lambda d: _edit_meta(d, lambda m: m["param_groups"][0].update(betas="0.9")), True, META,
                          "param_groups[0]['betas']: string \"0.9\"; expected array [0.9, 0.95] (the job's "
                          "optimizer)"),
    "meta_lr_negative": (lambda d: _edit_meta(d, lambda m: m["param_groups"][1].update(lr=-1.0)), True, META,
                         "param_groups[1]['lr']: number -1.0; expected a non-negative number"),
    "meta_job_hash_missing": (lambda d: _edit_meta(d, _pop("job_hash")), True, META,
                              f"'job_hash': missing; expected the manifest's job hash {job_hash(JOB)!r}"),
    "meta_unknown_key": (lambda d: _edit_meta(d, lambda m: m.update(hook="os.system")), True, META,
                         "'hook': unknown key; expected only the keys ['step', 'precision', 'job_hash', "
                         "'job_name', 'num_micro_batches', 'param_groups']"),
    "meta_nan_literal": (lambda d: _meta_text(d, '{"step": NaN}'), True, META,
                         "not valid JSON (NaN is not a JSON number)"),
    "meta_huge_number": (lambda d: _meta_text(d, '{"step": 1e999}'), True, META,
                         "not valid JSON (number 1e999 overflows a 64-bit float)"),
    "meta_long_integer": (lambda d: _meta_text(d, '{"step": ' + "9" * 5000 + "}"), True, META,
                          "not valid JSON (integer of 5000 digits)"),
    "meta_deep_nesting": (lambda d: _meta_text(d, '{"step": ' + "[" * 100_000 + "]" * 100_000 + "}"), True, META,
                          "not valid JSON (nested more than 16 levels deep)"),
    "meta_duplicate_key": (lambda d: _meta_text(d, '{"step": 3, "step": 3}'), True, META,
                           "not valid JSON (duplicate key 'step')"),
    "meta_top_level_array": (lambda d: _meta_text(d, "[3]"), True, META,
                             "top level is a JSON array; expected an object"),
    "meta_not_utf8": (lambda d: (d / META).write_bytes(b'{"step": "\xff"}'), True, META,
                      "not valid JSON (not UTF-8: invalid start byte at byte 10)"),
    # tensors.json: an index that does not describe the data files, checked before any byte of them is read
    "index_pickled": (lambda d: (d / INDEX).write_bytes(planted_pickle(d / "pwned")), True, INDEX,
                      "not valid JSON (not UTF-8: invalid start byte at byte 0)"),
    "index_unknown_dtype": (lambda d: edit_index(d, lambda t: t["model.norm.weight"].update(dtype="float4")), True,
                            INDEX, "tensor 'model.norm.weight' dtype: string \"float4\"; expected one of "
                            "['bfloat16', 'bool', 'float16', 'float32', 'float64', 'float8_e4m3fn', 'float8_e5m2', "
                            "'int16', 'int32', 'int64', 'int8', 'uint8']"),
    "index_unknown_key": (lambda d: edit_json(d / INDEX, lambda i: i.update(loader="torch.load")), True, INDEX,
                          "'loader': unknown key; expected only 'format' and 'tensors'"),
    "chunks_overlap": (lambda d: edit_index(d, _split_overlapping), True, INDEX,
                       f"tensor {EMB!r}: chunks at [0, 0] and [128, 0] overlap; expected chunks that cover the "
                       "tensor once"),
    "chunks_do_not_cover": (lambda d: _edit_chunk(d, EMB, lambda c: c.update(sizes=[128, 64], bytes=32768)), True,
                            INDEX, f"tensor {EMB!r}: chunks cover 8192 of its 16384 values; expected chunks that "
                            "cover the tensor once"),
    "chunk_beyond_file": (lambda d: _edit_chunk(d, EMB, lambda c: c.update(offset=(d / DATA).stat().st_size - 100)),
                          True, INDEX, _any(f"tensor {EMB!r} chunks[0]: bytes [..., ...) of {DATA}; expected a "
                                            "range inside its ... bytes")),
    "chunk_bytes_not_its_sizes": (lambda d: _edit_chunk(d, EMB, lambda c: c.update(bytes=65532)), True, INDEX,
                                  f"tensor {EMB!r} chunks[0].bytes: integer 65532; expected 65536 (the chunk's "
                                  "16384 values of float32)"),
    "chunk_unknown_key": (lambda d: _edit_chunk(d, EMB, lambda c: c.update(codec="pickle")), True, INDEX,
                          f"tensor {EMB!r} chunks[0] 'codec': unknown key; expected only 'offsets', 'sizes', "
                          "'file', 'offset', 'bytes' and 'sha256'"),
    "chunk_file_not_listed": (lambda d: _edit_chunk(d, EMB, lambda c: c.update(file="rank-00001.bin")), True, INDEX,
                              f"tensor {EMB!r} chunks[0].file: string \"rank-00001.bin\"; expected a data file the "
                              f"manifest lists (['{DATA}'])"),
    # tensors that do not fit the job, saved as a real save writes them (every hash matches)
    "wrong_shape": (lambda d: rewrite_tensors(d, lambda t: t.update({EMB: t[EMB][:-1]})), False, INDEX,
                    f"tensor {EMB!r}: shape [255, 64]; expected [256, 64] (the job's model)"),
    "wrong_dtype": (lambda d: rewrite_tensors(d, lambda t: t.update(
        {"optim.norm.weight.exp_avg": t["optim.norm.weight.exp_avg"].bfloat16()})), False, INDEX,
                    "tensor 'optim.norm.weight.exp_avg': dtype bfloat16; expected float32 (the job's optimizer)"),
    "unexpected_tensor": (lambda d: rewrite_tensors(d, lambda t: t.update({"model.extra.weight": torch.zeros(2)})),
                          False, INDEX, "tensor 'model.extra.weight': unexpected tensor; expected only tensors of "
                          "the job's model, which has none by this name"),
    "unexpected_group": (lambda d: rewrite_tensors(d, lambda t: t.update({"hook\rline": torch.zeros(2)})), False,
                         INDEX, "tensor 'hook\\rline': unexpected tensor; expected only names under ['model.', "
                         "'optim.', 'precision.', 'rng.']"),
    "missing_tensor": (lambda d: rewrite_tensors(d, _pop("model.norm.weight")), False, INDEX,
                       "tensor 'model.norm.weight': missing; expected shape [64] of float32 (the job's model)"),
    "partial_optimizer_state": (lambda d: rewrite_tensors(d, _pop("optim.norm.weight.exp_avg_sq")), False, INDEX,
                                "tensor 'optim.norm.weight.exp_avg_sq': missing (the state ['step', 'exp_avg'] of "
                                "this parameter is there); expected shape [64] of float32 (the job's optimizer)"),
    "rng_state_refused": (lambda d: rewrite_tensors(d, lambda t: t["rng.torch_cpu"].zero_()), False, DATA,
                          "tensor 'rng.torch_cpu': refused by torch (Invalid mt19937 state); expected a torch CPU "
                          "generator state"),
    "nonfinite_weights": (lambda d: set_first_value(d, EMB, float("nan")), False, DATA,
                          f"tensor {EMB!r}: 1 NaN and 0 Inf among 16384 values; expected finite values "
                          "(--allow-nonfinite replays it anyway)"),
    "nonfinite_optimizer_state": (lambda d: set_first_value(d, "optim.lm_head.weight.exp_avg_sq", float("inf")),
                                  False, DATA, "tensor 'optim.lm_head.weight.exp_avg_sq': 0 NaN and 1 Inf among "
                                  "16384 values; expected finite values (--allow-nonfinite replays it anyway)"),
    # the data file: its bytes are checked chunk by chunk as they are read, its size against the manifest
    "data_flipped_byte": (lambda d: flip_byte(d / DATA, 100), False, DATA,
                          f"tensor {EMB!r}: the bytes of its chunk at [0, 0] do not match their sha256 in "
                          f"{INDEX} (corrupted)"),
    "data_flipped_byte_resigned": (lambda d: flip_byte(d / DATA, 100), True, DATA,
                                   f"tensor {EMB!r}: the bytes of its chunk at [0, 0] do not match their sha256 in "
                                   f"{INDEX} (corrupted)"),
    "data_missing": (lambda d: (d / DATA).unlink(), False, DATA, "listed in the manifest but missing"),
    "data_truncated": (lambda d: _truncate(d, 1000), False, DATA,
                       _any("1000 bytes, manifest says ... (truncated or replaced)")),
    "data_truncated_resigned": (lambda d: _truncate(d, 1000), True, INDEX,
                                _any("tensor '...' chunks[0]: bytes [..., ...) of rank-00000.bin; expected a range "
                                     "inside its 1000 bytes")),
    "pickle_in_place_of_data": (lambda d: (d / DATA).write_bytes(planted_pickle(d / "pwned")), True, INDEX,
                                _any(f"tensor '...' chunks[0]: bytes [..., ...) of {DATA}; expected a range inside "
                                     "its ... bytes")),
    "pickle_padded_in_place_of_data": (lambda d: (d / DATA).write_bytes(planted_pickle(d / "pwned").ljust(
        (d / DATA).stat().st_size, b"\0")), True, DATA,
                                       _any(f"tensor '...': the bytes of its chunk at [...] do not match their sha256 "
                                            f"in {INDEX} (corrupted)")),
    # the manifest
    "manifest_bytes_bool": (lambda d: edit_json(d / MANIFEST, lambda m: m["files"][0].update(bytes=True)), False,
                            MANIFEST, "files[0].bytes: boolean true; expected the size of meta.json (a "
                            "non-negative integer)"),
    "manifest_lists_a_pickle": (None, False, MANIFEST, "files[3].path: string \"data.pkl\"; expected one of "
                                f"['{INDEX}', '{META}'] or a data file rank-NNNNN.bin"),
    "manifest_absolute_path": (lambda d: edit_json(d / MANIFEST, lambda m: m["files"][1].update(path="/etc/passwd")),
                               False, MANIFEST, "file path '/etc/passwd' is outside the checkpoint directory"),
    "manifest_old_format": (_old_format_manifest, False, MANIFEST,
                            "a shadow-checkpoint/1 checkpoint (written before sharded checkpoints); this version of "
                            "shadow reads shadow-checkpoint/2: start the run anew"),
    "foreign_run": (lambda d: edit_json(d / MANIFEST, lambda m: m.update(run="other")), False, MANIFEST,
                    "written by run 'other', this store is run 'main'; point --checkpoint at the run that wrote it"),
    "foreign_job": (lambda d: edit_json(d / MANIFEST, lambda m: m.update(job_hash="0123456789abcdef")), False,
                    MANIFEST, f"written by job '0123456789abcdef', this job is {job_hash(JOB)!r}; use the job config "
                    "(and --set overrides) of the run that wrote it"),
    # files that are not regular files
    "data_is_symlink": (None, False, DATA, "a symbolic link, not a regular file inside the checkpoint directory; "
                        "links are not followed"),
    "index_is_fifo": (None, False, INDEX, "not a regular file (a FIFO, device or directory); a checkpoint holds "
                      "regular files only"),
}


def _damage_outside_content(name, step_dir, tmp_path):
    """Damage that is not an edit of a file's content."""
    if name == "data_is_symlink":  # same bytes, so the manifest still matches: only the link is wrong
        outside = tmp_path / "elsewhere.bin"
        (step_dir / DATA).rename(outside)
        (step_dir / DATA).symlink_to(outside)
    elif name == "index_is_fifo":
        (step_dir / INDEX).unlink()
        os.mkfifo(step_dir / INDEX)  # opening it for reading would block for ever
    else:
        payload = planted_pickle(tmp_path / "pwned")
        (step_dir / "data.pkl").write_bytes(payload)
        edit_json(step_dir / MANIFEST, lambda m: m["files"].append({"path": "data.pkl", "bytes": len(payload),
                                                                     "sha256": "0" * 64}))


def _assert_names(message, checkpoint, file, expected):
    rest = message[len(f"{checkpoint}/{file}: "):]
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(rest), message
    else:
        assert rest.startswith(expected), message


@pytest.mark.parametrize("name", list(CASES))
def test_damage_is_refused_with_a_named_one_line_error(checkpoint, tmp_path, name):
    damage, resigned, file, expected = CASES[name]
    if damage is None:
        _damage_outside_content(name, checkpoint, tmp_path)
    else:
        damage(checkpoint)
    if resigned:
        resign(checkpoint)
    code, stderr = replay(checkpoint, tmp_path / "replay")
    _assert_names(refusal(code, stderr, checkpoint, file), checkpoint, file, expected)
    assert not (tmp_path / "pwned").exists() and not (checkpoint / "pwned").exists()
    assert not (tmp_path / "replay").exists()  # refused before anything was written


def test_an_unlisted_pickle_is_never_opened(checkpoint, tmp_path):
    """A file the manifest does not list is not part of the checkpoint: the replay runs, and never reads it."""
    for name in ("data.pkl", ".metadata", "__0_0.distcp"):  # DCP's own file names, of its pickling writer
        (checkpoint / name).write_bytes(planted_pickle(tmp_path / "pwned"))
    code, stderr = replay(checkpoint, tmp_path / "replay")
    assert code == 0, stderr
    assert not (tmp_path / "pwned").exists()


def test_a_flipped_byte_fails_the_file_hash_in_verify(checkpoint):
    """Without the job's layout, `verify` hashes every file whole; with it, it reads every chunk."""
    flip_byte(checkpoint / DATA, 100)
    store, step = locate_checkpoint(str(checkpoint))
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(checkpoint))}/{DATA}: sha256 does not match the "
                       r"manifest \(corrupted\)$"):
        store.verify(step, job_hash(JOB))
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(checkpoint))}/{DATA}: tensor {EMB!r}: the bytes "
                       "of its chunk at"):
        store.verify(step, job_hash(JOB), layout=expected_layout(JOB))


def test_symlinked_step_directory_is_not_followed(real_checkpoint, tmp_path):
    elsewhere = copy_checkpoint(real_checkpoint, tmp_path / "elsewhere")
    link = tmp_path / "ckpt" / "main" / elsewhere.name
    link.parent.mkdir(parents=True)
    link.symlink_to(elsewhere)
    message = refusal(*replay(link, tmp_path / "replay"), link, MANIFEST)
    assert message.endswith("its directory is a symbolic link or not a directory; links are not followed")


@pytest.mark.parametrize("tensor", ["model.norm.weight", "optim.lm_head.weight.exp_avg_sq"])
def test_nonfinite_state_replays_only_when_asked(checkpoint, tmp_path, tensor):
    set_first_value(checkpoint, tensor, float("-inf"))
    message = refusal(*replay(checkpoint, tmp_path / "refused"), checkpoint, DATA)
    assert message.startswith(f"{checkpoint}/{DATA}: tensor {tensor!r}: 0 NaN and 1 Inf among")
    code, stderr = replay(checkpoint, tmp_path / "asked", "--allow-nonfinite")
    assert code == 0, stderr
    rows = [json.loads(line) for line in (tmp_path / "asked" / "trajectory.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [STEP]


def test_amax_history_may_hold_nonfinite_values(checkpoint, tmp_path):
    """An amax history records what a step saw, including the Inf amax of an overflowed step: not damage."""
    set_first_value(checkpoint, "model.blocks.0.attn.wqkv.amax_history", float("inf"))
    code, stderr = replay(checkpoint, tmp_path / "replay")
    assert code == 0, stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the CUDA RNG state would be applied, not skipped")
def test_a_gpu_runs_checkpoint_replays_on_a_cpu(checkpoint, tmp_path):
    """A GPU run's checkpoint also holds the CUDA generator's state: a CPU replay reads it and leaves it
    unapplied, and re-trains exactly what the same checkpoint without it re-trains."""
    code, stderr = replay(checkpoint, tmp_path / "plain")
    assert code == 0, stderr
    rewrite_tensors(checkpoint, lambda t: t.update({"rng.torch_cuda": torch.arange(16, dtype=torch.uint8)}))
    assert "rng.torch_cuda" in json.loads((checkpoint / INDEX).read_text())["tensors"]
    code, stderr = replay(checkpoint, tmp_path / "gpu")
    assert code == 0, stderr
    assert _losses(tmp_path / "gpu") == _losses(tmp_path / "plain")


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "trajectory.jsonl").read_text().splitlines()]


@pytest.mark.slow  # a process that imports torch: ~8 s each
@pytest.mark.parametrize("name", ["index_pickled", "wrong_shape", "nonfinite_weights"])
def test_refusal_in_a_real_process(checkpoint, tmp_path, name):
    damage, resigned, file, expected = CASES[name]
    damage(checkpoint)
    if resigned:
        resign(checkpoint)
    message = refusal(*replay_subprocess(checkpoint, tmp_path / "replay"), checkpoint, file)
    _assert_names(message, checkpoint, file, expected)
    assert not (checkpoint / "pwned").exists()


def test_resume_falls_back_past_a_checkpoint_that_does_not_fit_the_job(real_checkpoint, tmp_path):
    """`shadow run --resume` picks its restore point with the same checks (seen here without Ray; the
    whole resume with its `checkpoint_rejected` event: tests/faults/test_input_faults.py)."""
    shutil.copytree(real_checkpoint.parent, tmp_path / "ckpt" / "main")
    step_dir = tmp_path / "ckpt" / "main" / real_checkpoint.name
    set_first_value(step_dir, EMB, float("nan"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    events = [{"event": "run_started", "precision": "fp8"}] + [
        {"event": "checkpoint_committed", "step": step, "lineage": 0} for step in (0, STEP)]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run_dir / "trajectory.jsonl").write_text("")
    point = load_resume_point(run_dir, "main", str(tmp_path / "ckpt"), job_hash(JOB), expected_layout(JOB))
    assert point.restore_step == 0
    (step, error), = point.rejected
    assert step == STEP and error.startswith(f"{step_dir}/{DATA}: tensor {EMB!r}: 1 NaN")


def test_s3_keys_with_path_walks_are_refused():
    with pytest.raises(CheckpointError, match=r"s3://bucket/a/\.\./b/main: '\.', '\.\.' and empty components"):
        open_store("s3://bucket/a/../b", "main")
