"""Property: whatever is done to a real checkpoint's files, with the manifest re-signed to match,
`shadow replay` refuses it with exit code 2 and exactly one line on stderr naming the damaged file,
never a traceback, and nothing in the checkpoint runs (a planted pickle never leaves its marker).

One real checkpoint is trained once for the module and copied per example. Each example draws one
damage: to the manifest (wrong values, entries, paths), to `meta.json` (wrong types, missing or unknown
keys), to any JSON document (pathological text: NaN literals, overflowing or endless numbers, deep
nesting, duplicate keys, non-object top level, bad UTF-8, truncation), to a safetensors header
(entries, offsets, header length) or to its tensors (values, dtypes, shapes, names), or a planted pickle
or symbolic link. Every damage drawn is one the job cannot train from, so exit code 2 is always right.
The CLI runs in-process here (a process per example would cost seconds each); test_checkpoint_validation.py
runs representative cases in a real process.
"""

import json
import os

import pytest
import torch
from checkpoint_damage import (DATA_FILES, copy_checkpoint, join_safetensors, make_checkpoint, planted_pickle,
                               refusal, replay, resign, split_safetensors)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from shadow.checkpoint.format import MANIFEST

pytestmark = pytest.mark.slow

META = "meta.json"
SAFETENSORS = DATA_FILES[:4]
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


def _damage_manifest(draw, step_dir):
    """After re-signing: a manifest that lies about, or cannot describe, the files."""
    path = step_dir / MANIFEST
    manifest = json.loads(path.read_text())
    if draw(st.booleans()):
        path.write_bytes(_pathological_json(draw, path.read_text()))
        return {MANIFEST}
    entries = manifest["files"]
    index = draw(st.integers(0, len(entries) - 1))
    entry = entries[index]
    target = draw(st.sampled_from(["top", "entry_value", "entry_key", "drop", "duplicate", "extra", "files"]))
    if target == "top":
        key = draw(st.sampled_from(["format", "run", "step", "job_hash"]))
        manifest[key] = draw(_other_than(manifest[key]))
    elif target == "entry_value":
        key = draw(st.sampled_from(["path", "bytes", "sha256"]))
        entry[key] = draw(_other_than(entry[key]) if key != "sha256" else st.text(alphabet="0123456789abcdef",
                                                                                    min_size=64, max_size=64))
    elif target == "entry_key":
        entry.pop(draw(st.sampled_from(sorted(entry))))
    elif target == "drop":
        entries.pop(index)
    elif target == "duplicate":
        entries.append(dict(entry))
    elif target == "extra":
        name = draw(st.sampled_from(["data.pkl", "model.pt", "../model.safetensors", "/etc/passwd", ""])
                    | st.text(max_size=12))
        if name not in ("", ".", "..") and "/" not in name and "\0" not in name and not (step_dir / name).exists():
            (step_dir / name).write_bytes(planted_pickle(step_dir / "pwned"))
        entries.append({"path": name, "bytes": 1, "sha256": "0" * 64})
    else:
        manifest["files"] = draw(st.sampled_from([[], {}, None, "files"]))
    path.write_text(json.dumps(manifest))
    return {MANIFEST, entry.get("path") if isinstance(entry.get("path"), str) else MANIFEST}


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


