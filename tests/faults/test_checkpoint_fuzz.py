"""Property: whatever is done to a real checkpoint's files, with the manifest re-signed to match,
`shadow replay` refuses it with exit code 2 and exactly one line on stderr naming the damaged file,
never a traceback, and nothing in the checkpoint runs (a planted pickle never leaves its marker).

One real checkpoint is trained once for the module and copied per example. Each example draws one
damage: to the manifest (wrong values, entries, paths), to `meta.json` (wrong types, missing or unknown
keys), to any JSON document (pathological text: NaN literals, overflowing or endless numbers, deep
nesting, duplicate keys, non-object top level, bad UTF-8, truncation), to the index `tensors.json`
(tensor and chunk entries: dtypes, shapes, boxes, files, byte ranges, sha256), to the data file's bytes
(flipped, cut short), to its tensors as a real save writes them (values, dtypes, shapes, names), or a
planted pickle, symbolic link or FIFO. Every damage drawn is one the job cannot train from, so exit code 2
is always right. The CLI runs in-process here (a process per example would cost seconds each);
test_checkpoint_validation.py runs representative cases in a real process.
"""

import json
import os

import pytest
import torch
from checkpoint_damage import (DATA, FILES, copy_checkpoint, flip_byte, make_checkpoint, planted_pickle,
                               refusal, rehash_chunks, replay, resign, rewrite_tensors)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadow.checkpoint.format import MANIFEST
from shadow.checkpoint.tensor_index import INDEX
from shadow.checkpoint.validate import META

pytestmark = pytest.mark.slow

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5,
)
# amax histories may hold NaN/Inf (an overflowed step's amax): putting one there is no damage
NO_FINITE_CHECK = ("amax_history",)


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("real"))


def _other_than(original):
    """Any JSON value that is not `original` (compared type-exactly, as the validation does)."""
    return JSON_VALUES.filter(lambda v: json.dumps(v, sort_keys=True) != json.dumps(original, sort_keys=True))


def _pathological_json(draw, text: str) -> bytes:
    """`text` (a JSON object) made into something a strict reader must refuse."""
    document = json.loads(text)
    key = draw(st.sampled_from(sorted(document)))
    kind = draw(st.sampled_from(["literal", "duplicate", "top_level", "utf8", "truncated", "trailing", "bom"]))
    if kind == "literal":  # a value no shadow checkpoint writes, in place of a real one
        depth = draw(st.integers(17, 20_000))
        literal = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-4e400", "9" * 41,
                                        "-" + "1" * draw(st.integers(41, 6000)), "[" * depth + "]" * depth]))
        return json.dumps({**document, key: "__X__"}).replace('"__X__"', literal, 1).encode()
    if kind == "duplicate":
        return (json.dumps(document)[:-1] + f", {json.dumps(key)}: {json.dumps(document[key])}}}").encode()
    if kind == "top_level":
        return json.dumps(draw(st.sampled_from([[document], None, 3, "x", True, list(document)]))).encode()
    if kind == "utf8":
        position = draw(st.integers(0, len(text)))
        invalid = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"]))  # stray, cut short, a surrogate
        return text[:position].encode() + invalid + text[position:].encode()
    if kind == "truncated":
        return text.rstrip()[: draw(st.integers(0, len(text.rstrip()) - 1))].encode()
    if kind == "trailing":
        return (text + draw(st.sampled_from(["x", "{}", "]", ",", "0"]))).encode()
    return ("\ufeff" + text).encode()


