"""Main-loop blocking time per checkpoint, as a ratio to the mean step time: sync vs async persist.

For the tiny job and a model ~100x larger, one trainer per size trains in alternating rounds, one with
each persister (so machine noise hits both alike). A round takes `--checkpoints` checkpoints, each
followed by `--every` training steps, into a local directory (keep_last=1, so retention runs too).
Blocking is what the training loop (`shadow.loop.run_steps`) loses per checkpoint: the time of
`persister.submit(trainer.snapshot())` (the CPU copy; for sync also the whole save; for async any wait
for the previous save) plus, for async, a save still running when the round ends (it would delay the
next checkpoint). Steps that overlap a background save are timed too: "interval s" is the loop's wall
time for one checkpoint and the `--every` steps after it, the figure that shows what async really saves.

    python bench/checkpoint_blocking.py [--rounds 3] [--every 3] [--checkpoints 2] [--sizes ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import print_table, write_result

from shadow.checkpoint import AsyncPersister, CommitInfo, SyncPersister, open_store
from shadow.config import load_job
from shadow.trainer import Trainer

TINY_JOB = Path(__file__).resolve().parents[1] / "jobs" / "tiny.yaml"
LARGE = ["model.num_layers=12", "model.d_model=768", "model.num_heads=12"]
SIZES = {
    "tiny (4x128)": [],
    # batch 4 instead of 16 keeps a step near 5 s on one CPU thread; the state to save is the same size
    "100x (12x768, batch 4)": LARGE + ["batch_size=4"],
}
PERSISTERS = {"sync": SyncPersister, "async": AsyncPersister}


def _round(trainer: Trainer, persister, every: int, checkpoints: int) -> dict:
    step_s, block_s = [], []
    for _ in range(checkpoints):
        started = time.perf_counter()
        persister.submit(trainer.snapshot())
        block_s.append(time.perf_counter() - started)
        step_s += [trainer.train_step().step_time_s for _ in range(every)]
    started = time.perf_counter()
    commits = [e for e in persister.close() if isinstance(e, CommitInfo)]
    block_s[-1] += time.perf_counter() - started
    assert len(commits) == checkpoints, f"expected {checkpoints} commits, got {commits}"
    return {"step_s": step_s, "block_s": block_s, "persist_s": [c.seconds for c in commits],
            "bytes": commits[-1].num_bytes}


def measure(sizes: dict[str, list[str]], rounds: int, every: int, checkpoints: int) -> list[dict]:
    """Rows of blocking per checkpoint, sync and async, for each model size (also used by overhead.py)."""
    rows = []
    for label, overrides in sizes.items():
        trainer = Trainer(load_job(str(TINY_JOB), overrides))
        trainer.train_step()  # warm-up
        samples = {mode: {"step_s": [], "block_s": [], "persist_s": []} for mode in PERSISTERS}
        with tempfile.TemporaryDirectory() as root:
            for _ in range(rounds):
                for mode, persister_type in PERSISTERS.items():
                    persister = persister_type(open_store(root, mode, keep_last=1))
                    measured = _round(trainer, persister, every, checkpoints)
                    checkpoint_bytes = measured.pop("bytes")
                    for key, values in measured.items():
                        samples[mode][key] += values
        params = sum(p.numel() for p in trainer.model.parameters())
        for mode, sample in samples.items():
            step_s, block_s = statistics.mean(sample["step_s"]), statistics.mean(sample["block_s"])
            rows.append({"model": label, "params": params, "checkpoint_mb": checkpoint_bytes / 1e6, "persist": mode,
                         "mean_step_s": step_s, "mean_block_s": block_s, "max_block_s": max(sample["block_s"]),
                         "block_over_step": block_s / step_s, "interval_s": every * step_s + block_s,
                         "mean_persist_s": statistics.mean(sample["persist_s"]),
                         "num_checkpoints": len(sample["block_s"])})
        print(f"measured {label}", flush=True)
    return rows


COLUMNS = [("model", "model", ""), ("params", "params", ","), ("checkpoint_mb", "ckpt MB", ".1f"),
           ("persist", "persist", ""), ("mean_step_s", "step s", ".3f"), ("mean_block_s", "block s", ".4f"),
           ("max_block_s", "max blk s", ".4f"), ("block_over_step", "block/step", ".4f"),
           ("interval_s", "interval s", ".3f"), ("mean_persist_s", "save s", ".3f")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--every", type=int, default=3, help="steps between checkpoints")
    parser.add_argument("--checkpoints", type=int, default=2, help="checkpoints per round and persister")
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), help="subset of %(default)s")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = measure({k: SIZES[k] for k in args.sizes}, args.rounds, args.every, args.checkpoints)
    print_table(COLUMNS, rows)
    write_result("checkpoint_blocking", {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                         "every": args.every, "checkpoints_per_round": args.checkpoints,
                                         "rounds": args.rounds, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
