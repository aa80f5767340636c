"""What each hosting mode asks Ray for, without Ray: CPUs per replica, and on CUDA a share of a
GPU per replica — the in-replica frontend's serving replicas, or each model deployment's replicas
(ray-proxy, ray-direct) — so that several replicas, or several models, share one GPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from service.hosting.in_replica import replica_options
from service.hosting.ray_ingress import ingress_options, model_options
from service.inference.repository import discover
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


@pytest.mark.parametrize("frontend", ["in-replica", "ray-proxy"])
def test_replicas_above_the_per_node_cap_of_a_one_node_ray_are_named(
    tiny_repository: Path, frontend: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ATTN_MAX_REPLICAS_PER_NODE=1 with two replicas on the private Ray: the start hung, a
    replica waiting forever to be scheduled; now it is refused before Ray starts."""
    from service.__main__ import main

    monkeypatch.setattr(os, "environ", os.environ.copy())  # main() sets Ray's variables: this test's only
    from service.hosting.app import over_node_cap

    base = {"repository": tiny_repository, "frontend": frontend, "max_replicas_per_node": 1}
    assert over_node_cap(Settings(**base)) is None  # type: ignore[arg-type]
    over = over_node_cap(Settings(**base, num_replicas=2))  # type: ignore[arg-type]
    assert over is not None and "2 replicas at start" in over
    if frontend == "ray-proxy":  # a deployment per model: each is named, one alone too
        assert "'fashion-vit'" in over
        override = {"fashion-vit": {"num_replicas": 2}}
        alone = over_node_cap(Settings(**base, model_overrides=override))  # type: ignore[arg-type]
        assert alone == "model 'fashion-vit': 2 replicas at start"
    for key, value in {"ATTN_REPOSITORY": str(tiny_repository), "ATTN_FRONTEND": frontend,
                       "ATTN_MAX_REPLICAS_PER_NODE": "1", "ATTN_NUM_REPLICAS": "2", "ATTN_REPLICA_NUM_CPUS": "0",
                       "ATTN_HTTP_PORT": "18511", "ATTN_GRPC_PORT": "19511", "ATTN_METRICS_PORT": "18811"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    assert main([]) == 2
    assert "ATTN_MAX_REPLICAS_PER_NODE=1" in capsys.readouterr().err


@pytest.mark.parametrize("frontend", ["in-replica", "ray-proxy"])
def test_autoscaling_beyond_the_private_ray_is_a_warning_naming_what_fits(
    tiny_repository: Path, frontend: str
) -> None:
    """ATTN_AUTOSCALING's max_replicas, on a private Ray that can never place them, was taken
    silently; under load Ray then waited on replicas it could not schedule. It is said at start
    (a warning: the minimum still serves)."""
    from service.hosting.app import private_ray_warning

    def settings(**extra: Any) -> Settings:
        scaling = {"min_replicas": 1, "max_replicas": 3}
        return Settings(repository=tiny_repository, frontend=frontend, autoscaling=scaling, **extra)  # type: ignore[arg-type]

    deployments = 1 if frontend == "in-replica" else len(discover(tiny_repository).models)
    roomy = deployments * 3 * 0.5
    assert private_ray_warning(settings(), cpus=int(roomy) + 1) is None
    warning = private_ray_warning(settings(), cpus=deployments)  # the minimum fits, the maximum not
    assert warning is not None and f"reserve {deployments * 1.5:g} CPUs" in warning
    assert f"more than this Ray's {deployments}" in warning and "ATTN_NUM_CPUS" in warning
    capped = private_ray_warning(settings(max_replicas_per_node=2, replica_num_cpus=0), cpus=8)
    assert capped is not None and "above ATTN_MAX_REPLICAS_PER_NODE=2" in capped  # the limit that binds
    assert "at most 2 replicas per deployment" in capped and "ATTN_NUM_CPUS" not in capped
    assert private_ray_warning(Settings(repository=tiny_repository, frontend=frontend), cpus=1) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("frontend", "options", "gpus", "reserved"),
    [
        ("in-replica", {"num_replicas": 4}, 1, None),  # four quarters of one GPU
        ("in-replica", {"num_replicas": 2, "num_gpus_per_replica": 1}, 1, 2),
        ("in-replica", {"num_replicas": 2, "num_gpus_per_replica": 1}, 2, None),
        ("ray-proxy", {"num_gpus_per_replica": 0.5}, 1, 1.5),  # a deployment per model: 3 × 0.5
        ("ray-proxy", {"model_overrides": {"fashion-vit": {"num_gpus_per_replica": 0.5}}}, 1, None),
        ("ray-proxy", {"model_overrides": {"fashion-vit": {"num_replicas": 3, "num_gpus_per_replica": 0.5}}}, 1, 2),
        # Ray puts a fraction on one GPU: 3 × 0.6 does not fit on 2, though 1.8 ≤ 2; 2 × 0.6 does
        ("in-replica", {"num_replicas": 3, "num_gpus_per_replica": 0.6}, 2, 1.8),
        ("in-replica", {"num_replicas": 2, "num_gpus_per_replica": 0.6}, 2, None),
        ("ray-proxy", {"num_gpus_per_replica": 0.6}, 2, 1.8),  # a deployment per model: 3 × 0.6
        ("ray-proxy", {"model_overrides": {"fashion-vit": {"num_gpus_per_replica": 0.5}},
                       "num_gpus_per_replica": 0.75}, 2, 2),  # 0.75 + 0.75 + 0.5 on 2 GPUs: no
    ],
)  # fmt: skip
def test_replicas_reserving_more_gpus_than_the_private_ray_has_are_refused(
    tiny_repository: Path, frontend: str, options: dict[str, Any], gpus: int, reserved: float | None
) -> None:
    """Ray would keep the start waiting for good on replicas it can never place: refused before
    it starts, as replicas over its CPUs are, naming what they reserve and what it has."""
    from service.hosting.app import private_ray_refusal

    options = {**options, "models": DEMO}  # the tiny repository's int8 ViT left out
    settings = Settings(repository=tiny_repository, frontend=frontend, providers=CUDA, **options)
    refusal = private_ray_refusal(settings, cpus=64, gpus=gpus)
    if reserved is None:
        assert refusal is None, refusal
    else:
        assert (
            refusal is not None
            and f"reserve {reserved:g} GPUs" in refusal
            and f"this Ray has {gpus}" in refusal
        )
    # without CUDA nothing reserves a GPU
    cpu = Settings(repository=tiny_repository, frontend=frontend, **options)
    assert private_ray_refusal(cpu, cpus=64, gpus=0) is None


