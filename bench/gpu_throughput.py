"""GPU: FP8 over BF16 training throughput (tokens/s), side by side, for the model sizes that fit.

Needs a CUDA GPU; without one it says so and exits 0 (nothing is written). FP8 runs through
Transformer Engine when it imports (delayed scaling), else torchao (current scaling, tensorwise); BF16
is real bf16 autocast. For each size, eager and `resources.compile` (torch.compile of the forward),
one trainer per precision trains in alternating rounds (so clock and thermal drift hit both alike);
the table reports median tokens/s and their ratio. Telemetry is off (its cost is measured apart).
Sizes: the tiny job (4x128), jobs/gpu_100m.yaml (12x768, seq 1024) and a 4-layer slice at width 4096
(a 7B-class model's GEMMs); a batch is cut until it fits.

    python bench/gpu_throughput.py [--rounds 5] [--steps-per-round 10] [--no-compile]
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch
from common import REPO, median, print_table, write_result

from shadow.config import load_job
from shadow.trainer import Trainer

# label -> (job file, overrides); the 4x4096 slice has a 7B-class model's GEMM shapes
SIZES = {
    "tiny (4x128)": ("jobs/tiny.yaml", []),
    "100M (12x768, seq 1024)": ("jobs/gpu_100m.yaml", []),
    "4x4096 (seq 2048)": ("jobs/gpu_100m.yaml", ["model.num_layers=4", "model.d_model=4096", "model.num_heads=32",
                                                 "model.seq_len=2048", "batch_size=8"]),
}


def fp8_backend() -> list[str]:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # not installed, or installed without a usable CUDA build
        return ["precision.backend=torchao", "precision.scaling=current"]
    return ["precision.backend=te", "precision.scaling=delayed"]


def build(job_path: str, overrides: list[str], mode: str) -> Trainer:
    """A trainer for the size, halving the batch until a step fits in memory."""
    batch = load_job(str(REPO / job_path), overrides).batch_size
    while True:
        job = load_job(str(REPO / job_path), overrides + [f"batch_size={batch}", f"precision.mode={mode}"])
        try:
            trainer = Trainer(job)
            for _ in range(3):  # warm-up: kernels chosen, FP8 scales populated
                trainer.train_step()
            return trainer
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
        trainer = None  # the failed trainer (and the exception's frames) must go before the next try
        gc.collect()
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), help="subset of %(default)s")
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_throughput: skipped, no CUDA GPU visible (this benchmark needs one)")
        return 0
    gpu = torch.cuda.get_device_name(0)
    backend = fp8_backend()
    rows = []
    variants = [(label, compiled) for label in args.sizes for compiled in (False, True)
                if not (compiled and args.no_compile)]
    for label, compiled in variants:
        job_path, size = SIZES[label]
        overrides = size + backend + ["resources.device=cuda", "telemetry.every_steps=0",
                                      f"resources.compile={compiled}"]
        trainers = {mode: build(job_path, overrides, mode) for mode in ("bf16", "fp8")}
        # both precisions at the same batch: the smaller of the two that fitted
        batch = min(t.job.batch_size for t in trainers.values())
        if any(t.job.batch_size != batch for t in trainers.values()):
            del trainers
            gc.collect()
            torch.cuda.empty_cache()
            trainers = {mode: build(job_path, overrides + [f"batch_size={batch}"], mode) for mode in ("bf16", "fp8")}
        if len({t.job.batch_size for t in trainers.values()}) != 1:
            raise RuntimeError(f"{label}: BF16 and FP8 fit different batches "
                               f"({ {m: t.job.batch_size for m, t in trainers.items()} }); no like-for-like ratio")
        times = {mode: [] for mode in trainers}
        for _ in range(args.rounds):
            for mode, trainer in trainers.items():
                times[mode] += [trainer.train_step().step_time_s for _ in range(args.steps_per_round)]
        job = trainers["bf16"].job
        tokens = job.batch_size * job.model.seq_len
        params = sum(p.numel() for p in trainers["bf16"].model.parameters())
        bf16, fp8 = tokens / median(times["bf16"]), tokens / median(times["fp8"])
        rows.append({"model": label, "compiled": compiled, "params": params, "batch": job.batch_size, "bf16_tokens_s": bf16,
                     "fp8_tokens_s": fp8, "fp8_over_bf16": fp8 / bf16})
        del trainers
        gc.collect()
        torch.cuda.empty_cache()
    print_table([("model", "model", ""), ("compiled", "compiled", ""), ("params", "params", ","), ("batch", "batch", "d"),
                 ("bf16_tokens_s", "bf16 tok/s", ",.0f"), ("fp8_tokens_s", "fp8 tok/s", ",.0f"),
                 ("fp8_over_bf16", "fp8/bf16", ".2f")], rows,
                title=f"\nGPU throughput on {gpu}, FP8 via {backend[0].split('=')[1]}: median over "
                      f"{args.rounds} alternating rounds of {args.steps_per_round} steps")
    write_result("gpu_throughput", {"gpu": gpu, "fp8_backend": backend, "torch": torch.__version__,
                                    "rounds": args.rounds, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
