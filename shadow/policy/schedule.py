"""Which replays to start now: verification, FP8 probes and noise windows, from committed checkpoints.

Pure; the controller calls `due_replays` at each decision point and starts what it returns. A window
may start before the main job has trained it: the replay only needs its starting checkpoint, and the
comparison waits for the main job's records.

Cadence: the steps are cut into spans of `verify.every_n_steps`; a span gets one window, from the
first committed checkpoint in it. When replays fall behind the main job the newest spans go first and
older ones are skipped: a verdict about the current state of training is worth more than one about
the past, and the high-water mark never moves backwards.
"""

from __future__ import annotations

from typing import Collection, Sequence

from shadow.config.policy import Policy
from shadow.policy.state import Machine, PolicyState, Purpose, ReplayRequest


def due_replays(
    policy: Policy,
    state: PolicyState,
    *,
    main_step: int,
    committed_steps: Collection[int],
    in_flight: Sequence[ReplayRequest],
    total_steps: int | None = None,
    settled: Sequence[ReplayRequest] = (),
) -> list[ReplayRequest]:
    """Replays to start now, noise windows first, at most `max_concurrent_replays - len(in_flight)`.

    `committed_steps`: checkpoints on the main job's current lineage (after a rollback, not the
    abandoned ones). `total_steps`: the job's last step, so no window reaches past it. `settled`:
    windows of this regime already replayed (judged, noted or discarded) or given up; like windows in
    flight they are never scheduled again, but they take no concurrency slot.
    """
    free = policy.verify.max_concurrent_replays - len(in_flight)
    if free <= 0 or state.machine is Machine.BF16_FOREVER:
        return []
    num_steps = policy.verify.window_steps
    usable = sorted(
        s for s in set(committed_steps)
        if state.since_step <= s <= main_step and (total_steps is None or s + num_steps <= total_steps)
    )
    main_precision = "bf16" if state.machine is Machine.BF16_FALLBACK else "fp8"
    requests = _noise_requests(policy, state, usable, in_flight, settled, main_precision)[:free]
    free -= len(requests)

    if state.machine is Machine.BF16_FALLBACK:
        purpose, precision = Purpose.PROBE, "fp8"
        earliest = state.since_step + policy.action.return_to_fp8.after_steps
    else:
        purpose, precision = Purpose.VERIFY, policy.verify.replay_precision.value
        earliest = state.since_step
    taken = [*in_flight, *settled]
    high_water = max([state.last_window_start] + [r.start_step for r in taken if r.purpose is purpose])
    every = policy.verify.every_n_steps
    first_in_span: dict[int, int] = {}
    for s in usable:
        if s >= earliest and s // every > high_water // every:
            first_in_span.setdefault(s // every, s)
    newest_first = sorted(first_in_span.values(), reverse=True)[:max(free, 0)]
    requests += [ReplayRequest(s, num_steps, precision, purpose) for s in sorted(newest_first)]
    return requests


def _noise_requests(policy: Policy, state: PolicyState, usable: list[int], in_flight: Sequence[ReplayRequest],
                    settled: Sequence[ReplayRequest], precision: str) -> list[ReplayRequest]:
    """Noise windows still needed, from the newest checkpoints not yet used for one."""
    if not policy.noise.enabled or state.noise_floor is not None:
        return []
    noise_in_flight = [r.start_step for r in in_flight if r.purpose is Purpose.NOISE]
    needed = policy.noise.num_windows - len(state.noise_values) - len(noise_in_flight)
    high_water = max([state.last_noise_start] + noise_in_flight
                     + [r.start_step for r in settled if r.purpose is Purpose.NOISE])
    starts = [s for s in usable if s > high_water][-needed:] if needed > 0 else []
    return [ReplayRequest(s, policy.verify.window_steps, precision, Purpose.NOISE) for s in starts]
