"""Sharded (DCP) checkpoints on 2 local ranks: what one costs the training loop, async vs sync, and the
host memory a rank needs to save and to load one, against the size of its shard.

Both ranks (`shadow.launch.run_ranks`, FSDP2 over gloo, `resources.cpus_per_rank=1`) build the trainer of
one model size, train a warm-up step (from then on the optimizer state exists), and then:

1. Blocking, in alternating rounds (sync, async, sync, async, ...: machine noise hits both alike). A round
   takes `--checkpoints` checkpoints, each followed by `--every` training steps, with a `SyncPersister` or
   an `AsyncPersister` over the trainer's checkpoint group, as `shadow train` does. Blocking is what the
   loop loses: `persister.submit(trainer.snapshot())` (async: the CPU staging copy and any wait for the
   previous save; sync: also the collective save) plus, for async, the save still running when the round
   ends (`close`). "block s" is a round's blocking per checkpoint (median over rounds), reported against
   the median step time of the same persister and async against sync. Steps that overlap a background
   save share the cores with it, so "ckpt+steps s", a round's wall time per checkpoint (its `--every`
   steps included), is the figure that shows what async really saves.
2. Host memory per rank: the increase of the process's resident memory over a phase, from its RSS at the
   start to its high-water mark (Linux `VmHWM`, reset through `/proc/self/clear_refs`; free heap is handed
   back with `malloc_trim` first, so an allocation cannot hide in memory freed earlier). Phases: taking the
   snapshot (the staging copy, expected ~1x the shard), the collective save of it (`store.save`, what the
   persister's thread runs), and loading the checkpoint back (`trainer.load_checkpoint` into the trained
   trainer: its own state already exists, so what is measured is the reading). Each is divided by the
   rank's shard, the bytes of its data file `rank-NNNNN.bin`.
   Under glibc's default allocator RSS also holds memory freed during the phase and not yet returned:
   the old optimizer state a load replaces and the chunks read are freed into the heap, and their
   replacements do not all fit the holes (they are returned by the next `malloc_trim`; nothing of them is
   live). So each memory phase runs twice, in separate rank processes: with the "glibc" default, what a
   run sees, and with "mmap": `mallopt(M_MMAP_THRESHOLD, 64 KiB)` before the trainer is built, so every
   buffer of 64 KiB or more is mapped on allocation and unmapped when freed, and RSS follows the bytes
   that are live.
3. Resharding: one rank (1 x 2 micro-batches, the same job, a fresh process) loads the 2-rank checkpoint,
   measured the same way under both allocators, against the whole checkpoint's data.

    python bench/sharded_checkpoint.py [--rounds 2] [--every 2] [--checkpoints 2] [--sizes ...]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from common import print_table, write_result

from shadow.checkpoint import AsyncPersister, CheckpointFailed, CommitInfo, SyncPersister, open_store
from shadow.checkpoint.tensor_index import data_file
from shadow.config import load_job
from shadow.distributed import layout_for
from shadow.launch import run_ranks
from shadow.trainer import Trainer

TINY_JOB = Path(__file__).resolve().parents[1] / "jobs" / "tiny.yaml"
SIZES = {
    "tiny (4x128)": [],
    # ~102M parameters: weights and two AdamW moments in fp32 are ~1.2 GB of checkpoint. Batch 2 x 64 tokens
    # keeps a step near 10 s here (emulated FP8, one core per rank); the state to save does not depend on it
    "1.2 GB (8x1024, batch 2x64)": ["model.num_layers=8", "model.d_model=1024", "model.num_heads=16",
                                    "batch_size=2", "model.seq_len=64"],
}
NUM_RANKS = 2
PERSISTERS = {"sync": SyncPersister, "async": AsyncPersister}
ALLOCATORS = {"glibc": 0, "mmap": 64 * 1024}  # name -> M_MMAP_THRESHOLD (0: glibc's default, adaptive)
MB = 1e6
PHASES = ("snapshot", "save", "load")
_libc = ctypes.CDLL(None)


def _job(overrides: list[str], num_ranks: int):
    # the same 2 micro-batches at both world sizes: the job hash matches, so 1 rank may load 2 ranks' checkpoint
    return load_job(str(TINY_JOB), [*overrides, "resources.cpus_per_rank=1", f"resources.num_ranks={num_ranks}",
                                    f"resources.grad_accum={NUM_RANKS // num_ranks}"])


def _use_allocator(name: str) -> None:
    if ALLOCATORS[name] and not _libc.mallopt(-3, ALLOCATORS[name]):  # -3: M_MMAP_THRESHOLD (malloc.h)
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: this benchmark needs glibc")


class HighWater:
    """This process's peak resident memory over a `with` block, as `increase` in bytes above its start."""

    def __enter__(self) -> HighWater:
        gc.collect()
        _libc.malloc_trim(0)  # glibc: freed heap back to the OS, so reusing it cannot hide a buffer
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc_info) -> None:
        self.peak = _status_bytes("VmHWM")
        self.increase = self.peak - self.start


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {key}: this benchmark needs Linux")