def _damage_manifest(draw, step_dir) -> set[str]:
    """After re-signing: a manifest that lies about, or cannot describe, the files; returns the files the
    refusal may name."""
    path = step_dir / MANIFEST
    manifest = json.loads(path.read_text())
    if draw(st.booleans()):
        path.write_bytes(_pathological_json(draw, path.read_text()))
        return {MANIFEST}
    entries = manifest["files"]
    index = draw(st.integers(0, len(entries) - 1))
    entry = entries[index]
    named = {MANIFEST, entry["path"]}
    target = draw(st.sampled_from(["top", "entry_value", "entry_key", "drop", "duplicate", "extra", "files"]))
    if target == "top":
        key = draw(st.sampled_from(["format", "run", "step", "job_hash"]))
        manifest[key] = draw(_other_than(manifest[key]))
    elif target == "entry_value":
        # A data file's sha256 is not drawn: a load checks each chunk's own sha256 as it reads it (hashing
        # a whole data file is `verify`'s work), so a wrong one in the manifest leaves intact data loadable.
        key = draw(st.sampled_from(["path", "bytes"] + (["sha256"] if entry["path"] != DATA else [])))
        entry[key] = draw(_other_than(entry[key]) if key != "sha256" else st.text(alphabet="0123456789abcdef",
                                                                                    min_size=64, max_size=64))
    elif target == "entry_key":
        entry.pop(draw(st.sampled_from(sorted(entry))))
    elif target == "drop":
        entries.pop(index)
        named.add(INDEX)  # without its data file listed, the index points at a file that is not there
    elif target == "duplicate":
        entries.append(dict(entry))
    elif target == "extra":
        name = draw(st.sampled_from(["data.pkl", "model.pt", ".metadata", "rank-00001.bin", "../rank-00000.bin",
                                     "/etc/passwd", ""]) | st.text(max_size=12))
        if name not in ("", ".", "..") and "/" not in name and "\0" not in name and not (step_dir / name).exists():
            (step_dir / name).write_bytes(planted_pickle(step_dir / "pwned"))
        entries.append({"path": name, "bytes": 1, "sha256": "0" * 64})
        named.add(name)
    else:
        manifest["files"] = draw(st.sampled_from([[], {}, None, "files"]))
    path.write_text(json.dumps(manifest))
    return named


def _damage_meta(draw, step_dir):
    path = step_dir / META
    if draw(st.booleans()):
        path.write_bytes(_pathological_json(draw, path.read_text()))
        return
    meta = json.loads(path.read_text())
    groups = meta["param_groups"]
    what = draw(st.sampled_from(["value", "drop", "unknown", "group_value", "group_drop", "group_unknown",
                                 "groups"]))
    if what == "value":
        key = draw(st.sampled_from(["step", "precision", "job_hash", "job_name"]))
        wrong = {"step": _other_than(meta["step"]), "job_hash": _other_than(meta["job_hash"]),
                 "precision": JSON_VALUES.filter(lambda v: v not in ("fp8", "bf16")),
                 "job_name": JSON_VALUES.filter(lambda v: not isinstance(v, str))}[key]
        meta[key] = draw(wrong)
    elif what == "drop":
        meta.pop(draw(st.sampled_from(["step", "precision", "job_hash", "param_groups"])))
    elif what == "unknown":
        meta[draw(st.text(max_size=8).filter(lambda k: k not in meta))] = draw(JSON_VALUES)
    elif what.startswith("group"):
        group = groups[draw(st.integers(0, len(groups) - 1))]
        key = draw(st.sampled_from(sorted(group)))
        if what == "group_drop":
            group.pop(key)
        elif what == "group_unknown":
            group[draw(st.text(max_size=8).filter(lambda k: k not in group))] = draw(JSON_VALUES)
        elif key == "lr":  # the scheduled lr may be any non-negative number: anything else
            group[key] = draw(JSON_VALUES.filter(
                lambda v: isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0))
        else:
            group[key] = draw(_other_than(group[key]))
    else:
        meta["param_groups"] = draw(st.sampled_from([{}, None, [], groups[:1], groups + groups[:1], [1, 2],
                                                     "param_groups"]))
    path.write_text(json.dumps(meta))


