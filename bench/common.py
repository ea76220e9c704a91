"""What every benchmark shares: the machine line, the table it prints and the JSON it writes.

Machines here are shared and noisy, so benchmarks report ratios of things measured side by side in one
run (alternating rounds, medians); absolute times are printed only next to their ratio.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
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


def run_shadow(args: list[str], job: Path, overrides: list[str], out: Path, env: dict | None = None) -> dict:
    """Run a `shadow` subcommand (`["train"]`, `["run", "--policy", P]`, ...) on `job` with `--set`
    overrides, in a fresh process (with `env` added to this one's environment); its summary.json."""
    sets = [a for o in overrides for a in ("--set", o)]
    cmd = [sys.executable, "-m", "shadow", *args, "--job", str(job), *sets, "--out", str(out)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def switches_to_bf16(run_dir: Path) -> list[tuple[int, tuple[int, int] | None]]:
    """Each switch of the main job to BF16, in order: (the step the main job had reached, for a rollback or
    an adoption its `old_step`; the window [start, end) of the last verdict before it, None if none)."""
    from shadow.rundir import read_events

    found, window, previous = [], None, None
    for event in read_events(run_dir):
        if event["event"] == "verdict":
            window = (event["window_start"], event["window_end"])
        elif event["event"] in ("rollback", "replay_adopted"):
            found.append((event["old_step"], window))
        # a restart's own precision_switched follows it at once: the same switch
        elif event["event"] == "precision_switched" and event["new"] == "bf16" and previous not in (
                "rollback", "replay_adopted"):
            found.append((event["step"], window))
        previous = event["event"]
    return found


def switch_step(run_dir: Path) -> int | None:
    """The main job's step when the first switch to BF16 was applied."""
    return next((step for step, _ in switches_to_bf16(run_dir)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(num_cpus: int, log_path: Path):
    """One local Ray head on 127.0.0.1 for a whole benchmark: each `shadow run --ray-address ADDRESS`
    joins it instead of starting a Ray of its own (seconds each on a loaded machine). Yields the address
    and the environment a client needs (the head's own auth token, as a secured cluster has); the head is
    stopped on exit. Every port is chosen free, so another Ray on the machine cannot collide."""
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env = {**os.environ, **client_env,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    port = _free_port()
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={port}", f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
             f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log_path.read_text():
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the Ray head did not start; see {log_path}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", client_env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
