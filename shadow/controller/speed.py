"""The measured speed ledger: FP8 and BF16 step times of this run, compared where they can be.

The main job times every step it trains (`StepRecord.step_time_s`) and so does every replay, so one run
measures both precisions on the same model and batches: FP8 on the main job, BF16 on its verification
replays (and the other way round in a fallback: BF16 main steps, FP8 probes). Step times compare only
on the same kind of device (`actors.device_kind`: the GPU's name, or the CPU with its thread count) at
the same rank count, so replays count only when they ran like the main job; the main job's own steps
always do. The speedup is the ratio of the medians (BF16 step time / FP8 step time): the median leaves
out a replay's first step (a fresh trainer warms up) and checkpoint stalls. Below `MIN_TIMED_STEPS` of
either precision nothing is measured, and the summary falls back on the assumed `run.fp8_speedup`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from shadow.records import StepRecord

MIN_TIMED_STEPS = 10  # steps of each precision before a median says anything


@dataclass(frozen=True)
class MainSetup:
    """Where the main job's steps run."""

    device: str  # `actors.device_kind` of its rank 0
    num_ranks: int
    fp8_emulated: bool  # FP8 quantize-dequantize around wider GEMMs: slower than BF16 by design


class StepTimes:
    def __init__(self):
        self.main: dict[str, list[float]] = {}  # by precision: every step the main job trained
        self.replays: dict[tuple[str, str, int], list[float]] = {}  # by (precision, device, num_ranks)

    @classmethod
    def resumed(cls, main: list[StepRecord], replays: list[tuple[list[StepRecord], str, int]]) -> StepTimes:
        """The times of a run continued with `--resume`: its trajectory, and each finished replay's rows
        with the device and rank count they ran on (`ResumePoint.replay_times`)."""
        times = cls()
        times.add_main(main)
        for records, device, num_ranks in replays:
            times.add_replay(records, device, num_ranks)
        return times

    def add_main(self, records: list[StepRecord]) -> None:
        for record in records:
            self.main.setdefault(record.precision, []).append(record.step_time_s)

    def add_replay(self, records: list[StepRecord], device: str, num_ranks: int) -> None:
        for record in records:
            self.replays.setdefault((record.precision, device, num_ranks), []).append(record.step_time_s)

    def comparable(self, setup: MainSetup, precision: str) -> list[float]:
        """Step times of `precision` on the main job's device and rank count: its own and such replays'."""
        return self.main.get(precision, []) + self.replays.get((precision, setup.device, setup.num_ranks), [])

    def measured(self, setup: MainSetup | None) -> dict | None:
        """The measured FP8 speedup and what it rests on; None where too little compares (see `why_not`)."""
        if setup is None:
            return None
        fp8, bf16 = self.comparable(setup, "fp8"), self.comparable(setup, "bf16")
        if min(len(fp8), len(bf16)) < MIN_TIMED_STEPS:
            return None
        fp8_s, bf16_s = statistics.median(fp8), statistics.median(bf16)
        if fp8_s <= 0:
            return None
        return {"fp8_speedup": bf16_s / fp8_s, "fp8_step_s": fp8_s, "bf16_step_s": bf16_s,
                "num_fp8_steps": len(fp8), "num_bf16_steps": len(bf16), "device": setup.device,
                "num_ranks": setup.num_ranks, "fp8_emulated": setup.fp8_emulated}

    def why_not(self, setup: MainSetup | None) -> str:
        """Why `measured` is None, in one line for the console and summary.json."""
        if setup is None:
            return "the main job never started"
        counts = {p: len(self.comparable(setup, p)) for p in ("fp8", "bf16")}
        where = f"{setup.device}, {setup.num_ranks} rank{'s' if setup.num_ranks > 1 else ''}"
        elsewhere = sorted({f"{device}, {ranks} rank{'s' if ranks > 1 else ''}"
                            for (_, device, ranks) in self.replays if (device, ranks) != (setup.device, setup.num_ranks)})
        text = (f"{counts['fp8']} FP8 and {counts['bf16']} BF16 steps on the main job's {where} "
                f"(at least {MIN_TIMED_STEPS} of each needed)")
        return text + (f"; replays ran on {' and '.join(elsewhere)}" if elsewhere else "")


def describe(measured: dict) -> str:
    """`FP8 = 0.74x BF16 per step (emulated FP8, cpu x1 threads, 1 rank; medians of 95 FP8 and 16 BF16 steps)`."""
    ranks = measured["num_ranks"]
    return (f"FP8 = {measured['fp8_speedup']:.2f}x BF16 per step ({'emulated FP8, ' if measured['fp8_emulated'] else ''}"
            f"{measured['device']}, {ranks} rank{'s' if ranks > 1 else ''}; medians of {measured['num_fp8_steps']} "
            f"FP8 and {measured['num_bf16_steps']} BF16 steps)")
