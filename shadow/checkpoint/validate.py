"""Check a checkpoint's content against the format and against the job that is about to train from it.

The manifest's hashes prove that the files are the ones the manifest lists, not that they are what the
job needs: a manifest rewritten to match damaged files (bit rot repaired by a careless tool, a file
copied from another model, an edit by hand) passes them. What `Trainer.restore` would otherwise meet
as a KeyError, a shape error deep in torch, or NaN losses is checked here first, in three stages:

- `check_meta`: `meta.json`'s keys and their types; with a layout, exactly the job's keys and optimizer
  hyperparameters (only the scheduled `lr` may differ);
- `check_layout`: tensor names, dtypes and global shapes from `tensors.json`, before any tensor byte is
  read;
- `check_values`: each chunk as it is read, RNG states a scratch generator accepts and finite weights
  and optimizer state (`NonFiniteCheckpoint`, which only an explicit `allow_nonfinite` lets through).

Each failure is an `InvalidCheckpoint` naming the URI, the file, the key, what was found and what was
expected.
"""

from __future__ import annotations

import json

import torch

from shadow.checkpoint.errors import InvalidCheckpoint, NonFiniteCheckpoint
from shadow.checkpoint.strict_json import describe, json_type
from shadow.checkpoint.tensor_index import INDEX
from shadow.config.job import PrecisionMode
from shadow.snapshot import SnapshotLayout, TensorSpec

META = "meta.json"
META_KEYS = ("step", "precision", "job_hash", "job_name", "num_micro_batches", "param_groups")
_PRECISIONS = [mode.value for mode in PrecisionMode]
_OWNERS = {"model": "the job's model", "optim": "the job's optimizer", "precision": "the job's precision backend",
           "rng": "the trainer's RNG states"}


def check_meta(meta: dict, where: str, *, step: int | None, job_hash: str | None,
               layout: SnapshotLayout | None) -> None:
    """`meta.json` of the checkpoint at `where` (step `step`, manifest job hash `job_hash`, when known).

    Without a layout, the keys present must have the right types; with one, all but `job_name` must be
    there, no other key may, and the param groups must be the job's optimizer's.
    """

    def check(key: str, ok, expected: str, required: bool) -> None:
        if key not in meta and not required:
            return
        if key not in meta or not ok(meta[key]):
            found = describe(meta[key]) if key in meta else "missing"
            raise InvalidCheckpoint(where, META, repr(key), found, expected)

    full = layout is not None
    if step is None:
        check("step", lambda v: _is_int(v) and v >= 0, "a non-negative integer", True)
    else:
        check("step", lambda v: _is_int(v) and v == step, f"the integer {step} (the checkpoint's step)", True)
    check("precision", lambda v: v in _PRECISIONS, f"one of {_PRECISIONS}", full)
    if job_hash is None:
        check("job_hash", lambda v: isinstance(v, str), "a string", full)
    else:
        check("job_hash", lambda v: v == job_hash, f"the manifest's job hash {job_hash!r}", full)
    check("job_name", lambda v: isinstance(v, str), "a string", False)
    check("num_micro_batches", lambda v: _is_int(v) and v >= 1,
          "a positive integer (the micro-batches of a step, over all ranks)", full)
    check("param_groups", lambda v: isinstance(v, list) and all(isinstance(g, dict) for g in v),
          "an array of objects (the optimizer's param groups)", full)
    if not full:
        return
    unknown = sorted(set(meta) - set(META_KEYS))
    if unknown:
        raise InvalidCheckpoint(where, META, repr(unknown[0]), "unknown key", f"only the keys {list(META_KEYS)}")
    _check_param_groups(meta["param_groups"], layout.param_groups, where)


def _check_param_groups(groups: list[dict], expected: list[dict], where: str) -> None:
    def refuse(key: str, found: str, wanted: str):
        raise InvalidCheckpoint(where, META, key, found, wanted)

    if len(groups) != len(expected):
        refuse("'param_groups'", f"{len(groups)} groups", f"{len(expected)} (the job's optimizer)")
    for index, (saved, job) in enumerate(zip(groups, expected)):
        missing, unknown = sorted(set(job) - set(saved)), sorted(set(saved) - set(job))
        if missing or unknown:
            key = missing[0] if missing else unknown[0]
            refuse(f"param_groups[{index}][{key!r}]", "missing" if missing else "unknown key",
                   f"the keys of the job's optimizer {sorted(job)}")
        for key, want in job.items():
            name = f"param_groups[{index}][{key!r}]"
            if key == "lr":  # follows the schedule: any non-negative number
                if not (isinstance(saved[key], (int, float)) and not isinstance(saved[key], bool) and saved[key] >= 0):
                    refuse(name, describe(saved[key]), "a non-negative number")
            elif json.dumps(saved[key]) != json.dumps(want):  # type-exact: 1 is not true, 0 is not 0.0
                refuse(name, describe(saved[key]), f"{json_type(want)} {json.dumps(want)} (the job's optimizer)")


