"""The job schema: what to train, on what data, in which precision, checkpointed where.

`jobs/*.yaml` files are merged over these defaults (see `loader.load_config`). Field comments are the
documentation users read; `shadow train --help` points here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from shadow.config.loader import load_config

# eXmY: X exponent bits, Y mantissa bits. Emulation rounds through fp32, so X <= 8 and Y <= 22.
FORMAT_PATTERN = re.compile(r"^e([1-8])m([0-9]|1[0-9]|2[0-2])$")
NAMED_FORMATS = ("hybrid", "e4m3", "e5m2")
FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


class PrecisionMode(str, Enum):
    FP8 = "fp8"
    BF16 = "bf16"


class Fp8Backend(str, Enum):
    EMULATED = "emulated"  # quantize-dequantize in plain torch: CPU and GPU, any eXmY format
    TORCHAO = "torchao"  # torchao float8 training: real FP8 GEMMs on Hopper, emulate=True on CPU
    TE = "te"  # NVIDIA Transformer Engine: GPU only, optional extra `shadow[te]`


class Scaling(str, Enum):
    DELAYED = "delayed"  # scale from the amax history of earlier steps (Transformer Engine's default)
    CURRENT = "current"  # scale from this tensor's own amax (per-tensor, just in time)
    NONE = "none"  # no scaling: values cast to FP8 as they are (saturating); degrades training


class AmaxCompute(str, Enum):
    MAX = "max"  # largest amax in the history window
    MOST_RECENT = "most_recent"  # amax of the previous step only


class Moments(str, Enum):
    FP32 = "fp32"  # torch AdamW: both moments in fp32 (8 bytes per parameter)
    FP8 = "fp8"  # first moment E4M3, second moment E5M2, each with a per-tensor scale (2 bytes per parameter)


class DataSource(str, Enum):
    PYDOC = "pydoc"  # English text shipped with CPython (pydoc_data.topics), byte level: no download
    TEXT = "text"  # a UTF-8 (or any) text file at `path`, byte level
    TOKENS = "tokens"  # a memory-mapped `.bin` of token ids (`token_dtype`), nanoGPT/Megatron style


@dataclass
class ModelConfig:
    """The model: shadow's built-in LLaMA-style decoder (the architecture fields), or your own (`factory`).

    `seq_len` and `vocab_size` describe the data either way. With a factory the architecture fields
    are not used: your `kwargs` describe the model (see docs/models.md).
    """

    factory: str = ""  # "package.module:function" returning your nn.Module; "" = the built-in model
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments the factory is called with
    block_class: str = ""  # class name of the repeated block (FSDP2 shards per block; bf16_first/last_layers
    # count blocks); "" = found: the longest list of modules of one class (the built-in model's `Block`)
    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 4
    seq_len: int = 128
    vocab_size: int = 256  # 256 for byte-level sources; >= the largest id in a token file
    ffn_hidden: int = 0  # SwiGLU hidden width; 0 = LLaMA's 8/3 * d_model rounded up to a multiple of 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dropout: float = 0.0  # probability of zeroing an element of the embedding output and of each residual
    # branch (attention, SwiGLU) while training; masks come from the trainer's checkpointed random stream
    smooth_swiglu: bool = False  # Smooth-SwiGLU (Fishman et al. 2024): each channel of the SwiGLU output is
    # divided by a power-of-two scale before w_down quantizes it, and w_down's column multiplied back, so
    # the function (and BF16 training, bit for bit) is unchanged while FP8 sees no channel outliers

    def problems(self):
        found = []
        if self.factory and not FACTORY_PATTERN.match(self.factory):
            found.append(("factory", self.factory, "'package.module:function' (an importable module, a colon, "
                          "a callable in it)"))
        if self.kwargs and not self.factory:
            found.append(("kwargs", self.kwargs, "no kwargs without a factory (the built-in model takes the "
                          "architecture fields)"))
        if self.factory and self.smooth_swiglu:
            found.append(("smooth_swiglu", True, "false with a factory (Smooth-SwiGLU is a built-in model option)"))
        for name in ("num_layers", "d_model", "num_heads", "seq_len", "vocab_size"):
            if getattr(self, name) < 1:
                found.append((name, getattr(self, name), "a positive integer"))
        if self.num_heads >= 1 and self.d_model % self.num_heads:
            found.append(("d_model", self.d_model, f"a multiple of num_heads ({self.num_heads})"))
        elif self.num_heads >= 1 and (self.d_model // self.num_heads) % 2:
            found.append(("d_model", self.d_model, "an even head width d_model/num_heads (RoPE rotates pairs)"))
        if self.ffn_hidden < 0:
            found.append(("ffn_hidden", self.ffn_hidden, "0 (automatic) or a positive integer"))
        if self.init_std <= 0:
            found.append(("init_std", self.init_std, "a positive number"))
        if not 0.0 <= self.dropout < 1.0:
            found.append(("dropout", self.dropout, "a probability in [0, 1)"))
        return found

    @property
    def ffn_width(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return 32 * -(-(8 * self.d_model // 3) // 32)


@dataclass
class DataConfig:
    source: DataSource = DataSource.PYDOC
    path: str = ""  # file for `text` and `tokens` sources
    token_dtype: str = "uint16"  # `tokens` source: uint16 or uint32
    seed: int = 0  # batch for step s = f(data config, seed, s); change it to see other batches
    holdout_fraction: float = 0.1  # tail of the corpus kept out of training for evaluation

    def problems(self):
        found = []
        if self.source in (DataSource.TEXT, DataSource.TOKENS) and not self.path:
            found.append(("path", self.path, f"a file path for source '{self.source.value}'"))
        if self.token_dtype not in ("uint16", "uint32"):
            found.append(("token_dtype", self.token_dtype, "'uint16' or 'uint32'"))
        if not 0.0 < self.holdout_fraction < 0.5:
            found.append(("holdout_fraction", self.holdout_fraction, "a fraction in (0, 0.5)"))
        return found


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr`."""

    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    decay_steps: int = 0  # steps of cosine decay after warmup; 0 = until the job's last step
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    moments: Moments = Moments.FP32  # how AdamW stores its moments between steps (fp8: as in Fishman et al. 2024)

    def problems(self):
        found = []
        if not self.lr > 0:
            found.append(("lr", self.lr, "a positive number"))
        if not 0 <= self.min_lr <= self.lr:
            found.append(("min_lr", self.min_lr, f"a number in [0, lr={self.lr}]"))
        for name in ("warmup_steps", "decay_steps"):
            if getattr(self, name) < 0:
                found.append((name, getattr(self, name), "a non-negative integer"))
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                found.append((name, getattr(self, name), "a number in [0, 1)"))
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                found.append((name, getattr(self, name), "a non-negative number"))
        if not self.eps > 0:
            found.append(("eps", self.eps, "a positive number"))
        return found


