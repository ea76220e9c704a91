"""Crash-safe JSON lines: whole lines or nothing, torn tails tolerated and repaired."""

import errno
import json
import os

import pytest

from shadow import jsonl
from shadow.jsonl import JsonlWriter, read_jsonl


def test_torn_last_line_is_skipped_by_readers_and_cut_by_the_next_writer(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}\n{"c": 3, "torn')
    assert list(read_jsonl(path)) == [{"a": 1}, {"b": 2}]
    with JsonlWriter(path) as writer:
        writer.write({"d": 4})
    assert list(read_jsonl(path)) == [{"a": 1}, {"b": 2}, {"d": 4}]
    assert path.read_text().endswith('{"d": 4}\n')


def test_a_bad_line_in_the_middle_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        list(read_jsonl(path))


def test_failed_write_leaves_no_partial_line(tmp_path, monkeypatch):
    path = tmp_path / "events.jsonl"
    writer = JsonlWriter(path)
    writer.write({"kept": True})
    real_write = os.write
    calls = []

    def half_then_full_disk(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, data[: len(data) // 2])  # the disk took half the line...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...then filled up

    monkeypatch.setattr(jsonl.os, "write", half_then_full_disk)
    with pytest.raises(OSError, match=r"cannot append to .*events\.jsonl: No space left on device"):
        writer.write({"lost": "x" * 100})
    monkeypatch.setattr(jsonl.os, "write", real_write)
    assert path.read_text() == json.dumps({"kept": True}) + "\n"  # cut back to the last whole line
    writer.write({"after": 1})
    writer.close()
    assert list(read_jsonl(path)) == [{"kept": True}, {"after": 1}]


def test_jsonable_makes_every_writer_s_values_json_ready():
    """The one cleaner behind trajectory rows, verdicts, policy state and trigger firings."""
    import enum
    import math

    class Colour(str, enum.Enum):
        RED = "red"

    value = {"loss": math.nan, "z": math.inf, "gaps": (1.0, -math.inf), "kind": Colour.RED,
             "nested": {"x": [math.nan, 2], "ok": 1.5, "none": None, "flag": True}}
    cleaned = jsonl.jsonable(value)
    assert cleaned == {"loss": "nan", "z": "inf", "gaps": [1.0, "-inf"], "kind": "red",
                       "nested": {"x": ["nan", 2], "ok": 1.5, "none": None, "flag": True}}
    assert json.loads(json.dumps(cleaned, allow_nan=False)) == cleaned  # strict JSON accepts it
    assert jsonl.jsonable(None) is None and jsonl.jsonable(-math.inf) == "-inf"