def check_layout(found: dict[str, tuple[torch.dtype, tuple[int, ...]]], where: str, layout: SnapshotLayout) -> None:
    """Names, dtypes and global shapes of every tensor the index lists (by full name) against the job's."""
    for full_name, (dtype, shape) in found.items():
        group = full_name.split(".", 1)[0]
        if group in layout.unchecked_groups:
            continue
        spec = spec_of(layout, full_name)
        if spec is None:  # an unknown group is not printed: it is read from the checkpoint, like the name
            expected = (f"only tensors of {_OWNERS[group]}, which has none by this name" if group in _OWNERS
                        else f"only names under {[g + '.' for g in _OWNERS]}")
            raise InvalidCheckpoint(where, INDEX, f"tensor {full_name!r}", "unexpected tensor", expected)
        owner = _OWNERS.get(group, group)
        if dtype != spec.dtype:
            raise InvalidCheckpoint(where, INDEX, f"tensor {full_name!r}", f"dtype {_dtype(dtype)}",
                                    f"{_dtype(spec.dtype)} ({owner})")
        if shape != spec.shape:
            raise InvalidCheckpoint(where, INDEX, f"tensor {full_name!r}", f"shape {list(shape)}",
                                    f"{list(spec.shape)} ({owner})")
    for full_name, spec in layout.required.items():
        if full_name not in found:
            _missing(where, full_name, spec, "")
    for param, fields in layout.optim_state.items():
        present = [f for f in fields if f"{param}.{f}" in found]
        for field in fields if present else ():
            if f"{param}.{field}" not in found:
                _missing(where, f"{param}.{field}", fields[field], f" (the state {present} of this parameter is there)")


def check_values(tensors: dict[str, torch.Tensor], where: str, file: str, layout: SnapshotLayout, *,
                 allow_nonfinite: bool) -> None:
    """Tensors (or chunks of them) read from `file`, by full name: RNG states a generator accepts, finite
    weights and optimizer state."""
    for full_name, tensor in tensors.items():
        spec = spec_of(layout, full_name)
        if spec is None:
            continue  # a group only its backend checks (layout.unchecked_groups)
        if spec.generator is not None:
            _check_generator_state(tensor, spec.generator, where, file, full_name)
        elif spec.finite and not allow_nonfinite:
            _check_finite(tensor, spec, where, file, full_name)


def spec_of(layout: SnapshotLayout, full_name: str) -> TensorSpec | None:
    """The spec of one tensor by full name (`model.<key>`, `optim.<param>.<state key>`, ...), or None."""
    if full_name in layout.required:
        return layout.required[full_name]
    if full_name in layout.optional:
        return layout.optional[full_name]
    param, _, field = full_name.rpartition(".")
    return layout.optim_state.get(param, {}).get(field)


def _check_generator_state(tensor: torch.Tensor, device_type: str, where: str, file: str, name: str) -> None:
    """The state must be one torch's generator accepts; tried on a scratch generator, never the global one."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return  # a GPU run's CUDA state, read on a CPU: never applied
    try:
        torch.Generator(device=device_type).set_state(tensor)
    except RuntimeError as exc:
        raise InvalidCheckpoint(where, file, f"tensor {name!r}",
                                f"refused by torch ({str(exc).splitlines()[0][:120]})",
                                f"a torch {device_type.upper()} generator state") from None


def _check_finite(tensor: torch.Tensor, spec: TensorSpec, where: str, file: str, name: str) -> None:
    values = tensor.view(spec.bits_of) if spec.bits_of is not None else tensor
    if not values.is_floating_point():
        return
    values = values.float() if values.dtype.itemsize == 1 else values  # isnan/isinf of FP8 via float32
    num_nan, num_inf = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
    if num_nan or num_inf:
        raise NonFiniteCheckpoint(where, file, f"tensor {name!r}",
                                  f"{num_nan} NaN and {num_inf} Inf among {values.numel()} values",
                                  "finite values")


def _missing(where: str, full_name: str, spec: TensorSpec, note: str) -> None:
    group = full_name.split(".", 1)[0]
    raise InvalidCheckpoint(where, INDEX, f"tensor {full_name!r}", f"missing{note}",
                            f"shape {list(spec.shape)} of {_dtype(spec.dtype)} ({_OWNERS.get(group, group)})")


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

