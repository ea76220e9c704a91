"""Which replays to start now: verification, FP8 probes and noise windows, from committed checkpoints.

Pure; the controller calls `due_replays` at each decision point and starts what it returns. A window
may start before the main job has trained it: the replay only needs its starting checkpoint, and the
comparison waits for the main job's records.

Cadence: the steps are cut into spans of `verify.every_n_steps`; a span gets one window, from the
first committed checkpoint in it. When replays fall behind the main job the newest spans go first and
older ones are skipped: a verdict about the current state of training is worth more than one about
the past, and the high-water mark never moves backwards. With the adaptive cadence
(`verify.max_every_n_steps`, `shadow/policy/cadence.py`) verification windows are `interval` apart
instead: the next one starts at the first checkpoint at or after the start of the latest window's
span plus the interval, and spans of the interval are counted from there (at the base interval this
is the fixed cadence exactly).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Sequence

from shadow.config.policy import Policy
from shadow.policy.cadence import interval
from shadow.policy.state import Machine, PolicyState, Purpose, ReplayRequest


def due_replays(
    policy: Policy,
    state: PolicyState,
    *,
    main_step: int,
    committed_steps: Sequence[int],
    in_flight: Sequence[ReplayRequest],
    total_steps: int | None = None,
    settled: Sequence[ReplayRequest] = (),
) -> list[ReplayRequest]:
    """Replays to start now, noise windows first, at most `max_concurrent_replays - len(in_flight)`.

    `committed_steps`: checkpoints on the main job's current lineage (after a rollback, not the
    abandoned ones), ascending. `total_steps`: the job's last step, so no window reaches past it.
    `settled`: windows of this regime already judged (or noted) or given up; like
    windows in flight they are never scheduled again, but they take no concurrency slot. Only the
    newest settled window per purpose matters, and only checkpoints past the high-water marks are
    looked at, so a call costs the same at any run length.
    """
    free = policy.verify.max_concurrent_replays - len(in_flight)
    if free <= 0 or state.machine is Machine.BF16_FOREVER:
        return []
    num_steps = policy.verify.window_steps
    main_precision = "bf16" if state.machine is Machine.BF16_FALLBACK else "fp8"
    noise_needed, noise_high_water = _noise_needed(policy, state, in_flight, settled)

    if state.machine is Machine.BF16_FALLBACK:
        purpose, precision = Purpose.PROBE, "fp8"
        earliest = state.since_step + policy.action.return_to_fp8.after_steps
    else:
        purpose, precision = Purpose.VERIFY, policy.verify.replay_precision.value
        earliest = state.since_step
    taken = [*in_flight, *settled]
    high_water = max([state.last_window_start] + [r.start_step for r in taken if r.purpose is purpose])
    every = policy.verify.every_n_steps
    apart = every if purpose is Purpose.PROBE else interval(policy, state)
    origin = (high_water // every) * every + apart  # where the first span without a window starts
    floor = max(earliest, origin)
    if noise_needed > 0:
        floor = min(floor, noise_high_water + 1)
    floor = max(floor, state.since_step)
    last = main_step if total_steps is None else min(main_step, total_steps - num_steps)
    usable = committed_steps[bisect_left(committed_steps, floor):bisect_right(committed_steps, last)]

    requests = ([ReplayRequest(s, num_steps, main_precision, Purpose.NOISE)
                 for s in [s for s in usable if s > noise_high_water][-noise_needed:]] if noise_needed > 0 else [])
    requests = requests[:free]
    free -= len(requests)
    first_in_span: dict[int, int] = {}
    for s in usable:
        if s >= earliest and s >= origin:
            first_in_span.setdefault((s - origin) // apart, s)
    newest_first = sorted(first_in_span.values(), reverse=True)[:max(free, 0)]
    requests += [ReplayRequest(s, num_steps, precision, purpose) for s in sorted(newest_first)]
    return requests


def _noise_needed(policy: Policy, state: PolicyState, in_flight: Sequence[ReplayRequest],
                  settled: Sequence[ReplayRequest]) -> tuple[int, int]:
    """How many noise windows are still needed, and the newest checkpoint already used for one."""
    if not policy.noise.enabled or state.noise_floor is not None:
        return 0, state.last_noise_start
    noise_in_flight = [r.start_step for r in in_flight if r.purpose is Purpose.NOISE]
    needed = policy.noise.num_windows - len(state.noise_values) - len(noise_in_flight)
    high_water = max([state.last_noise_start] + noise_in_flight
                     + [r.start_step for r in settled if r.purpose is Purpose.NOISE])
    return needed, high_water
