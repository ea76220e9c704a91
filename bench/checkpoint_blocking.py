"""Main-loop blocking time per checkpoint, as a ratio to the mean step time: sync vs async persist.

For the tiny job and a model ~100x larger, one trainer per size trains in alternating rounds, one with
each persister (so machine noise hits both alike). A round takes `--checkpoints` checkpoints, each
followed by `--every` training steps, into a local directory (keep_last=1, so retention runs too).
Blocking is what the training loop (`shadow.loop.run_steps`) loses per checkpoint: the time of
`persister.submit(trainer.snapshot())` (the CPU copy; for sync also the whole save; for async any wait
for the previous save) plus, for async, a save still running when the round ends (it would delay the
next checkpoint). Steps that overlap a background save are timed too: "interval s" is the loop's wall
time for one checkpoint and the `--every` steps after it, the figure that shows what async really saves.

    python bench/checkpoint_blocking.py [--rounds 3] [--every 3] [--checkpoints 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--every", type=int, default=3, help="steps between checkpoints")
    parser.add_argument("--checkpoints", type=int, default=2, help="checkpoints per round and persister")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "checkpoint_blocking.json"))
    args = parser.parse_args()
    rows = []
    for label, overrides in SIZES.items():
        trainer = Trainer(load_job(str(TINY_JOB), overrides))
        trainer.train_step()  # warm-up
        samples = {mode: {"step_s": [], "block_s": [], "persist_s": []} for mode in PERSISTERS}
        with tempfile.TemporaryDirectory() as root:
            for _ in range(args.rounds):
                for mode, persister_type in PERSISTERS.items():
                    persister = persister_type(open_store(root, mode, keep_last=1))
                    measured = _round(trainer, persister, args.every, args.checkpoints)
                    checkpoint_bytes = measured.pop("bytes")
                    for key, values in measured.items():
                        samples[mode][key] += values
        params = sum(p.numel() for p in trainer.model.parameters())
        for mode, sample in samples.items():
            step_s, block_s = statistics.mean(sample["step_s"]), statistics.mean(sample["block_s"])
            rows.append({"model": label, "params": params, "checkpoint_mb": checkpoint_bytes / 1e6, "persist": mode,
                         "mean_step_s": step_s, "mean_block_s": block_s, "max_block_s": max(sample["block_s"]),
                         "block_over_step": block_s / step_s, "interval_s": args.every * step_s + block_s,
                         "mean_persist_s": statistics.mean(sample["persist_s"]),
                         "num_checkpoints": len(sample["block_s"])})
        print(f"measured {label}", flush=True)
    header = (f"{'model':<24} {'params':>11} {'ckpt MB':>8} {'persist':>7} {'step s':>7} {'block s':>8} "
              f"{'max blk s':>9} {'block/step':>10} {'interval s':>10} {'save s':>7}")
    print(header)
    for r in rows:
        print(f"{r['model']:<24} {r['params']:>11,} {r['checkpoint_mb']:>8.1f} {r['persist']:>7} "
              f"{r['mean_step_s']:>7.3f} {r['mean_block_s']:>8.4f} {r['max_block_s']:>9.4f} "
              f"{r['block_over_step']:>10.4f} {r['interval_s']:>10.3f} {r['mean_persist_s']:>7.3f}")
    result = {"benchmark": "checkpoint_blocking", "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "every": args.every,
              "checkpoints_per_round": args.checkpoints, "rounds": args.rounds, "rows": rows,
              "time_unix": round(time.time())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
