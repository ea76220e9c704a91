"""The adaptive verification cadence (`shadow/policy/cadence.py`) and the schedule that follows it."""

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from shadow.compare import compare
from shadow.config.policy import Mode, Policy
from shadow.policy import (
    DecisionKind,
    Machine,
    PolicyState,
    Purpose,
    ReplayRequest,
    cadence,
    decide,
    due_replays,
)
from shadow.records import StepRecord

SETTINGS = settings(max_examples=150, deadline=None)
LEVEL_GAPS = {"clean": 0.001, "warn": 0.02, "violation": 0.05}  # rel gaps against warn 1%, switch 3%


def adaptive(base=100, most=1600, *, consecutive=2, mode="enforce", probation=1, concurrency=1):
    """The defaults with warn 1%, switch 3% and the cadence given (built directly: hypothesis calls it often)."""
    policy = Policy()
    return replace(
        policy,
        verify=replace(policy.verify, every_n_steps=base, window_steps=min(base, 25), max_every_n_steps=most,
                       max_concurrent_replays=concurrency),
        thresholds=replace(policy.thresholds, warn=0.01, switch=0.03, consecutive=consecutive),
        action=replace(policy.action, mode=Mode(mode),
                       return_to_fp8=replace(policy.action.return_to_fp8, probation_windows=probation)))


def verdict(start, rel_gap, n=10, main="fp8"):
    replay = "bf16" if main == "fp8" else "fp8"
    fp8 = [2.0 * (1 + rel_gap)] * n
    bf16 = [2.0] * n
    rows = lambda losses, precision: [StepRecord(step=start + i, loss=x, precision=precision, tokens=1,
                                                 step_time_s=0.1, grad_norm=1.0, lr=1e-3) for i, x in enumerate(losses)]
    main_losses, replay_losses = (fp8, bf16) if main == "fp8" else (bf16, fp8)
    return compare(rows(main_losses, main), rows(replay_losses, replay))


def judge(policy, state, level, start):
    main = "bf16" if state.machine is Machine.BF16_FALLBACK else "fp8"
    return decide(policy, state, verdict(start, LEVEL_GAPS[level], main=main), main_step=start + 10)


def test_the_interval_doubles_after_each_clean_window_up_to_the_maximum():
    policy, state = adaptive(100, 1000), PolicyState()
    seen = []
    for i in range(6):
        seen.append(cadence.interval(policy, state))
        out = judge(policy, state, "clean", 100 * (i + 1))
        state = out.state
    assert seen == [100, 200, 400, 800, 1000, 1000]
    assert "verification interval 1000 steps" in out.decisions[0].reason


def test_a_warn_brings_the_base_interval_back_and_says_so():
    policy, state = adaptive(), PolicyState(cadence_doublings=3)
    out = judge(policy, state, "warn", 100)
    assert cadence.interval(policy, out.state) == 100 and out.kinds == (DecisionKind.WARN,)
    assert "verification interval back to 100 steps" in out.decisions[0].reason


def test_a_fixed_cadence_never_grows():
    policy, state = adaptive(100, 0), PolicyState()
    for i in range(5):
        state = judge(policy, state, "clean", 100 * (i + 1)).state
    assert state.cadence_doublings == 0 and cadence.interval(policy, state) == 100


def test_probation_windows_keep_the_base_interval_until_fp8_is_trusted():
    policy = adaptive(100, 1600, probation=2)
    state = PolicyState(machine=Machine.FP8_PROBATION)
    state = judge(policy, state, "clean", 100).state
    assert state.machine is Machine.FP8_PROBATION and state.cadence_doublings == 0
    state = judge(policy, state, "clean", 200).state  # the window that ends probation
    assert state.machine is Machine.FP8 and state.cadence_doublings == 0
    assert judge(policy, state, "clean", 300).state.cadence_doublings == 1


@SETTINGS
@given(base=st.sampled_from([10, 50, 100]), factor=st.sampled_from([0, 1, 3, 16, 100]),
       levels=st.lists(st.sampled_from(["clean", "warn", "violation"]), min_size=1, max_size=30),
       consecutive=st.integers(1, 3), mode=st.sampled_from(["enforce", "observe"]))
