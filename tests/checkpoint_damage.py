"""Real checkpoints of the tiny job, ways to damage them that the manifest's hashes do not catch, and
`shadow replay` run on them (in-process for speed, or in a real subprocess).

A checkpoint of the tiny job (one process) holds one data file `rank-00000.bin`, the index
`tensors.json` that says where each tensor's bytes are, and `meta.json` (`shadow/checkpoint/format.py`).
Most damage is followed by `resign`, which rewrites the manifest's sizes and sha256 to match the files as
they now are, and where values are edited by `rehash_chunks`, which does the same for the index's
per-chunk sha256: what bit rot "repaired" by a careless tool, or an attacker, leaves behind. What is left
to catch it is the validation of the content against the format and the job.
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

import torch
from conftest import FAST, REPO

from shadow.checkpoint import locate_checkpoint
from shadow.checkpoint.format import MANIFEST
from shadow.checkpoint.tensor_index import DTYPES, INDEX
from shadow.checkpoint.validate import META
from shadow.cli import main

JOB_ARGS = ["--job", str(REPO / "jobs/tiny.yaml"), *FAST]
STEP = 3  # the checkpoint the tests damage: after 3 steps, so it has optimizer state
STEP_DIR = f"step-{STEP:09d}"
DATA = "rank-00000.bin"  # the only data file of a one-process checkpoint
FILES = (DATA, INDEX, META)  # every file the manifest lists


def make_checkpoint(root: Path) -> Path:
    """Train the tiny job (shrunk by FAST) for 3 steps with `shadow train`; returns its step-3 checkpoint."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["train", *JOB_ARGS, "--steps", str(STEP), "--out", str(root / "main")]) == 0
    return root / "main" / "checkpoints" / "main" / STEP_DIR


def copy_checkpoint(source: Path, root: Path, run: str = "main") -> Path:
    """A copy laid out as <root>/ckpt/<run>/step-N, so `--checkpoint` can point at it."""
    target = root / "ckpt" / run / STEP_DIR
    shutil.copytree(source, target)
    return target


def edit_json(path: Path, change) -> None:
    """Let `change(document)` edit a JSON file's parsed content in place, and write it back."""
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def edit_index(step_dir: Path, change) -> None:
    """Let `change(tensors)` edit the index's tensors (name -> {dtype, shape, chunks}) in place."""
    edit_json(step_dir / INDEX, lambda index: change(index["tensors"]))


def resign(step_dir: Path) -> None:
    """Rewrite the manifest's sizes and sha256 to match every listed file as it is now."""
    manifest = json.loads((step_dir / MANIFEST).read_text())
    for entry in manifest["files"]:
        data = (step_dir / entry["path"]).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (step_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))


def rehash_chunks(step_dir: Path) -> None:
    """Rewrite every chunk's sha256 in the index to match the bytes it points at (the manifest is left to
    `resign`)."""
    files = {}

    def change(tensors):
        for entry in tensors.values():
            for chunk in entry["chunks"]:
                data = files.setdefault(chunk["file"], (step_dir / chunk["file"]).read_bytes())
                chunk["sha256"] = hashlib.sha256(data[chunk["offset"]: chunk["offset"] + chunk["bytes"]]).hexdigest()

    edit_index(step_dir, change)


def set_first_value(step_dir: Path, tensor: str, value: float) -> None:
    """Put `value` (e.g. NaN) into the first element of one tensor in its data file, then rehash its
    chunk and re-sign the manifest: a well-formed, signed checkpoint that holds the value."""
    entry = json.loads((step_dir / INDEX).read_text())["tensors"][tensor]
    chunk = next(c for c in entry["chunks"] if not any(c["offsets"]))
    raw = torch.tensor([value], dtype=DTYPES[entry["dtype"]]).view(torch.uint8).numpy().tobytes()
    with open(step_dir / chunk["file"], "r+b") as f:
        f.seek(chunk["offset"])
        f.write(raw)
    rehash_chunks(step_dir)
    resign(step_dir)


def rewrite_tensors(step_dir: Path, change) -> None:
    """Load the checkpoint's full tensors (full names -> tensors), let `change(tensors)` edit the dict in
    place, and save it again through the store: every file and hash is then as a real save writes it."""
    store, step = locate_checkpoint(str(step_dir))
    snapshot = store.load(step)
    change(snapshot.tensors)
    store.save(snapshot)


def flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


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
