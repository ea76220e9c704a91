"""Every manifest in deploy/ parses, names files that exist, and agrees with the others."""

import re
import shlex
from pathlib import Path

import yaml

from shadow.config import load_job
from shadow.config.policy import load_policy

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _yaml(name):
    return yaml.safe_load((DEPLOY / name).read_text())


def _dockerfile_tag() -> str:
    match = re.search(r"docker build .* -t (\S+)", (DEPLOY / "Dockerfile").read_text())
    assert match, "the Dockerfile's header must give the build command with its image tag"
    return match.group(1)


def _shadow_files(entrypoint: str) -> dict[str, str]:
    args = shlex.split(entrypoint)
    assert args[:2] == ["shadow", "run"], entrypoint
    return {flag: args[args.index(flag) + 1] for flag in ("--job", "--policy") if flag in args}


def test_dockerfile_builds_on_the_nvidia_pytorch_container_and_keeps_its_torch():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3$", text, re.M)
    assert "--no-deps -e ." in text  # the container's CUDA torch and Transformer Engine stay
    for folder in ("shadow", "jobs", "policies"):
        assert f"COPY {folder} ./{folder}" in text
    assert "import transformer_engine.pytorch" in text


def test_rayjob_runs_shadow_on_gpu_workers_and_shuts_down():
    job = _yaml("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    files = _shadow_files(spec["entrypoint"])
    load_job(str(REPO / files["--job"]))  # exists and is a valid job
    load_policy(str(REPO / files["--policy"]))
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    images = {c["image"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]}
    (gpu_group,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
    (worker,) = gpu_group["template"]["spec"]["containers"]
    images.add(worker["image"])
    assert images == {_dockerfile_tag()}
    gpus = worker["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == worker["resources"]["requests"]["nvidia.com/gpu"] == gpu_group["rayStartParams"]["num-gpus"]
    assert gpu_group["replicas"] >= 2  # a node for the main job and one for replays
    job_config = load_job(str(REPO / files["--job"]))
    assert job_config.resources.device == "cuda"
    assert float(gpu_group["rayStartParams"]["num-cpus"]) >= job_config.resources.cpus_per_rank
    for container in [*cluster["headGroupSpec"]["template"]["spec"]["containers"], worker]:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]


def test_cluster_launcher_config_uses_the_same_image_and_gpu_workers():
    config = _yaml("cluster.yaml")
    assert config["provider"]["type"] and config["docker"]["image"] == _dockerfile_tag()
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    assert any(t["resources"].get("GPU", 0) >= 1 for t in node_types.values())
    assert all("RAY_AUTH_MODE=token" in " ".join(config[key])
               for key in ("head_start_ray_commands", "worker_start_ray_commands"))


def test_runtime_env_example_is_a_valid_runtime_env_without_secrets():
    env = _yaml("runtime_env.yaml")
    assert set(env) <= {"working_dir", "excludes", "env_vars", "pip", "py_modules"}
    assert env["working_dir"] == "." and all(isinstance(v, str) for v in env["env_vars"].values())
    assert not [k for k in env["env_vars"] if re.search("SECRET|PASSWORD|TOKEN", k)]