def test_the_interval_stays_in_bounds_grows_only_after_clean_windows_and_resets_on_anything_else(
        base, factor, levels, consecutive, mode):
    policy = adaptive(base, base * factor, consecutive=consecutive, mode=mode)
    most = max(base, policy.verify.max_every_n_steps)
    state = PolicyState()
    for i, level in enumerate(levels):
        before = cadence.interval(policy, state)
        out = judge(policy, state, level, state.since_step + 100 * (i + 1))
        after = cadence.interval(policy, out.state)
        assert base <= after <= most
        switched = out.state.machine is not state.machine and out.state.since_step != state.since_step
        if level == "clean" and state.machine is Machine.FP8:
            assert after == min(2 * before, most) or (after == before == most)
        elif level == "clean":
            assert after == before  # probation, fallback probes: no growth
        elif state.machine is not Machine.BF16_FALLBACK or switched:
            assert after == base
        if switched:
            assert out.state.cadence_doublings == 0
        state = out.state


@SETTINGS
@given(doublings=st.integers(0, 200), base=st.integers(1, 500), extra=st.integers(0, 10_000))
def test_back_to_base_always_gives_the_base_interval_and_a_new_regime_too(doublings, base, extra):
    policy = adaptive(base, base + extra)
    state = PolicyState(cadence_doublings=doublings)
    assert base <= cadence.interval(policy, state) <= base + extra
    assert cadence.interval(policy, cadence.back_to_base(state)) == base
    assert cadence.interval(policy, state.new_regime(Machine.BF16_FALLBACK, 10)) == base


def _due_by_full_scan(policy, state, main_step, committed, total_steps, high_water):
    """Reference: every committed checkpoint, windows an interval apart from the latest one's span."""
    base, window = policy.verify.every_n_steps, policy.verify.window_steps
    apart = cadence.interval(policy, state)
    origin = (high_water // base) * base + apart
    usable = [s for s in committed if max(state.since_step, origin) <= s <= min(main_step, total_steps - window)]
    spans = {}
    for s in usable:
        spans.setdefault((s - origin) // apart, s)
    newest = sorted(spans.values(), reverse=True)[:policy.verify.max_concurrent_replays]
    return sorted(newest)


@SETTINGS
@given(base=st.sampled_from([25, 50, 100]), factor=st.sampled_from([1, 2, 3, 8, 64]),
       doublings=st.integers(0, 8), checkpoint_every=st.sampled_from([10, 25, 50]),
       num_checkpoints=st.integers(0, 400), last=st.integers(-1, 4000), main_step=st.integers(0, 4000),
       concurrency=st.integers(1, 3), since=st.integers(0, 1000))
def test_verification_windows_start_an_interval_apart(base, factor, doublings, checkpoint_every, num_checkpoints,
                                                       last, main_step, concurrency, since):
    policy = adaptive(base, base * factor, concurrency=concurrency)
    state = PolicyState(since_step=since, last_window_start=last, cadence_doublings=doublings)
    committed = list(range(0, num_checkpoints * checkpoint_every, checkpoint_every))
    due = due_replays(policy, state, main_step=main_step, committed_steps=committed, in_flight=[],
                      total_steps=4500)
    starts = [r.start_step for r in due]
    assert starts == _due_by_full_scan(policy, state, main_step, committed, 4500, last)
    apart = cadence.interval(policy, state)
    origin = (last // base) * base + apart  # the latest window's span start, plus the interval
    assert all(s >= origin for s in starts)  # never closer than the interval
    assert len({(s - origin) // apart for s in starts}) == len(starts)  # one window per span of the interval


def test_at_the_base_interval_the_schedule_is_the_fixed_cadence():
    fixed, grown = adaptive(100, 0), adaptive(100, 1600)
    state = PolicyState(last_window_start=300)
    args = {"main_step": 2000, "committed_steps": list(range(0, 2000, 50)), "in_flight": [], "total_steps": 3000}
    assert due_replays(fixed, state, **args) == due_replays(grown, state, **args) == [
        ReplayRequest(1900, 25, "bf16", Purpose.VERIFY)]  # the newest span, from its first checkpoint


def test_a_long_healthy_run_costs_a_few_percent():
    """3000 steps, checkpoints every 50, every window clean: windows at 0, 200, 600, 1400 (and 3000 is the end)."""
    policy = adaptive(100, 1600)
    state, starts = PolicyState(), []
    for main_step in range(0, 3000, 50):
        for request in due_replays(policy, state, main_step=main_step, committed_steps=list(range(0, main_step + 1, 50)),
                                   in_flight=[], total_steps=3000):
            starts.append(request.start_step)
            state = judge(policy, state, "clean", request.start_step).state
    assert starts == [0, 200, 600, 1400]
    assert 25 * len(starts) / 3000 < 0.05
    # a warn at 1400 brings the base interval back: the next window is 100 steps on
    warned = judge(policy, replace(state, last_window_start=600, cadence_doublings=3), "warn", 1400).state
    assert due_replays(policy, warned, main_step=1550, committed_steps=list(range(0, 1551, 50)), in_flight=[],
                       total_steps=3000)[0].start_step == 1500
