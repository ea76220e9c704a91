"""Real checkpoints of the tiny job, ways to damage them that the manifest's hashes do not catch, and
`shadow replay` run on them (in-process for speed, or in a real subprocess).

Every damage is followed by `resign`, which rewrites the manifest's sizes and sha256 to match the files
as they now are: what bit rot "repaired" by a careless tool, or an attacker, leaves behind. What is
left to catch it is the validation of the content against the format and the job.
"""

import contextlib
import hashlib
import io
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import FAST, REPO
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from shadow.checkpoint.format import MANIFEST
from shadow.cli import main

JOB_ARGS = ["--job", str(REPO / "jobs/tiny.yaml"), *FAST]
STEP = 3  # the checkpoint the tests damage: after 3 steps, so it has optimizer state
STEP_DIR = f"step-{STEP:09d}"
DATA_FILES = ("model.safetensors", "optim.safetensors", "precision.safetensors", "rng.safetensors", "meta.json")


def make_checkpoint(root: Path) -> Path:
    """Train the tiny job (shrunk by FAST) for 3 steps with `shadow train`; returns its step-3 checkpoint."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["train", *JOB_ARGS, "--steps", str(STEP), "--out", str(root / "main")]) == 0
    return root / "main" / "checkpoints" / "main" / STEP_DIR


def copy_checkpoint(source: Path, root: Path) -> Path:
    """A copy laid out as <root>/ckpt/<run>/step-N, so `--checkpoint` can point at it."""
    target = root / "ckpt" / "main" / STEP_DIR
    shutil.copytree(source, target)
    return target


def resign(step_dir: Path) -> None:
    """Rewrite the manifest's sizes and sha256 to match every listed file as it is now."""
    manifest = json.loads((step_dir / MANIFEST).read_text())
    for entry in manifest["files"]:
        data = (step_dir / entry["path"]).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (step_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    """(header as a dict, data section)."""
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]), data[8 + header_len :]


def join_safetensors(header: dict | bytes, body: bytes) -> bytes:
    """A safetensors file from a header (a dict, or raw header bytes) and a data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def rewrite_tensors(path: Path, change) -> None:
    """Decode a safetensors file, let `change(tensors)` edit the dict in place, and save it again."""
    tensors = load_safetensors(path.read_bytes())
    change(tensors)
    path.write_bytes(save_safetensors(tensors))


class Planted:
    """Unpickling this creates `marker`: proof that a checkpoint's pickle was (or was not) executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def planted_pickle(marker: Path) -> bytes:
    return pickle.dumps(Planted(marker))


def replay_args(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["replay", *JOB_ARGS, "--checkpoint", str(checkpoint), "--steps", "1", "--out", str(out), *extra]


def replay(checkpoint: Path, out: Path, *extra: str) -> tuple[int, str]:
    """`shadow replay` of one step from `checkpoint`, in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(replay_args(checkpoint, out, *extra))
    return code, err.getvalue()


def replay_subprocess(checkpoint: Path, out: Path, *extra: str) -> tuple[int, str]:
    """The same through the console entry point, in a real process."""
    done = subprocess.run([sys.executable, "-m", "shadow", *replay_args(checkpoint, out, *extra)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    return done.returncode, done.stderr


def refusal(code: int, stderr: str, checkpoint: Path, files) -> str:
    """Assert a clean refusal (exit 2, one line, no traceback) naming one of `files` of `checkpoint`;
    returns the message without the command's prefix."""
    lines = stderr.splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, f"exit {code}, stderr:\n{stderr}"
    prefix = "cannot replay: "
    assert lines[0].startswith(prefix), lines[0]
    message = lines[0][len(prefix):]
    named = [f for f in ([files] if isinstance(files, str) else files) if message.startswith(f"{checkpoint}/{f}: ")]
    assert named, f"{message!r} names none of {files}"
    return message


def set_first_value(step_dir: Path, file: str, tensor: str, value: float) -> None:
    """Put `value` (e.g. NaN) into the first element of one tensor, keeping everything else."""
    def change(tensors):
        tensors[tensor] = tensors[tensor].clone()
        tensors[tensor].view(-1)[0] = value

    rewrite_tensors(step_dir / file, change)

