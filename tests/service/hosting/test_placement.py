"""What each hosting mode asks Ray for, without Ray: CPUs per replica, and on CUDA a share of a
GPU per replica — the in-replica frontend's serving replicas, or each model deployment's replicas
(ray-proxy, ray-direct) — so that several replicas, or several models, share one GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.hosting.in_replica import replica_options
from service.hosting.ray_ingress import ingress_options, model_options
from service.settings import DEFAULT_GPU_SHARE, Settings

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
DEMO = ["dates-bahdanau", "dates-transformer", "fashion-vit"]


def test_on_the_cpu_no_mode_asks_for_a_gpu(tmp_path: Path) -> None:
    settings = Settings(repository=tmp_path, num_gpus_per_replica=0.5)  # no CUDA: the share is moot
    assert replica_options(settings)["ray_actor_options"] == {"num_cpus": 0.5}
    for name in DEMO:
        assert model_options(name, settings)["ray_actor_options"] == {"num_cpus": 0.5}


def test_in_replica_replicas_each_take_a_share_and_hold_every_model(tmp_path: Path) -> None:
    settings = Settings(repository=tmp_path, providers=CUDA, num_replicas=4)
    options = replica_options(settings)
    assert options["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": DEFAULT_GPU_SHARE}
    # four serving replicas, every model in each, on one GPU
    assert options["num_replicas"] * options["ray_actor_options"]["num_gpus"] <= 1


@pytest.mark.parametrize("frontend", ["ray-proxy", "ray-direct"])
def test_the_demo_models_deployments_share_one_gpu(tmp_path: Path, frontend: str) -> None:
    """One deployment per model, each replica with a share, not a GPU: the three demo models fit
    one GPU; the ingress asks for none."""
    settings = Settings(repository=tmp_path, providers=CUDA, frontend=frontend)
    shares = [model_options(name, settings)["ray_actor_options"]["num_gpus"] for name in DEMO]
    assert shares == [DEFAULT_GPU_SHARE] * 3 and sum(shares) <= 1
    assert ingress_options(settings)["ray_actor_options"] == {"num_cpus": 0}


def test_a_model_can_take_its_own_share(tmp_path: Path) -> None:
    """ray-proxy / ray-direct: a model's override sets its replicas' share; the others keep the
    global one, and in-replica replicas (every model in each) the global one only."""
    settings = Settings(
        repository=tmp_path, providers=CUDA, frontend="ray-proxy", num_gpus_per_replica=0.2,
        model_overrides={"fashion-vit": {"num_gpus_per_replica": 0.5, "num_replicas": 2}},
    )  # fmt: skip
    vit = model_options("fashion-vit", settings)
    assert vit["ray_actor_options"]["num_gpus"] == 0.5 and vit["num_replicas"] == 2
    assert model_options("dates-bahdanau", settings)["ray_actor_options"]["num_gpus"] == 0.2
    assert replica_options(settings)["ray_actor_options"]["num_gpus"] == 0.2


def test_whole_gpus_for_a_replica_that_needs_more(tmp_path: Path) -> None:
    settings = Settings(repository=tmp_path, providers=CUDA, num_gpus_per_replica=2)
    assert replica_options(settings)["ray_actor_options"]["num_gpus"] == 2
