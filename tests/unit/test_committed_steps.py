"""The controller's sorted set of committed checkpoint steps."""

from hypothesis import given, settings
from hypothesis import strategies as st

from shadow.controller.committed import CommittedSteps


def test_lookups_and_a_rollback():
    steps = CommittedSteps([200, 0, 100, 100])
    assert list(steps) == [0, 100, 200] and len(steps) == 3
    assert 100 in steps and 150 not in steps and None not in steps
    assert steps.newest() == 200 and steps.newest(at_or_before=199) == 100 and steps.newest(at_or_before=-1) is None
    steps.add(300)
    steps.add(300)
    assert steps.drop_after(100) == [200, 300] and list(steps) == [0, 100]
    steps.discard(0)
    steps.discard(50)
    assert steps.ascending == [100] and CommittedSteps().newest() is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "discard", "drop_after"]), st.integers(0, 50)), max_size=60),
       st.integers(-1, 60))
def test_behaves_like_a_set(operations, probe):
    steps, reference = CommittedSteps(), set()
    for operation, step in operations:
        if operation == "add":
            steps.add(step)
            reference.add(step)
        elif operation == "discard":
            steps.discard(step)
            reference.discard(step)
        else:
            assert steps.drop_after(step) == sorted(s for s in reference if s > step)
            reference = {s for s in reference if s <= step}
    assert list(steps.ascending) == sorted(reference)
    assert (probe in steps) == (probe in reference)
    assert steps.newest(at_or_before=probe) == max((s for s in reference if s <= probe), default=None)
