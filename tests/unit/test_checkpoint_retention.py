"""Retention selection and pin names: pure functions, checked by example and by property."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shadow.checkpoint import CheckpointError
from shadow.checkpoint.retention import parse_pin_name, pin_name, select_for_deletion


def test_keeps_newest_and_protected():
    assert select_for_deletion([0, 50, 100, 150, 200], keep_last=2, protected={50}) == [0, 100]
    assert select_for_deletion([0, 50, 100], keep_last=0, protected=set()) == []
    assert select_for_deletion([100, 0, 50], keep_last=5, protected=set()) == []
    with pytest.raises(ValueError, match="checkpoint.keep"):
        select_for_deletion([0], keep_last=-1, protected=set())


@given(
    committed=st.lists(st.integers(0, 10_000), max_size=30),
    keep_last=st.integers(0, 8),
    protected=st.sets(st.integers(0, 10_000), max_size=10),
)
def test_never_deletes_protected_or_newest(committed, keep_last, protected):
    deleted = select_for_deletion(committed, keep_last, protected)
    assert not set(deleted) & set(protected)
    assert set(deleted) <= set(committed)
    newest = sorted(set(committed), reverse=True)[:keep_last] if keep_last else sorted(set(committed))
    assert not set(deleted) & set(newest)
    if keep_last:  # everything else goes: retention does not leave stray old checkpoints behind
        assert set(committed) - set(deleted) == set(newest) | (set(protected) & set(committed))


@given(step=st.integers(0, 999_999_999), reason=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True))
def test_pin_names_round_trip(step, reason):
    assert parse_pin_name(pin_name(step, reason)) == (step, reason)


@pytest.mark.parametrize("reason", ["", "../escape", "a/b", "has space", "x" * 65, ".hidden"])
def test_bad_pin_reasons_are_refused(reason):
    with pytest.raises(CheckpointError, match="pin reason"):
        pin_name(5, reason)


@pytest.mark.parametrize("name", ["step-000000005", "step-000000005.", "step-00000005.x", ".step-000000005.x.tmp",
                                  "notes.txt"])
def test_other_names_are_not_pins(name):
    assert parse_pin_name(name) is None