class Operand(str, Enum):
    """A GEMM operand of an FP8 layer; each has its own quantization scale."""

    INPUT = "input"  # the activation entering the layer: forward format (E4M3 in hybrid)
    WEIGHT = "weight"  # the layer's weight: forward format
    GRAD_OUTPUT = "grad_output"  # the gradient of the layer's output: backward format (E5M2 in hybrid)


@dataclass
class FaultConfig:
    """Deliberate FP8 damage for testing the guard (like Megatron's error injection); docs/precision.md
    ("Injected FP8 faults") says what each shape of it models.

    From `start_step` (inclusive) to `end_step` (exclusive), the FP8 quantization scales of the operands
    in `roles` are multiplied by a factor, so they saturate (factor > 1) or underflow (factor < 1). BF16
    steps are untouched, which is what a real FP8 bug looks like. Disabled when end <= start.
    """

    start_step: int = 0
    end_step: int = 0
    scale_factor: float = 1.0  # the factor at full strength
    ramp_steps: int = 0  # 0 = full strength from start_step; N = the factor grows geometrically over N steps,
    # scale_factor ** ((step - start_step + 1) / N), reaching scale_factor at step start_step + N - 1: a slow drift
    roles: list[Operand] = field(default_factory=lambda: list(Operand))  # operands whose scales it multiplies;
    # [grad_output] = the gradient (E5M2) path only, the forward pass stays exact

    @property
    def enabled(self) -> bool:
        return self.end_step > self.start_step and self.scale_factor != 1.0

    def factor(self, step: int, role: Operand) -> float:
        """The multiplier of `role`'s scale at `step` (1 outside the fault)."""
        if not (self.enabled and self.start_step <= step < self.end_step and role in self.roles):
            return 1.0
        into = step - self.start_step + 1
        if into < self.ramp_steps:
            return self.scale_factor ** (into / self.ramp_steps)
        return self.scale_factor

    def problems(self):
        found = []
        if not self.scale_factor > 0:
            found.append(("scale_factor", self.scale_factor, "a positive number"))
        if not 0 <= self.ramp_steps <= max(self.end_step - self.start_step, 0):
            found.append(("ramp_steps", self.ramp_steps, f"an integer in [0, end_step - start_step = "
                          f"{max(self.end_step - self.start_step, 0)}] (the ramp lies inside the fault)"))
        if not self.roles or len(set(self.roles)) != len(self.roles):
            found.append(("roles", [r.value for r in self.roles], "a non-empty list of distinct operands: "
                          + ", ".join(o.value for o in Operand)))
        return found


