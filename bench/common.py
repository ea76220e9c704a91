"""What every benchmark shares: the machine line, the table it prints and the JSON it writes.

Machines here are shared and noisy, so benchmarks report ratios of things measured side by side in one
run (alternating rounds, medians); absolute times are printed only next to their ratio.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
# `--set` overrides for a small model (as tests/conftest.py FAST): same data and schedule, ~0.03 s/step
FAST = ["model.num_layers=2", "model.d_model=64", "model.seq_len=64", "batch_size=8"]


def machine() -> str:
    """One line naming the CPU (or GPU, when given) and the cores this process may use."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {platform.system()}"


def median(values) -> float:
    return statistics.median(values)


def print_table(columns: list[tuple[str, str, str]], rows: list[dict], title: str = "") -> str:
    """Print rows as a fixed-width table; `columns` are (key, header, format spec). Returns the text."""
    cells = [[_cell(row.get(key), spec) for key, _, spec in columns] for row in rows]
    widths = [max([len(header)] + [len(c[i]) for c in cells]) for i, (_, header, _) in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, ((_, h, _), w) in enumerate(zip(columns, widths))))
    for row in cells:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _cell(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str) or not spec:
        return str(value)
    return format(value, spec)


def write_result(name: str, result: dict, out: str | None = None) -> Path:
    """`bench/results/<name>.json` (or `out`), with the machine, the command line and the time."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), "command": " ".join(["python"] + sys.argv),
               **result, "time_unix": round(time.time())}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"written: {path}", flush=True)
    return path