def _damage_header(draw, step_dir, file):
    header, body = split_safetensors((step_dir / file).read_bytes())
    raw = json.dumps(header).encode()
    names = sorted(n for n in header if n != "__metadata__")
    what = draw(st.sampled_from(["text", "length", "metadata"] + (["entry", "rename", "remove"] if names else [])))
    if what == "text":
        data = join_safetensors(_pathological_json(draw, raw.decode()) if header else b"[]", body)
    elif what == "length":  # the header is rewritten without padding: any shorter length cuts its JSON
        length = len(raw) + draw(st.integers(1, len(body) + 100) | st.integers(-len(raw), -1))
        data = length.to_bytes(8, "little") + raw + body
    elif what == "metadata":
        header["__metadata__"] = draw(JSON_VALUES.filter(
            lambda v: not (isinstance(v, dict) and all(isinstance(x, str) for x in v.values()))))
        data = join_safetensors(header, body)
    else:
        name = draw(st.sampled_from(names))
        if what == "entry":
            key = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop_key", "not_object"]))
            if key == "drop_key":
                header[name].pop(draw(st.sampled_from(sorted(header[name]))))
            elif key == "not_object":
                header[name] = draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
            else:
                header[name][key] = draw(_other_than(header[name][key]))
        elif what == "rename":
            header[draw(st.text(min_size=1, max_size=20).filter(lambda n: n not in header))] = header.pop(name)
        else:
            header.pop(name)
        data = join_safetensors(header, body)
    (step_dir / file).write_bytes(data)


def _damage_tensors(draw, step_dir, file):
    tensors = load_safetensors((step_dir / file).read_bytes())
    names = sorted(tensors)
    floats = [n for n in names if tensors[n].is_floating_point() and not n.endswith(NO_FINITE_CHECK)]
    what = draw(st.sampled_from(["add"] + (["dtype", "shape", "remove"] if names else [])
                                + (["nonfinite"] if floats else [])))
    if what == "add":
        tensors[draw(st.text(min_size=1, max_size=20).filter(lambda n: n not in tensors))] = torch.zeros(
            draw(st.lists(st.integers(0, 3), max_size=3)))
    else:
        name = draw(st.sampled_from(floats if what == "nonfinite" else names))
        tensor = tensors[name].clone()
        if what == "nonfinite":
            tensor.view(-1)[draw(st.integers(0, tensor.numel() - 1))] = draw(
                st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        elif what == "dtype":
            dtypes = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]
            tensor = tensor.to(draw(st.sampled_from([d for d in dtypes if d != tensor.dtype])))
        elif what == "shape":
            how = draw(st.sampled_from(["flatten", "unsqueeze", "shorter"]))
            if how == "flatten" and tensor.dim() != 1:
                tensor = tensor.reshape(-1)
            elif how == "shorter" and tensor.dim() >= 1 and tensor.shape[0] > 0:
                tensor = tensor[:-1]
            else:
                tensor = tensor.unsqueeze(0)
        if what == "remove":
            tensors.pop(name)
        else:
            tensors[name] = tensor
    (step_dir / file).write_bytes(save_safetensors(tensors))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_any_damage_is_one_named_line_and_exit_2(real_checkpoint, tmp_path_factory, data):
    draw = data.draw
    root = tmp_path_factory.mktemp("example")
    step_dir = copy_checkpoint(real_checkpoint, root)
    family = draw(st.sampled_from(["manifest", "meta", "header", "tensors", "pickle", "symlink"]), label="family")
    named = set()
    if family == "meta":
        _damage_meta(draw, step_dir)
        named = {META}
    elif family in ("header", "tensors"):
        file = draw(st.sampled_from(SAFETENSORS), label="file")
        (_damage_header if family == "header" else _damage_tensors)(draw, step_dir, file)
        named = {file}
    elif family == "pickle":
        file = draw(st.sampled_from(DATA_FILES), label="file")
        (step_dir / file).write_bytes(planted_pickle(step_dir / "pwned"))
        named = {file}
    elif family == "symlink":
        file = draw(st.sampled_from(DATA_FILES + (MANIFEST,)), label="file")
        (step_dir / file).rename(root / file)
        os.symlink(root / file, step_dir / file)
        named = {file}
    resign(step_dir)  # the manifest matches the damaged files (a symlink's target has the original bytes)
    if family == "manifest":
        named = _damage_manifest(draw, step_dir)
    code, stderr = replay(step_dir, root / "replay")
    refusal(code, stderr, step_dir, named)
    assert not (step_dir / "pwned").exists(), "a planted pickle was executed"
    assert not (root / "replay").exists()