def _round(trainer: Trainer, persister, every: int, checkpoints: int) -> dict:
    started_round = time.perf_counter()
    step_s, block_s = [], 0.0
    for _ in range(checkpoints):
        started = time.perf_counter()
        persister.submit(trainer.snapshot())
        block_s += time.perf_counter() - started
        step_s += [trainer.train_step().step_time_s for _ in range(every)]
    started = time.perf_counter()
    events = persister.close()
    block_s += time.perf_counter() - started
    failed = [e for e in events if isinstance(e, CheckpointFailed)]
    assert not failed, f"checkpoint failed: {failed[0]}"
    commits = [e for e in events if isinstance(e, CommitInfo)]
    assert len(commits) == checkpoints, f"expected {checkpoints} commits, got {commits}"
    return {"step_s": step_s, "block_s": block_s / checkpoints,
            "round_s": (time.perf_counter() - started_round) / checkpoints,
            "persist_s": statistics.mean(c.seconds for c in commits)}


def _memory(trainer: Trainer, store, rank: int) -> dict:
    with HighWater() as snapshot_phase:
        snapshot = trainer.snapshot()
    with HighWater() as save_phase:
        commit = store.save(snapshot, trainer.checkpoint_group)
    del snapshot
    step_dir = Path(store.step_uri(commit.step))
    with HighWater() as load_phase:
        trainer.load_checkpoint(store.open(commit.step, trainer.job_hash, trainer.checkpoint_layout))
    assert trainer.step == commit.step
    return {"step": commit.step, "shard_bytes": (step_dir / data_file(rank)).stat().st_size,
            "rss_before": snapshot_phase.start, "peak_rss": max(p.peak for p in (snapshot_phase, save_phase, load_phase)),
            "snapshot_increase": snapshot_phase.increase, "save_increase": save_phase.increase,
            "load_increase": load_phase.increase, "commit_bytes": commit.num_bytes,
            "manifest": json.loads((step_dir / "MANIFEST.json").read_text()) if rank == 0 else None}


def _two_ranks(layout, overrides: list[str], root: str, allocator: str, rounds: int, every: int,
               checkpoints: int) -> list[dict]:
    _use_allocator(allocator)
    trainer = Trainer(_job(overrides, layout.world_size), layout)
    trainer.train_step()  # warm-up
    blocking = {mode: {"step_s": [], "block_s": [], "round_s": [], "persist_s": []} for mode in PERSISTERS}
    for _ in range(rounds):
        for mode, persister_type in PERSISTERS.items():
            dist.barrier()
            persister = persister_type(open_store(root, mode, keep_last=1), trainer.checkpoint_group,
                                       leader=layout.rank == 0)
            for key, value in _round(trainer, persister, every, checkpoints).items():
                blocking[mode][key] += value if isinstance(value, list) else [value]
    dist.barrier()
    memory = _memory(trainer, open_store(root, f"memory-{allocator}"), layout.rank)
    mine = {"rank": layout.rank, "blocking": blocking, **memory,
            "params": sum(p.numel() for p in trainer.model.parameters())}  # DTensors: the global count
    gathered = [None] * layout.world_size
    dist.all_gather_object(gathered, mine)
    return gathered


def _one_rank_load(overrides: list[str], root: str, run: str, step: int, allocator: str) -> dict:
    _use_allocator(allocator)
    trainer = Trainer(_job(overrides, 1), layout_for(NUM_RANKS, 1, 0))
    trainer.train_step()  # its optimizer state exists, as in the 2-rank load
    store = open_store(root, run)
    with HighWater() as load_phase:
        trainer.load_checkpoint(store.open(step, trainer.job_hash, trainer.checkpoint_layout))
    assert trainer.step == step
    return {"rss_before": load_phase.start, "peak_rss": load_phase.peak, "load_increase": load_phase.increase}