def test_the_private_ray_counts_the_gpus_nvidia_smi_lists_and_cuda_visible_devices_lets_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.hosting.gpus import local_gpus

    listing = (
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n"
        "  MIG 3g.40gb     Device  0: (UUID: MIG-1)\n"
        "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)\n"
    )
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert local_gpus(listing) == 2 and local_gpus("") == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert local_gpus(listing) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local_gpus(listing) == 0


@pytest.mark.parametrize(
    ("shares", "gpus", "fits"),
    [
        ([(3, 0.6)], 2, False),  # 1.8 ≤ 2, but a fraction stays on one GPU
        ([(2, 0.6)], 2, True),
        ([(2, 0.4), (4, 0.3)], 2, True),  # 0.4 + 0.3 + 0.3 on each: first fit, largest first, misses it
        ([(2, 0.75), (1, 0.5)], 2, False),
        ([(4, 0.25)], 1, True),
        ([(2, 1.0)], 1, False),
        ([(2, 1.0), (2, 0.5)], 3, True),
        ([(16, 0.33)], 5, False),  # three to a GPU
    ],
)
def test_gpu_shares_fit_where_some_placement_exists(
    shares: list[tuple[int, float]], gpus: int, fits: bool
) -> None:
    from service.hosting.app import fits_on_gpus

    assert fits_on_gpus(shares, gpus) is fits
