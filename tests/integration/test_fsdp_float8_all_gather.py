"""FSDP2 float8 all-gather (`precision.fsdp_float8_all_gather`, torchao tensorwise) on 2 CPU ranks over gloo:
the same losses, bit for bit, as the plain all-gather, in FP8 mode, in BF16 mode, across switches
FP8 -> BF16 -> FP8 within one process, and in replays of its checkpoints on 2 ranks and on 1.

`shadow train` and `shadow replay` run as real subprocesses; the switches drive the Trainer on 2 spawned
rank processes (`shadow.launch.run_ranks`, as `shadow train` does), since the CLI switches only at load.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import FAST, REPO

from shadow.config import load_job
from shadow.launch import run_ranks

pytestmark = pytest.mark.slow

STEPS = 4
TORCHAO = ["--set", "precision.backend=torchao", "--set", "precision.scaling=current"]
JOB = ["--job", str(REPO / "jobs/tiny.yaml"), *FAST, *TORCHAO, "--set", f"steps={STEPS}",
       "--set", "checkpoint.every_steps=2", "--set", "model.dropout=0.1", "--set", "optim.moments=fp8"]
ON = ["--set", "precision.fsdp_float8_all_gather=true"]


def shadow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shadow", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "trajectory.jsonl").read_text().splitlines()]


def train(out, *args: str) -> list[float]:
    done = shadow("train", *JOB, "--set", "resources.num_ranks=2", *args, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return losses(out)


@pytest.fixture(scope="module")
def fp8_run_with_float8_all_gather(tmp_path_factory):
    out = tmp_path_factory.mktemp("ag") / "on"
    return out, train(out, *ON)


def test_fp8_losses_equal_the_plain_all_gather(fp8_run_with_float8_all_gather, tmp_path):
    """Each shard cast with the max-reduced amax is the cast of the full weight: the same FP8 GEMMs."""
    _, on = fp8_run_with_float8_all_gather
    assert on == train(tmp_path / "off")
    assert len(on) == STEPS


def test_bf16_losses_equal_the_plain_all_gather(tmp_path):
    on = train(tmp_path / "on", *ON, "--precision", "bf16")
    assert on == train(tmp_path / "off", "--precision", "bf16")


@pytest.mark.parametrize("num_ranks, option", [(2, ON), (1, ON), (2, [])])
def test_its_checkpoint_replays_exactly(fp8_run_with_float8_all_gather, tmp_path, num_ranks, option):
    """On 2 ranks and on 1 (where the option does nothing), and by a job without the option: it is not part
    of the job hash, since it changes no number."""
    run_dir, on = fp8_run_with_float8_all_gather
    checkpoint = run_dir / "checkpoints" / "on" / "step-000000002"
    done = shadow("replay", *JOB, *option, "--set", f"resources.num_ranks={num_ranks}", "--checkpoint",
                  str(checkpoint), "--steps", "2", "--out", str(tmp_path / "replay"))
    assert done.returncode == 0, done.stderr
    assert losses(tmp_path / "replay") == on[2:]


SWITCHES = ["fp8", "fp8", "bf16", "bf16", "fp8", "fp8"]  # the precision of each step


def _train_with_switches(layout, overrides: list[str]) -> list[tuple[float, str, str]]:
    """One rank: each step of SWITCHES (and an evaluation after it), with the weight an FP8 layer computed
    with (a torchao Float8TrainingTensor is an FP8-gathered weight) and FSDP2's all-gather buffer dtype."""
    from shadow.trainer import Trainer

    trainer = Trainer(load_job(None, overrides), layout)
    layer = trainer.model.get_submodule("blocks.0.attn.wqkv")
    seen = []
    layer.register_forward_pre_hook(lambda module, _: seen.append(type(module.weight).__name__))
    block_state = trainer.model.get_submodule("blocks.0")._get_fsdp_state()
    (fsdp_param,) = [p for g in block_state._fsdp_param_groups for p in g.fsdp_params
                     if p.sharded_param is layer.weight]
    rows = []
    for precision in SWITCHES:
        trainer.set_precision(precision)
        loss = trainer.train_step().loss
        eval_loss = trainer.evaluate(1)
        rows.append((loss, eval_loss, seen[-1], str(fsdp_param.all_gather_outputs[0].dtype)))
    return rows


def test_switches_fp8_bf16_fp8_keep_the_plain_losses():
    overrides = [*FAST[1::2], "steps=20", "precision.backend=torchao", "precision.scaling=current",
                 "resources.num_ranks=2", "model.dropout=0.1"]
    on = run_ranks(2, 2, _train_with_switches, [*overrides, "precision.fsdp_float8_all_gather=true"])
    off = run_ranks(2, 2, _train_with_switches, overrides)
    assert [row[:2] for row in on] == [row[:2] for row in off]
    fp8 = str(torch.float8_e4m3fn)
    assert [row[2:] for row in on] == [("Float8TrainingTensor", fp8) if p == "fp8" else ("Parameter", "torch.float32")
                                       for p in SWITCHES]
    assert {row[2:] for row in off} == {("Parameter", "torch.float32")}
