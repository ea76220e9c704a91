"""Run one function on N local rank processes (what `shadow train` and `shadow replay` do for
`resources.num_ranks` > 1 without Ray), and return rank 0's answer.

Each rank is a fresh process (spawned, so no torch or thread state is inherited) that joins a group
at a free local port; `body(layout, *args)` runs the rank. If any rank fails or dies, the others are
stopped and the failure is raised here naming the rank, so a laptop run never hangs on a dead peer.
"""

from __future__ import annotations

import multiprocessing
import queue
import socket
from typing import Callable

from shadow.distributed import RankLayout, layout_for


class RankFailed(RuntimeError):
    """A rank process raised or died; the message names the rank and what happened."""


def run_ranks(num_ranks: int, num_micro_batches: int, body: Callable, *args):
    """Run `body(layout, *args)` on `num_ranks` processes; returns rank 0's return value."""
    if num_ranks == 1:
        return body(layout_for(num_micro_batches, 1, 0), *args)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    address = f"127.0.0.1:{_free_port()}"
    processes = [context.Process(target=_rank_main, name=f"shadow-rank-{rank}", daemon=False,
                                 args=(results, layout_for(num_micro_batches, num_ranks, rank, address), body, args))
                 for rank in range(num_ranks)]
    for process in processes:
        process.start()
    answers: dict[int, object] = {}
    try:
        while len(answers) < num_ranks:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(processes) if p.exitcode not in (None, 0)
                        and r not in answers]
                if dead:
                    rank, code = dead[0]
                    raise RankFailed(f"rank {rank} of {num_ranks} died (exit code {code}) before finishing") from None
                continue
            if not ok:
                raise RankFailed(f"rank {rank} of {num_ranks} failed: {value}")
            answers[rank] = value
    finally:
        for process in processes:
            if process.is_alive() and len(answers) < num_ranks:
                process.terminate()
        for process in processes:
            process.join()
    return answers[0]


def _rank_main(results, layout: RankLayout, body: Callable, args: tuple) -> None:
    import torch.distributed as dist

    try:
        value = body(layout, *args)
    except BaseException as exc:  # reported to the launcher, which stops the other ranks
        results.put((layout.rank, False, f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    results.put((layout.rank, True, value))
    if dist.is_initialized():  # a clean exit, without torch's warning about a group left open
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
