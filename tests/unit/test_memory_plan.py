"""The per-rank memory plan: counts from the meta-device model, FSDP2's 1/N sharding, and refusals."""

import pytest
import torch
from conftest import REPO

from shadow.config.job import load_job
from shadow.memory_plan import GIB, MemoryPlanError, plan_memory
from shadow.precision import build_backend
from shadow.precision.convert import prepare_model

H100_BYTES = 80 * GIB


def test_parameter_count_is_the_models():
    job = load_job(str(REPO / "jobs/tiny.yaml"))
    model = prepare_model(job, build_backend(job.precision, torch.device("cpu"))).model
    plan = plan_memory(job, 1, 1, torch.device("cpu"))
    assert plan.num_params == sum(p.numel() for p in model.parameters())
    assert plan.params_bytes == plan.grads_bytes == 4 * plan.num_params  # fp32, nothing gathered at 1 rank
    assert plan.optimizer_bytes == 8 * plan.num_params + 4 * len(list(model.parameters()))  # moments, step counts


def test_sharding_divides_weights_gradients_and_optimizer_state():
    job = load_job(str(REPO / "jobs/gpu_7b.yaml"))
    one = plan_memory(job, 1, 64, torch.device("cuda"))
    sixteen = plan_memory(job, 16, 64, torch.device("cuda"))
    assert sixteen.optimizer_bytes == pytest.approx(one.optimizer_bytes / 16, rel=1e-6)
    assert sixteen.params_bytes < one.params_bytes / 4  # 1/16 plus two gathered blocks
    assert sixteen.activations_bytes == one.activations_bytes  # the same micro-batch


@pytest.mark.parametrize("name", ["gpu_1b", "gpu_7b"])
def test_shipped_gpu_jobs_fit_an_80gb_gpu_at_their_world_size(name):
    job = load_job(str(REPO / f"jobs/{name}.yaml"))
    resources = job.resources
    plan = plan_memory(job, resources.num_ranks, resources.num_ranks * resources.grad_accum, torch.device("cuda"))
    plan.check(H100_BYTES, "an H100")


def test_a_job_that_cannot_fit_is_refused_naming_what_to_change():
    job = load_job(str(REPO / "jobs/gpu_7b.yaml"))
    plan = plan_memory(job, 1, 64, torch.device("cuda"))  # 7B on one GPU: ~112 GB before activations
    with pytest.raises(MemoryPlanError, match=r"at 1 rank\(s\).*more than the 80.0 GiB of an H100; raise "
                                              r"resources.num_ranks"):
        plan.check(H100_BYTES, "an H100")
