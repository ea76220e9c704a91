"""A model defined outside shadow (tests/plugins/gpt.py, and a Hugging Face LLaMA built from a config)
trained, sharded, replayed bit for bit and guarded by `shadow run`, exactly like the built-in model."""

import json
import os
import subprocess
import sys

import pytest
from conftest import FIXED_POLICY, REPO, kinds_of, shadow_run

from shadow.config import load_job
from shadow.trainer import Trainer

pytestmark = pytest.mark.slow

GPT = ["--set", "model.factory=plugins.gpt:build", "--set", "model.kwargs={width: 64, layers: 2, heads: 4, "
       "seq_len: 64, dropout: 0.1}", "--set", "model.seq_len=64", "--set", "batch_size=8"]
HF_LLAMA = ["--set", "model.factory=shadow.hf:causal_lm", "--set", "model.kwargs={model_type: llama, vocab_size: 256, "
            "hidden_size: 64, intermediate_size: 176, num_hidden_layers: 2, num_attention_heads: 4, "
            "num_key_value_heads: 2, max_position_embeddings: 64}", "--set", "model.seq_len=64",
            "--set", "batch_size=8"]
TINY = ["--job", str(REPO / "jobs/tiny.yaml")]


def shadow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shadow", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "trajectory.jsonl").read_text().splitlines()]


def _overrides(args: list[str]) -> list[str]:
    return [value for flag, value in zip(args[::2], args[1::2]) if flag == "--set"]


def test_a_plug_in_model_on_two_fsdp2_ranks_replays_bit_for_bit_on_one(tmp_path):
    """The plug-in's blocks (class GptBlock, found in its ModuleList `h`) are sharded with FSDP2; its own
    nn.Dropout masks follow the micro-batch, not the rank, so a one-rank replay is exact."""
    job = [*TINY, *GPT, "--set", "steps=6", "--set", "checkpoint.every_steps=3"]
    main_run = tmp_path / "main"
    done = shadow("train", *job, "--set", "resources.num_ranks=2", "--out", str(main_run))
    assert done.returncode == 0, done.stderr
    replay = tmp_path / "replay"
    done = shadow("replay", *job, "--set", "resources.num_ranks=1", "--checkpoint",
                  str(main_run / "checkpoints" / "main" / "step-000000003"), "--steps", "3", "--out", str(replay))
    assert done.returncode == 0, done.stderr
    assert losses(replay) == losses(main_run)[3:]


@pytest.mark.parametrize("model", ["gpt", "hf_llama"])
def test_a_plug_in_model_restored_from_a_snapshot_continues_bit_for_bit(model):
    args = GPT if model == "gpt" else HF_LLAMA
    job = load_job(str(REPO / "jobs/tiny.yaml"), _overrides(args) + ["telemetry.every_steps=2"])
    trainer = Trainer(job)
    for _ in range(2):
        trainer.train_step()
    snapshot = trainer.snapshot()
    records = [trainer.train_step() for _ in range(3)]
    replay = Trainer(job)
    replay.restore(snapshot)
    assert [replay.train_step().loss for _ in range(3)] == [r.loss for r in records]
    telemetry = records[0].telemetry
    assert "act/blocks.1/kurtosis" in telemetry
    has_swiglu = any(key.startswith("swiglu/") for key in telemetry)
    assert has_swiglu == (model == "hf_llama")  # LLaMA's MLP is SwiGLU; GPT's is GELU: absent, not zero


def test_a_factory_whose_model_does_not_return_logits_stops_train_at_start(tmp_path):
    done = shadow("train", *TINY, "--set", "model.factory=plugins.gpt:wrong_vocab", "--set", "steps=2",
                  "--out", str(tmp_path / "refused"))
    assert done.returncode != 0
    assert "model.factory 'plugins.gpt:wrong_vocab'" in done.stderr and "expected (1, 8, 256)" in done.stderr


@pytest.mark.usefixtures("local_ray")
def test_shadow_run_guards_a_plug_in_model_healthy_and_degraded(tmp_path):
    """Healthy: the GPT plug-in with dropout verifies clean and stays in FP8. Degraded: a Hugging Face
    LLaMA whose FP8 scales are multiplied by 1000 from step 20 fails its verification and falls back to
    BF16. Both log which layers ran in FP8."""
    policy = ["--set", "checkpoint.every_steps=25", *FIXED_POLICY, "--policy-set", "verify.every_n_steps=25",
              "--policy-set", "verify.window_steps=15"]
    code, _, summary, events = shadow_run(tmp_path / "healthy", *TINY, *GPT, "--set", "steps=40", *policy)
    assert code == 0 and summary["num_precision_switches"] == 0 and summary["num_verifications"] == 2
    assert all(v["level"] == "clean" for v in summary["verdicts"]), summary["verdicts"]
    (layers,) = kinds_of(events, "fp8_layers")
    assert layers["factory"] == "plugins.gpt:build" and layers["block_class"] == "GptBlock"
    assert layers["num_fp8"] == 8 and list(layers["bf16"]) == ["lm_head"]

    fault = ["--set", "precision.fault.start_step=20", "--set", "precision.fault.end_step=60",
             "--set", "precision.fault.scale_factor=1000.0"]
    code, _, summary, events = shadow_run(tmp_path / "degraded", *TINY, *HF_LLAMA, *fault, "--set", "steps=50",
                                          *policy)
    assert code == 0
    (layers,) = kinds_of(events, "fp8_layers")
    assert layers["block_class"] == "LlamaDecoderLayer" and layers["swiglu_telemetry"]
    violation = next(v for v in kinds_of(events, "verdict") if v["level"] == "violation")
    switch = kinds_of(events, "precision_switched")[0]
    assert switch["new"] == "bf16" and switch["reason"].startswith(
        f"window [{violation['window_start']}, {violation['window_end']})")