def _damage_index(draw, step_dir) -> set[str]:
    """`tensors.json` that does not describe the data file; returns the files the refusal may name."""
    path = step_dir / INDEX
    if draw(st.booleans()):
        path.write_bytes(_pathological_json(draw, path.read_text()))
        return {INDEX}
    index = json.loads(path.read_text())
    tensors = index["tensors"]
    name = draw(st.sampled_from(sorted(tensors)))
    entry = tensors[name]
    chunk = entry["chunks"][0]
    what = draw(st.sampled_from(["top", "entry", "entry_key", "not_object", "rename", "remove", "chunk",
                                 "chunk_key", "chunks"]))
    named = {INDEX}
    if what == "top":
        key = draw(st.sampled_from(["format", "tensors", "unknown"]))
        if key == "unknown":
            index[draw(st.text(max_size=8).filter(lambda k: k not in index))] = draw(JSON_VALUES)
        else:
            index[key] = draw(_other_than(index[key]))
    elif what == "entry":
        key = draw(st.sampled_from(["dtype", "shape", "chunks"]))
        wrong = _other_than(entry[key])
        if key == "dtype":  # another dtype of the format: wrong chunk sizes, or (same itemsize) not the job's
            wrong |= st.sampled_from(["float64", "float32", "int32", "uint8", "bool"]).filter(lambda v: v != entry[key])
        entry[key] = draw(wrong)
    elif what == "entry_key":
        _add_or_drop_a_key(draw, entry)
    elif what == "not_object":
        tensors[name] = draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
    elif what == "rename":
        tensors[draw(st.text(min_size=1, max_size=20).filter(lambda n: n not in tensors))] = tensors.pop(name)
    elif what == "remove":
        tensors.pop(name)
    elif what == "chunk":
        key = draw(st.sampled_from(sorted(chunk)))
        if key == "sha256":  # well formed but wrong: caught when the chunk's bytes are read
            chunk[key] = draw(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
                              .filter(lambda v: v != chunk["sha256"]))
            named.add(chunk["file"])
        elif key == "offset":  # another range of the file: beyond its end, or bytes that fail the chunk's sha256
            data = (step_dir / chunk["file"]).read_bytes()
            start, length = chunk["offset"], chunk["bytes"]
            # (not a range that holds the same bytes, such as another parameter's step count: that loads right)
            chunk[key] = draw((_other_than(start) | st.integers(0, len(data))).filter(
                lambda v: not (type(v) is int and data[v: v + length] == data[start: start + length])))
            named.add(chunk["file"])
        else:
            chunk[key] = draw(_other_than(chunk[key]))
    elif what == "chunk_key":
        _add_or_drop_a_key(draw, chunk)
    else:
        entry["chunks"] = draw(st.sampled_from([[], [chunk, chunk], [chunk, dict(chunk, offset=0)], None, {}]))
    path.write_text(json.dumps(index))
    return named


def _add_or_drop_a_key(draw, obj: dict) -> None:
    """Drop one of `obj`'s keys, or add an unknown one holding any JSON value."""
    key = draw(st.sampled_from(sorted(obj) + ["unknown"]))
    if key == "unknown":
        obj[draw(st.text(max_size=8).filter(lambda k: k not in obj))] = draw(JSON_VALUES)
    else:
        obj.pop(key)


def _damage_data(draw, step_dir) -> set[str]:
    """The data file's bytes flipped or cut short; the manifest is re-signed after it, or not."""
    path = step_dir / DATA
    size = path.stat().st_size
    if draw(st.booleans()):
        flip_byte(path, draw(st.integers(0, size - 1)))
        named = {DATA}  # every byte belongs to a chunk, whose sha256 no longer matches
    else:
        path.write_bytes(path.read_bytes()[: draw(st.integers(0, size - 1))])
        named = {DATA, INDEX}  # the manifest's size, or (re-signed) a chunk's byte range beyond the end
    if draw(st.booleans()):
        resign(step_dir)
    return named