@dataclass
class Fp8LayersConfig:
    """Which linear layers run in FP8 (docs/precision.md, "Choosing FP8 layers").

    Candidates are the `nn.Linear` layers inside the model's repeated blocks; every other linear layer
    (the output head, projections outside the blocks) runs in BF16. In BF16 mode every layer is BF16.
    """

    auto: bool = False  # keep in BF16 the layers whose GEMMs are too small for FP8 to gain (torchao's
    # auto-filter thresholds for the backend's recipe); GPU jobs want it, the tiny CPU jobs would have no FP8 left
    include: list[str] = field(default_factory=list)  # fnmatch patterns on module names ("*.mlp.*"); [] = all
    exclude: list[str] = field(default_factory=list)  # patterns of layers kept in BF16
    bf16_first_layers: int = 0  # the first N blocks entirely in BF16 (Megatron's --first-last-layers-bf16)
    bf16_last_layers: int = 0  # the last N blocks entirely in BF16

    def problems(self):
        found = []
        for name in ("bf16_first_layers", "bf16_last_layers"):
            if getattr(self, name) < 0:
                found.append((name, getattr(self, name), "a non-negative integer"))
        for name in ("include", "exclude"):
            if any(not pattern for pattern in getattr(self, name)):
                found.append((name, getattr(self, name), "non-empty fnmatch patterns"))
        return found


