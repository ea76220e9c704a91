"""One training rank: a step, a precision switch at a step boundary, snapshot and exact restore.

Step numbering: `trainer.step` is the number of completed optimizer steps. `train_step()` runs global
step `s = trainer.step` on `data.batch(s)` and returns its record with `step = s`. A snapshot taken
when `trainer.step == k` continues with step k, so a replay from it covers the window [k, k + W).

Everything that influences the next step is in the snapshot: weights, FP8 scaling buffers (model
state), AdamW moments and step counts, the step (which fixes the LR schedule and the batch), and RNG
states. The LR schedule is a pure function of the step, so it has no state of its own.

With several ranks the model, gradients and optimizer state are sharded with FSDP2
(`shadow/distributed.py`); a snapshot holds this rank's shards (DTensors) and replicated tensors, and
`load_checkpoint` reads any checkpoint into them through torch.distributed.checkpoint, whatever the
world size that wrote it.

Randomness (dropout masks, in the built-in model or the user's) comes from the trainer's own generator,
seeded with the job's seed and checkpointed as `rng.trainer`: every step draws one seed from it on
every rank (so ranks stay in step), and torch's global generator is seeded with that seed plus k
before micro-batch k of the global batch runs. Masks therefore depend on the step's global micro-batch
index, not on which rank computes it, so replays of any world size stay exact, and a checkpoint
restored without its RNG state does not.

The model is the job's (`model.factory`, or the built-in one), prepared by `shadow/precision/convert.py`;
the trainer computes the loss from its logits, in fp32, the same way for every model.

Every `telemetry.every_steps` steps, a step also records its telemetry (`shadow/telemetry.py`) into
the row; reading it changes no number of the step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from typing import TYPE_CHECKING

import torch
from torch.distributed.tensor import DTensor

from shadow.config.job import JobConfig, OptimConfig, PrecisionMode
from shadow.config.loader import to_dict
from shadow.data import StepData
from shadow.distributed import (
    RankLayout,
    all_reduce_sum,
    clip_grad_norm,
    init_group,
    is_sharded,
    max_across_ranks,
    shard_model,
)
from shadow.layout import PICKLED_EXTRA_STATE, layout_of
from shadow.memory_plan import device_capacity, plan_memory
from shadow.model_factory import check_output, next_token_loss
from shadow.optim import build_optimizer, state_layout
from shadow.precision import build_backend
from shadow.precision.convert import prepare_model
from shadow.records import StepRecord
from shadow.snapshot import Snapshot
from shadow.telemetry import TelemetryCollector

if TYPE_CHECKING:  # the checkpoint package reads into a trainer; the trainer only names its type
    from shadow.checkpoint.stored import StoredCheckpoint


def lr_at(config: OptimConfig, step: int, total_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `min_lr` over `decay_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = config.decay_steps or max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))


def job_hash(job: JobConfig) -> str:
    """Hash of every setting that shapes the trajectory, so a checkpoint of another job is refused.

    The precision mode is left out (replays run the same job in another precision), as are where
    checkpoints go, evaluation and telemetry cadence (both only read the state), how many ranks compute
    a step (not the micro-batch split), in which dtype FSDP2 all-gathers weights
    (`precision.fsdp_float8_all_gather`: the same losses bit for bit, tested), how `shadow run` drives
    the job and injected faults. Options
    that change numbers (`model.smooth_swiglu`, `optim.moments`, `resources.compile`) are in it.
    """
    config = to_dict(job)
    config["precision"].pop("mode")
    config["precision"].pop("fsdp_float8_all_gather")
    # the micro-batch split shapes the numbers; how many ranks compute it does not
    config["micro_batches"] = job.resources.num_ranks * job.resources.grad_accum
    for key in ("name", "checkpoint", "eval", "telemetry", "resources", "run", "faults"):
        config.pop(key)
    config["compiled"] = job.resources.compile  # fused kernels round differently
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("resources.device: 'cuda' was asked for but no CUDA GPU is visible; use 'cpu' or 'auto'")
    return torch.device(name)


class Trainer:
    def __init__(self, job: JobConfig, layout: RankLayout | None = None):
        self.job = job
        self.layout = layout or RankLayout(micro_batches_per_rank=job.resources.grad_accum * job.resources.num_ranks)
        torch.set_num_threads(job.resources.cpus_per_rank)
        self.device = resolve_device(job.resources.device)
        plan = plan_memory(job, self.layout.world_size, self.layout.num_micro_batches, self.device)
        plan.check(*device_capacity(self.device, ranks_on_host=self.layout.world_size))  # before allocating
        self.checkpoint_group = init_group(self.layout, self.device)  # saves and loads run over it
        self.backend = build_backend(job.precision, self.device)
        prepared = prepare_model(job, self.backend)  # the full weights on every rank, then each keeps its shards
        self.model = prepared.model.to(self.device)
        self.structure, self.fp8_selection = prepared.structure, prepared.selection
        with self.backend.not_recording():
            check_output(self.model, job.model, self.device)
        if self.layout.world_size > 1:
            self.backend.before_sharding(self.model)
        shard_model(self.model, [block.module for block in self.structure.blocks], self.layout, self.device)
        self.sharded = is_sharded(self.model)  # FSDP2 at world size > 1
        if job.resources.compile:  # compile `forward` in place, so state_dict keys stay unchanged
            self.model.forward = torch.compile(self.model.forward)
        self.data = StepData(job.data, job.model.seq_len, job.batch_size, job.model.vocab_size)
        self.optimizer = build_optimizer(job.optim, self.model)
        self.telemetry = TelemetryCollector(self.model, self.backend, self.structure)
        self._param_names = {id(p): name for name, p in self.model.named_parameters()}
        self.checkpoint_layout = layout_of(self.model, self.optimizer, self.backend)  # what its checkpoints hold
        self.job_hash = job_hash(job)
        self.rng = torch.Generator().manual_seed(job.seed)  # the run's random stream (see the module doc)
        self.step = 0
        self.nan_loss_at_step: int | None = None  # fault injection (job `faults`), set by the actor

    @property
    def precision(self) -> PrecisionMode:
        return self.backend.mode

    def set_precision(self, mode: PrecisionMode | str) -> None:
        """Switch FP8 <-> BF16; applies from the next step, with the model and optimizer unchanged."""
        self.backend.set_mode(PrecisionMode(mode))

    def train_step(self) -> StepRecord:
        step = self.step
        start = time.perf_counter()
        self.backend.begin_step(step)
        lr = lr_at(self.job.optim, step, self.job.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = self.data.batch(step)
        self.optimizer.zero_grad(set_to_none=True)
        num_micro_batches = self.layout.num_micro_batches
        loss_sum = torch.zeros((), device=self.device)
        every = self.job.telemetry.every_steps
        record_telemetry = every > 0 and step % every == 0
        step_seed = int(torch.randint(0, 2**62, (), generator=self.rng))
        with self.telemetry.recording() if record_telemetry else contextlib.nullcontext():
            micro_batches = self.layout.my_micro_batches(inputs, targets)
            for index, (micro_inputs, micro_targets) in enumerate(micro_batches, self.layout.first_micro_batch):
                if self.sharded:  # accumulate locally; reduce-scatter once, after this rank's last micro-batch
                    self.model.set_requires_gradient_sync(index == self.layout.first_micro_batch + len(micro_batches) - 1)
                torch.manual_seed(step_seed + index)  # dropout masks of micro-batch `index`, whichever rank runs it
                with self.backend.autocast():
                    loss = next_token_loss(self.model, micro_inputs.to(self.device), micro_targets.to(self.device))
                if step == self.nan_loss_at_step:
                    loss = loss * float("nan")
                (loss / num_micro_batches).backward()
                loss_sum += loss.detach().float() / num_micro_batches
        all_reduce_sum(loss_sum)
        clip = self.job.optim.grad_clip if self.job.optim.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(list(self.model.parameters()), clip)
        telemetry = {}
        if math.isfinite(grad_norm):
            self.optimizer.step()
        else:
            telemetry["skipped_update"] = 1.0  # a non-finite gradient would destroy the weights
        self.backend.end_step(self.model, reduce_amax=max_across_ranks if self.layout.world_size > 1 else None)
        if record_telemetry:
            telemetry.update(self.telemetry.finish())
        self.step = step + 1
        return StepRecord(
            step=step,
            loss=float(loss_sum),
            precision=self.precision.value,
            tokens=inputs.numel(),
            step_time_s=time.perf_counter() - start,
            grad_norm=grad_norm,
            lr=lr,
            telemetry=telemetry,
        )

    @torch.no_grad()
    def evaluate(self, num_batches: int) -> float:
        """Mean loss over the fixed held-out batches, in the current precision (no dropout); state is untouched."""
        losses = []
        self.model.eval()
        try:
            with self.backend.not_recording(), self.backend.autocast():
                for inputs, targets in self.data.eval_batches(num_batches):
                    losses.append(float(next_token_loss(self.model, inputs.to(self.device), targets.to(self.device))))
        finally:
            self.model.train()
        return sum(losses) / len(losses)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Every tensor a checkpoint holds, by full name, as this rank holds it (shards are DTensors)."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items() if not k.endswith(PICKLED_EXTRA_STATE)}
        tensors.update({f"precision.{k}": v for k, v in self.backend.extra_state(self.model).items()})
        for param, state in self.optimizer.state.items():
            name = self._param_names[id(param)]
            tensors.update({f"optim.{name}.{key}": value for key, value in state.items()})
        tensors["rng.trainer"] = self.rng.get_state()
        tensors["rng.torch_cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return tensors

    def snapshot(self) -> Snapshot:
        """A CPU copy of this rank's state (its shards and the replicated tensors): the staging copy a
        save is written from while training goes on."""
        tensors = {name: _staged(value) for name, value in self.checkpoint_state().items()}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.state_dict()["param_groups"]]
        meta = {
            "step": self.step,
            "precision": self.precision.value,
            "job_hash": self.job_hash,
            "job_name": self.job.name,
            "num_micro_batches": self.layout.num_micro_batches,  # a replay at another world size keeps it
            "param_groups": groups,
        }
        return Snapshot(step=self.step, tensors=tensors, meta=meta)

    def load_checkpoint(self, checkpoint: StoredCheckpoint) -> None:
        """Continue from a committed checkpoint written at any world size (every rank calls this together);
        the precision mode comes with it."""
        self._check_job(checkpoint.step, checkpoint.meta)
        targets = self._targets({name: (t.shape, t.dtype) for name, t in checkpoint.index.items()})
        checkpoint.read_into(targets, self.checkpoint_group)
        self._adopt(checkpoint.step, checkpoint.meta, targets)

    def restore(self, snapshot: Snapshot) -> None:
        """Load an in-memory snapshot of full tensors (one rank: calibration and tests)."""
        assert not self.sharded, "a sharded trainer loads checkpoints with load_checkpoint"
        self._check_job(snapshot.step, snapshot.meta)
        missing = sorted(set(self.checkpoint_state()) - set(snapshot.tensors) - {"rng.torch_cuda"})
        if missing and not all(name.startswith("optim.") for name in missing):
            raise ValueError(f"checkpoint at step {snapshot.step} does not fit this model: missing {missing[:5]}")
        targets = self._targets({name: (tuple(t.shape), t.dtype) for name, t in snapshot.tensors.items()})
        for name, target in targets.items():
            target.copy_(snapshot.tensors[name])
        self._adopt(snapshot.step, snapshot.meta, targets)

    def _check_job(self, step: int, meta: dict) -> None:
        if meta.get("job_hash") != self.job_hash:
            raise ValueError(
                f"checkpoint at step {step} belongs to job hash {meta.get('job_hash')!r}, "
                f"this job is {self.job_hash!r}: a replay must use the main job's config"
            )

    def _targets(self, stored: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
        """A tensor to load into for each tensor a checkpoint holds (name -> global shape, dtype): the
        model's own tensors (in place), fresh optimizer state for the parameters it has state for, and
        copies of the RNG and backend scaling state (applied by `_adopt`)."""
        names = set(stored)
        if "rng.trainer" not in names:
            raise ValueError("checkpoint has no 'rng.trainer' (the dropout random stream): it cannot be replayed exactly")
        params = {name: p for name, p in self.model.named_parameters()}
        self.optimizer.state.clear()
        for name, param in params.items():
            fields = state_layout(self.optimizer, param)
            if f"optim.{name}.step" in names:
                self.optimizer.state[param] = {
                    key: torch.zeros_like(param, dtype=spec.dtype) if spec.shape == tuple(param.shape)
                    else torch.zeros(spec.shape, dtype=spec.dtype)
                    for key, spec in fields.items()
                }
        targets = {name: t for name, t in self.checkpoint_state().items() if name in names}
        for name in names - set(targets):
            # TE creates its scaling state at the first FP8 step; a GPU run's CUDA RNG state is read and,
            # on a CPU, not applied
            if name.startswith("precision.") or name == "rng.torch_cuda":
                shape, dtype = stored[name]
                targets[name] = torch.empty(shape, dtype=dtype)
        return targets

    def _adopt(self, step: int, meta: dict, targets: dict[str, torch.Tensor]) -> None:
        """What loading leaves to do: RNG states, backend scaling state, hyperparameters, step, precision."""
        self.backend.load_extra_state(self.model, {k[len("precision."):]: v for k, v in targets.items()
                                                   if k.startswith("precision.")})
        for saved, group in zip(meta["param_groups"], self.optimizer.param_groups):
            group.update(saved)
        self.rng.set_state(targets["rng.trainer"])
        torch.set_rng_state(targets["rng.torch_cpu"])
        if self.device.type == "cuda" and "rng.torch_cuda" in targets:
            torch.cuda.set_rng_state(targets["rng.torch_cuda"], self.device)
        self.set_precision(meta["precision"])
        self.step = step



def _staged(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a tensor; of a DTensor, a DTensor whose local shard is a CPU copy."""
    if isinstance(tensor, DTensor):
        local = tensor.to_local().detach().to("cpu", copy=True)
        return DTensor.from_local(local, tensor.device_mesh, tensor.placements, run_check=False,
                                  shape=tensor.shape, stride=tensor.stride())
    return tensor.detach().to("cpu", copy=True)
