"""The replay window life cycle, stepped one transition at a time without Ray (`shadow/controller/windows.py`)."""

from __future__ import annotations

from shadow.controller.actors import ReplayResult
from shadow.controller.windows import ReplayWindows
from shadow.policy import Purpose, ReplayRequest
from shadow.policy.early_stop import EarlyStop
from shadow.records import StepRecord


def _verify(start: int, num_steps: int = 25) -> ReplayRequest:
    return ReplayRequest(start, num_steps, "bf16", Purpose.VERIFY)


def _started(windows: ReplayWindows, request: ReplayRequest):
    replay = windows.open(request, save_end=False, run="r")
    windows.start(replay)
    return replay


def test_a_window_walks_from_running_through_finished_to_judged():
    windows = ReplayWindows()
    replay = _started(windows, _verify(100))
    assert replay.name == "001-verify-bf16-at-000000100" and replay.pin == "replay-1"
    assert windows.in_flight() == [replay.request] and windows.covering(110) == replay.request
    assert windows.running_ends_after(110) == (125,) and windows.running_ends_after(125) == ()

    assert windows.finish(replay, ReplayResult(records=[]))
    assert windows.running == [] and windows.in_flight() == [replay.request]  # still holds its slot
    assert windows.ready_to_judge(main_step=124, main_done=False) == []  # the main job has not trained step 124
    assert windows.ready_to_judge(main_step=125, main_done=False) == [replay]
    assert windows.in_flight() == [] and windows.finished == []

    windows.judge(replay)
    assert windows.covering(124) == replay.request and windows.covering(125) is None
    assert windows.settled() == [replay.request]


def test_ready_windows_come_out_oldest_first_and_all_once_the_main_job_is_done():
    windows = ReplayWindows()
    late, early = _started(windows, _verify(200)), _started(windows, _verify(100))
    for replay in (late, early):
        windows.finish(replay, ReplayResult(records=[]))
    assert windows.ready_to_judge(main_step=150, main_done=False) == [early]
    assert windows.ready_to_judge(main_step=150, main_done=True) == [late]


def test_a_retried_window_keeps_its_slot_and_a_given_up_one_covers_nothing():
    windows = ReplayWindows()
    replay = _started(windows, _verify(100))
    windows.retry(replay)
    assert replay.attempt == 1 and windows.running == [replay]
    windows.give_up(replay)
    assert windows.running == [] and windows.in_flight() == []
    assert windows.covering(110) is None  # nothing judged it
    assert windows.settled() == [replay.request]  # but the cadence never schedules it again


def test_requested_windows_cover_their_steps_and_leave_oldest_first_for_free_slots():
    windows = ReplayWindows()
    first, second = _verify(100, 40), _verify(200)
    windows.request(first)
    windows.request(second)
    assert windows.covering(139) == first and windows.covering(140) is None
    assert windows.next_requested(0) == []
    assert windows.next_requested(1) == [first] and windows.requested == [second]


def test_only_verification_windows_cover_steps():
    windows = ReplayWindows()
    _started(windows, ReplayRequest(100, 25, "fp8", Purpose.NOISE))
    assert windows.covering(110) is None


def test_a_new_regime_forgets_the_old_windows_and_discards_its_replays():
    windows = ReplayWindows()
    judged, running, finished = _started(windows, _verify(0)), _started(windows, _verify(100)), _started(windows, _verify(200))
    windows.finish(judged, ReplayResult(records=[]))
    windows.ready_to_judge(main_step=25, main_done=False)
    windows.judge(judged)
    windows.finish(finished, ReplayResult(records=[]))
    windows.request(_verify(300))

    windows.new_regime(regime=1, lineage=1)
    assert windows.covering(10) is None and windows.covering(110) is None and windows.covering(310) is None
    assert windows.settled() == [] and windows.requested == []
    # the old replays still hold their slots until they end, then they do not count
    assert [r.start_step for r in windows.in_flight()] == [100, 200]
    assert not windows.is_current(running) and not windows.finish(running, ReplayResult(records=[]))
    assert windows.ready_to_judge(main_step=300, main_done=False) == [finished]  # for the caller to discard
    windows.give_up(running)  # a stale give-up does not move the new regime's high-water mark
    assert windows.settled() == []
    replay = _started(windows, _verify(300))
    assert (replay.regime, replay.lineage) == (1, 1) and windows.is_current(replay)


def test_a_restart_keeps_windows_judged_before_the_restore_point():
    windows = ReplayWindows()
    before, after = _started(windows, _verify(0)), _started(windows, _verify(100))
    for replay in (before, after):
        windows.finish(replay, ReplayResult(records=[]))
    for replay in windows.ready_to_judge(main_step=125, main_done=False):
        windows.judge(replay)
    windows.request(_verify(150))

    windows.new_lineage(lineage=1, from_step=100)
    assert windows.covering(10) == before.request and windows.covering(110) is None
    assert windows.requested == []
    assert [r.start_step for r in windows.settled()] == [100]  # the cadence's high-water mark stays


def test_names_continue_the_count_of_a_resumed_run():
    windows = ReplayWindows(num_started=6)
    replay = windows.open(ReplayRequest(300, 25, "fp8", Purpose.PROBE), save_end=True, run="job")
    assert replay.name == "007-probe-fp8-at-000000300" and replay.pin == "replay-7"
    assert replay.save_end_run == "job-replays/007-probe-fp8-at-000000300"


def test_a_window_that_stops_early_covers_only_the_steps_it_ran():
    windows = ReplayWindows()
    replay = windows.open(_verify(100), save_end=False, run="r", stoppable=True)
    windows.start(replay)
    assert replay.planned_steps == 25 and replay.stoppable
    replay.records = [StepRecord(step=s, loss=2.0, precision="bf16", tokens=1, step_time_s=0.1, grad_norm=1.0, lr=1e-3)
                      for s in range(100, 109)]
    windows.stop_early(replay, EarlyStop("clean", 9, (-0.001, 0.002), (-0.001, 0.003), "intervals within warn"))
    assert replay.end_step == 109 and replay.planned_steps == 25 and replay.early_stop.level == "clean"
    assert windows.covering(108) == replay.request and windows.covering(109) is None
    windows.finish(replay, ReplayResult(records=replay.records))
    assert windows.ready_to_judge(main_step=109, main_done=False) == [replay]  # no wait for steps it never ran
    windows.judge(replay)
    assert windows.settled() == [ReplayRequest(100, 9, "bf16", Purpose.VERIFY)]


def test_a_retry_starts_the_window_over():
    windows = ReplayWindows()
    replay = _started(windows, _verify(100))
    replay.records = [StepRecord(step=100, loss=2.0, precision="bf16", tokens=1, step_time_s=0.1, grad_norm=1.0,
                                 lr=1e-3)]
    windows.retry(replay)
    assert replay.attempt == 1 and replay.records == []