@dataclass
class PrecisionConfig:
    mode: PrecisionMode = PrecisionMode.FP8  # precision the job starts in
    backend: Fp8Backend = Fp8Backend.EMULATED
    format: str = "hybrid"  # hybrid (E4M3 forward, E5M2 gradients), e4m3, e5m2, or any eXmY
    scaling: Scaling = Scaling.DELAYED
    amax_history_len: int = 16  # delayed scaling: steps of amax history
    amax_compute: AmaxCompute = AmaxCompute.MAX  # delayed scaling: how the history becomes one amax
    margin: int = 0  # scale = fp8_max / amax / 2**margin
    torchao_recipe: str = "tensorwise"  # backend torchao: tensorwise or rowwise (current scaling only)
    fsdp_float8_all_gather: bool = False  # backend torchao, tensorwise: FSDP2 all-gathers the FP8 layers' weights
    # cast to FP8 per shard (a quarter of fp32's bytes) in FP8 mode, and as they are in BF16 mode (BF16 mode stays
    # BF16); the same losses bit for bit (tested on CPU ranks). It acts only with more than one rank
    fp8_layers: Fp8LayersConfig = field(default_factory=Fp8LayersConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def problems(self):
        found = []
        if self.format not in NAMED_FORMATS and not FORMAT_PATTERN.match(self.format):
            found.append(("format", self.format, "hybrid, e4m3, e5m2 or eXmY with 1<=X<=8, 0<=Y<=22 (e.g. e8m3)"))
        if self.amax_history_len < 1:
            found.append(("amax_history_len", self.amax_history_len, "a positive integer"))
        if self.margin < 0:
            found.append(("margin", self.margin, "a non-negative integer"))
        if self.backend is not Fp8Backend.EMULATED and self.format not in ("hybrid", "e4m3"):
            found.append(("format", self.format, f"hybrid or e4m3 with backend '{self.backend.value}' "
                          "(other formats need backend 'emulated')"))
        if self.backend is Fp8Backend.TORCHAO and self.scaling is not Scaling.CURRENT:
            found.append(("scaling", self.scaling.value, "'current' with backend 'torchao' (it scales dynamically)"))
        if self.backend is Fp8Backend.TE and self.scaling is Scaling.NONE:
            found.append(("scaling", self.scaling.value, "'delayed' or 'current' with backend 'te'"))
        if self.torchao_recipe not in ("tensorwise", "rowwise"):
            found.append(("torchao_recipe", self.torchao_recipe, "'tensorwise' or 'rowwise'"))
        if self.fsdp_float8_all_gather and (self.backend is not Fp8Backend.TORCHAO
                                            or self.torchao_recipe != "tensorwise"):
            found.append(("fsdp_float8_all_gather", True, "false unless precision.backend is 'torchao' with "
                          "torchao_recipe 'tensorwise' (the FP8 all-gather casts whole-tensor scaled weights)"))
        if self.fault.enabled and self.backend is not Fp8Backend.EMULATED:
            found.append(("fault", "enabled", "backend 'emulated' (fault injection lives in the emulated quantizer)"))
        return found


@dataclass
class TelemetryConfig:
    """Training signals recorded into `StepRecord.telemetry` (trajectory.jsonl, MLflow `telemetry/*`).

    Reading them never changes the numbers of a step, so they are not part of the job hash; the
    cost is only paid on the steps that record them (see bench/telemetry_cost.py)."""

    every_steps: int = 10  # record telemetry on steps s with s % every_steps == 0; 0 = never

    def problems(self):
        if self.every_steps < 0:
            return [("every_steps", self.every_steps, "0 (off) or a positive integer")]
        return []


@dataclass
class CheckpointConfig:
    uri: str = ""  # directory, file:// or s3:// URI; empty = <out>/checkpoints
    every_steps: int = 50  # commit a checkpoint every this many steps (and at the last step)
    keep: int = 0  # keep the newest N checkpoints; 0 keeps all

    def problems(self):
        found = []
        if self.every_steps < 1:
            found.append(("every_steps", self.every_steps, "a positive integer"))
        if self.keep < 0:
            found.append(("keep", self.keep, "0 (keep all) or a positive integer"))
        return found


@dataclass
class EvalConfig:
    batches: int = 4  # held-out batches per evaluation (fixed set, the same on every evaluation)
    every_steps: int = 0  # evaluate every N steps in `shadow train`; 0 = only at the end

    def problems(self):
        found = []
        if self.batches < 1:
            found.append(("batches", self.batches, "a positive integer"))
        if self.every_steps < 0:
            found.append(("every_steps", self.every_steps, "a non-negative integer"))
        return found


@dataclass
class ResourcesConfig:
    device: str = "auto"  # auto (cuda when present, else cpu), cpu or cuda
    cpus_per_rank: int = 1  # also torch's thread count: replays use the same so CPU GEMMs match
    num_ranks: int = 1  # data-parallel ranks of the main job (Ray actors on one placement group)
    grad_accum: int = 1  # micro-batches per main rank; a step's batch is cut into num_ranks x grad_accum
    # torch.compile the model's forward (GPU): fuses torchao's FP8 casts and scalings, without which FP8
    # is slower than BF16 (see docs/benchmarks.md, GPU throughput). It changes rounding, so it is part of the job
    # hash; it needs telemetry.every_steps: 0 (telemetry hooks do not run inside a compiled forward)
    compile: bool = False

    def problems(self):
        found = []
        for name in ("num_ranks", "grad_accum"):
            if getattr(self, name) < 1:
                found.append((name, getattr(self, name), "a positive integer"))
        if self.device not in ("auto", "cpu", "cuda"):
            found.append(("device", self.device, "'auto', 'cpu' or 'cuda'"))
        if self.cpus_per_rank < 1:
            found.append(("cpus_per_rank", self.cpus_per_rank, "a positive integer"))
        return found


@dataclass
class RunConfig:
    """How `shadow run` drives the main job (not part of the trajectory: excluded from the job hash)."""

    chunk_steps: int = 10  # main-job steps per controller round trip; decisions land on these boundaries
    fp8_speedup: float = 1.3  # FP8-over-BF16 step speedup assumed in the effective-speedup estimate only
    # where the run measured none (main FP8 and replay BF16 steps on the same device kind and rank count;
    # summary.json `effective_speedup.measured`). 1.3x is 01.AI's reported figure; Hopper figures: 1.2-1.5x
    max_main_restarts: int = 3  # the main trainer may die this often; it restarts from its last checkpoint
    max_checkpoint_failures: int = 3  # checkpoint saves failing in a row before the run stops (see docs/reliability.md)

    def problems(self):
        found = []
        for name in ("chunk_steps", "max_checkpoint_failures"):
            if getattr(self, name) < 1:
                found.append((name, getattr(self, name), "a positive integer"))
        if self.max_main_restarts < 0:
            found.append(("max_main_restarts", self.max_main_restarts, "a non-negative integer"))
        if not self.fp8_speedup > 0:
            found.append(("fp8_speedup", self.fp8_speedup, "a positive number"))
        return found


@dataclass
class FaultsConfig:
    """Infrastructure faults injected on purpose, to show a run survives them (like Megatron's error
    injection). All off (-1) by default; excluded from the job hash. Steps are global steps."""

    main_crash_at_step: int = -1  # the main trainer's process dies (os._exit) before this step; first lineage only
    replay_crash_at_step: int = -1  # a replay's process dies before this step of its window; first attempt only
    replay_error_at_step: int = -1  # a replay raises an error before this step of its window; every attempt
    nan_loss_at_step: int = -1  # this step's loss becomes NaN, in the main job (first lineage) or in replays
    nan_loss_in: str = "main"  # where nan_loss_at_step applies: main or replay

    def problems(self):
        if self.nan_loss_in not in ("main", "replay"):
            return [("nan_loss_in", self.nan_loss_in, "'main' or 'replay'")]
        return []


@dataclass
class JobConfig:
    name: str = "tiny"  # names the run directory, checkpoints and the MLflow experiment
    steps: int = 300  # total optimizer steps of the main job
    batch_size: int = 16  # sequences per optimizer step (global batch)
    seed: int = 0  # model initialisation
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    run: RunConfig = field(default_factory=RunConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    def problems(self):
        found = []
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", self.name):
            found.append(("name", self.name, "letters, digits, '_', '.', '-' (at most 64; it names directories)"))
        if self.steps < 1:
            found.append(("steps", self.steps, "a positive integer"))
        if self.batch_size < 1:
            found.append(("batch_size", self.batch_size, "a positive integer"))
        if self.model.smooth_swiglu and self.precision.backend is not Fp8Backend.EMULATED:
            found.append(("model.smooth_swiglu", True, "false with precision.backend "
                          f"'{self.precision.backend.value}' (Smooth-SwiGLU scales w_down inside the emulated "
                          "backend)"))
        if self.resources.compile and self.telemetry.every_steps > 0:
            found.append(("resources.compile", True, "false while telemetry.every_steps > 0 (telemetry's forward "
                          "hooks, added on recording steps, do not run inside a compiled forward); set "
                          "telemetry.every_steps: 0 to compile"))
        micro = self.resources.num_ranks * self.resources.grad_accum
        if micro >= 1 and self.batch_size % micro:
            found.append(("batch_size", self.batch_size, f"a multiple of resources.num_ranks x resources.grad_accum "
                          f"= {micro} (equal micro-batches)"))
        return found


def load_job(path: str | None, overrides: list[str] | None = None) -> JobConfig:
    return load_config(JobConfig, path, overrides)