def _fresh_process(fn, *args):
    """`fn(*args)` in a new spawned process (`run_ranks` would run one rank in this one)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def measure(label: str, overrides: list[str], rounds: int, every: int, checkpoints: int) -> tuple[list, list, list]:
    runs = {}
    with tempfile.TemporaryDirectory() as root:
        for allocator in ALLOCATORS:  # blocking is timed under glibc's default allocator only
            ranks = run_ranks(NUM_RANKS, NUM_RANKS, _two_ranks, overrides, root, allocator,
                              rounds if allocator == "glibc" else 0, every, checkpoints)
            one = _fresh_process(_one_rank_load, overrides, root, f"memory-{allocator}", ranks[0]["step"], allocator)
            runs[allocator] = ranks, one
    common = {"model": label, "params": runs["glibc"][0][0]["params"],
              "checkpoint_mb": runs["glibc"][0][0]["commit_bytes"] / MB}
    blocking_rows = []
    for rank in runs["glibc"][0]:
        medians = {mode: {key: statistics.median(values) for key, values in sample.items()}
                   for mode, sample in rank["blocking"].items()}
        for mode, m in medians.items():
            blocking_rows.append({**common, "rank": rank["rank"], "persist": mode, "step_s": m["step_s"],
                                  "block_s": m["block_s"], "block_over_step": m["block_s"] / m["step_s"],
                                  "over_sync": m["block_s"] / medians["sync"]["block_s"],
                                  "round_s": m["round_s"], "persist_s": m["persist_s"],
                                  "samples": rank["blocking"][mode]})
    memory_rows, saved = [], []
    for allocator, (ranks, one) in runs.items():
        manifest = ranks[0]["manifest"]
        files = {e["path"]: e["bytes"] for e in manifest["files"]}
        data_bytes = sum(size for name, size in files.items() if name.startswith("rank-"))
        saved.append({"model": label, "allocator": allocator, "step": ranks[0]["step"],
                      "commit_bytes": ranks[0]["commit_bytes"], "data_bytes": data_bytes, "files": files})
        for rank in ranks:
            shard = rank["shard_bytes"]
            memory_rows.append({**common, "allocator": allocator, "world": NUM_RANKS, "rank": rank["rank"],
                                "shard_bytes": shard, "shard_mb": shard / MB, "rss_before_mb": rank["rss_before"] / MB,
                                "peak_rss_mb": rank["peak_rss"] / MB,
                                **{f"{phase}_mb": rank[f"{phase}_increase"] / MB for phase in PHASES},
                                **{f"{phase}_over_shard": rank[f"{phase}_increase"] / shard for phase in PHASES}})
        memory_rows.append({**common, "allocator": allocator, "world": 1, "rank": 0, "shard_bytes": data_bytes,
                            "shard_mb": data_bytes / MB, "rss_before_mb": one["rss_before"] / MB,
                            "peak_rss_mb": one["peak_rss"] / MB, "load_mb": one["load_increase"] / MB,
                            "load_over_shard": one["load_increase"] / data_bytes})
    print(f"measured {label}", flush=True)
    return blocking_rows, memory_rows, saved


BLOCKING = [("model", "model", ""), ("params", "params", ","), ("checkpoint_mb", "ckpt MB", ".1f"), ("rank", "rank", ""),
            ("persist", "persist", ""), ("step_s", "step s", ".3f"), ("block_s", "block s", ".4f"),
            ("block_over_step", "block/step", ".3f"), ("over_sync", "vs sync", ".3f"),
            ("round_s", "ckpt+steps s", ".3f"), ("persist_s", "save s", ".3f")]
MEMORY = [("model", "model", ""), ("allocator", "allocator", ""), ("world", "ranks", ""), ("rank", "rank", ""), ("shard_mb", "shard MB", ".1f"),
          ("rss_before_mb", "RSS MB", ".0f"), ("peak_rss_mb", "peak MB", ".0f"),
          ("snapshot_mb", "snapshot +MB", ".1f"), ("snapshot_over_shard", "/shard", ".3f"),
          ("save_mb", "save +MB", ".1f"), ("save_over_shard", "/shard", ".3f"),
          ("load_mb", "load +MB", ".1f"), ("load_over_shard", "/shard", ".3f")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--every", type=int, default=2, help="steps after each checkpoint")
    parser.add_argument("--checkpoints", type=int, default=2, help="checkpoints per round and persister")
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), help="subset of %(default)s")
    parser.add_argument("--out")
    args = parser.parse_args()
    blocking, memory, checkpoints = [], [], []
    for label in args.sizes:
        rows = measure(label, SIZES[label], args.rounds, args.every, args.checkpoints)
        blocking += rows[0]
        memory += rows[1]
        checkpoints += rows[2]
    print_table(BLOCKING, blocking, "blocking per checkpoint, 2 ranks (medians over rounds)")
    print_table(MEMORY, memory, "host memory per rank: increase over the phase's starting RSS "
                                "(1 rank: loads the 2-rank checkpoint; its 'shard' is all of the data)")
    write_result("sharded_checkpoint", {"torch": torch.__version__, "num_ranks": NUM_RANKS, "every": args.every,
                                        "checkpoints_per_round": args.checkpoints, "rounds": args.rounds,
                                        "blocking": blocking, "memory": memory, "checkpoints": checkpoints}, args.out)


if __name__ == "__main__":
    main()
