"""FP8 layer selection: step time of FP8 with every block layer converted and with `auto`, over BF16.

At two widths, the built-in model trains in BF16, in FP8 with every linear layer of its blocks in FP8
(`precision.fp8_layers: {}`), and in FP8 with `auto` (only GEMMs large enough to gain, by torchao's
thresholds for the backend's recipe). The three are timed in alternating rounds in one process and the
table gives medians and their ratio to BF16, with which layers each selection converted.

On a CPU FP8 is emulated (quantize-dequantize over fp32 GEMMs), so every converted layer costs time
and none gains: the ratio shows what the conversion costs here, and that `auto` leaves the narrow
model's layers alone. On a GPU (`--device cuda --backend torchao`) the same command measures real FP8.

    python bench/fp8_layer_selection.py [--rounds 5] [--steps-per-round 3] [--backend emulated]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import print_table, write_result

from shadow.config import load_job
from shadow.trainer import Trainer

WIDTHS = {  # d_model -> (heads, SwiGLU width); two blocks, 128 tokens x 8 sequences a step
    256: (4, 704),  # every GEMM below torchao's tensorwise threshold: `auto` converts none
    1024: (8, 2816),  # wqkv (N 3072) and w_gate/w_up (N 2816) pass it; wo and w_down (N 1024) do not
}
SELECTIONS = {"all": "false", "auto": "true"}


def _trainer(width: int, mode: str, auto: str, args) -> Trainer:
    heads, ffn = WIDTHS[width]
    overrides = ["model.num_layers=2", f"model.d_model={width}", f"model.num_heads={heads}", f"model.ffn_hidden={ffn}",
                 "model.seq_len=128", "batch_size=8", "telemetry.every_steps=0", f"precision.mode={mode}",
                 f"precision.fp8_layers.auto={auto}", f"precision.backend={args.backend}",
                 f"resources.device={args.device}", f"resources.cpus_per_rank={args.threads}"]
    if args.backend == "torchao":
        overrides.append("precision.scaling=current")
    trainer = Trainer(load_job(None, overrides))
    trainer.train_step()  # warm-up
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="*", default=list(WIDTHS), help="subset of %(default)s")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--backend", default="emulated", choices=["emulated", "torchao"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows, converted = [], {}
    for width in args.widths:
        variants = {"bf16": _trainer(width, "bf16", "false", args)}
        variants.update({f"fp8 {name}": _trainer(width, "fp8", auto, args) for name, auto in SELECTIONS.items()})
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, trainer in variants.items():
                times[name].extend(trainer.train_step().step_time_s for _ in range(args.steps_per_round))
        bf16 = statistics.median(times["bf16"])
        for name, trainer in variants.items():
            selection = trainer.fp8_selection
            step_s = statistics.median(times[name])
            num_fp8 = len(selection.fp8_names) if name != "bf16" else 0
            rows.append({"width": width, "variant": name, "num_fp8": num_fp8, "num_linear": len(selection.layers),
                         "step_s": step_s, "over_bf16": step_s / bf16})
            if name != "bf16":
                converted[f"{width} {name}"] = selection.fp8_names
    print_table([("width", "width", ""), ("variant", "variant", ""), ("num_fp8", "FP8 layers", ""),
                 ("num_linear", "of", ""), ("step_s", "s/step", ".3f"), ("over_bf16", "/ bf16", ".2f")], rows)
    for key, names in converted.items():
        print(f"{key}: {', '.join(names) or 'none'}")
    write_result("fp8_layer_selection", {"torch": torch.__version__, "backend": args.backend, "device": args.device,
                                         "threads": args.threads, "rounds": args.rounds,
                                         "steps_per_round": args.steps_per_round, "rows": rows,
                                         "converted": converted}, args.out)


if __name__ == "__main__":
    main()