def _damage_tensors(draw, step_dir) -> set[str]:
    """Tensors that do not fit the job, in a checkpoint a real save wrote (every hash matches)."""
    tensors = json.loads((step_dir / INDEX).read_text())["tensors"]
    names = sorted(tensors)
    floats = [n for n in names if tensors[n]["dtype"].startswith(("float", "bfloat"))
              and not n.endswith(NO_FINITE_CHECK)]
    what = draw(st.sampled_from(["add", "dtype", "shape", "remove", "nonfinite"]))
    name = draw(st.sampled_from(floats if what == "nonfinite" else names))
    if what == "nonfinite":  # in place: the file's bytes are edited and the chunk's sha256 rewritten
        chunk = tensors[name]["chunks"][0]
        value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        position = chunk["offset"] + 4 * draw(st.integers(0, chunk["bytes"] // 4 - 1))  # float32 values
        with open(step_dir / chunk["file"], "r+b") as f:
            f.seek(position)
            f.write(torch.tensor([value]).numpy().tobytes())
        rehash_chunks(step_dir)
        resign(step_dir)
        return {DATA}

    def change(state):
        if what == "add":
            state[draw(st.text(min_size=1, max_size=20).filter(lambda n: n not in state))] = torch.zeros(
                draw(st.lists(st.integers(0, 3), max_size=3)))
        elif what == "remove":
            state.pop(name)
        elif what == "dtype":
            dtypes = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]
            state[name] = state[name].to(draw(st.sampled_from([d for d in dtypes if d != state[name].dtype])))
        else:
            tensor = state[name]
            how = draw(st.sampled_from(["flatten", "unsqueeze", "shorter"]))
            if how == "flatten" and tensor.dim() != 1:
                state[name] = tensor.reshape(-1)
            elif how == "shorter" and tensor.dim() >= 1 and tensor.shape[0] > 0:
                state[name] = tensor[:-1]
            else:
                state[name] = tensor.unsqueeze(0)

    rewrite_tensors(step_dir, change)
    return {INDEX}


def _special_file(draw, step_dir, root) -> set[str]:
    """A file of the checkpoint replaced by a symbolic link to its own bytes, or by a FIFO."""
    file = draw(st.sampled_from(FILES + (MANIFEST,)), label="file")
    if draw(st.booleans()):
        (step_dir / file).rename(root / file)
        os.symlink(root / file, step_dir / file)
    else:
        (step_dir / file).unlink()
        os.mkfifo(step_dir / file)  # opening it for reading would block for ever
    return {file}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_any_damage_is_one_named_line_and_exit_2(real_checkpoint, tmp_path_factory, data):
    draw = data.draw
    root = tmp_path_factory.mktemp("example")
    step_dir = copy_checkpoint(real_checkpoint, root)
    family = draw(st.sampled_from(["manifest", "meta", "index", "data", "tensors", "pickle", "special"]),
                  label="family")
    if family == "manifest":
        named = _damage_manifest(draw, step_dir)
    elif family == "meta":
        _damage_meta(draw, step_dir)
        resign(step_dir)
        named = {META}
    elif family == "index":
        named = _damage_index(draw, step_dir)
        resign(step_dir)
    elif family == "data":
        named = _damage_data(draw, step_dir)
    elif family == "tensors":
        named = _damage_tensors(draw, step_dir)
    elif family == "pickle":
        file = draw(st.sampled_from(FILES), label="file")
        (step_dir / file).write_bytes(planted_pickle(step_dir / "pwned"))
        resign(step_dir)
        named = {file, INDEX} if file == DATA else {file}  # a data file too short for the index's byte ranges
    else:
        named = _special_file(draw, step_dir, root)
    code, stderr = replay(step_dir, root / "replay")
    refusal(code, stderr, step_dir, named)
    assert not (step_dir / "pwned").exists(), "a planted pickle was executed"
    assert not (root / "replay").exists()
