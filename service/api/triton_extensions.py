"""Triton's model-configuration, statistics and repository-index extensions of KServe v2, in
Triton's JSON form; HTTP answers these dicts, gRPC parses them into the same-numbered messages of
``service/api/protos/grpc_service.proto`` (``json_format.ParseDict``), so both say the same.

- :func:`model_config` — ``GET /v2/models/{name}/config``, ``ModelConfig``: what tritonclient's
  ``get_model_config`` and Triton's own clients read (``max_batch_size``, the tensors as ``dims``
  without the batch axis, the dynamic batcher, the instance kind). Our model is the whole pipeline
  (tokenising or image decoding, the ONNX graphs, decoding), so its tensors are the KServe
  metadata's (:func:`service.api.kserve.metadata`), not the graphs'.
- :func:`statistics` — ``GET /v2/models[/{name}]/stats``, ``ModelStatistics``: each model
  version's counts and cumulative nanoseconds since it was loaded
  (``service/inference/statistics.py``), per serving replica as Triton's are per server.
- :func:`repository_index` — ``POST /v2/repository/index``, ``RepositoryIndex``: the served
  models (READY) and the refused ones (UNAVAILABLE, with the reason).
"""

from __future__ import annotations

from typing import Any

from service.api import kserve
from service.api.server import Server
from service.inference.manifest import Manifest
from service.inference.repository import ModelEntry
from service.inference.runners import batch_dependent, decodes_continuously
from service.inference.statistics import Duration, Snapshot
from service.settings import Settings


async def served_config(server: Server, name: str, version: str | None) -> dict[str, Any]:
    """:func:`model_config` of a served model, with the providers it runs on."""
    entry = server.resolve(name, None, version)
    await server.is_ready()  # fills model_info (a model still loading: no providers yet)
    providers = server.model_info.get(entry.name, {}).get("providers")
    return model_config(entry.manifest, server.settings, providers, scheduling(entry))


def scheduling(entry: ModelEntry) -> str:
    """How the model's requests are batched (``service/inference/worker.py``), in a few words."""
    if decodes_continuously(entry):
        return "iteration-level: requests join and leave the running batch at every decoder step"
    if batch_dependent(entry):
        return "queued per model, one row per graph call (a row's output would depend on its batch)"
    return "dynamic: an idle model starts a request at once, a busy one batches what accumulated"


async def served_statistics(server: Server, name: str | None, version: str | None) -> dict[str, Any]:
    return statistics(await server.statistics(name, version))


async def served_index(server: Server, ready_only: bool) -> list[dict[str, Any]]:
    index = repository_index(server.entries, server.rejected, await server.is_ready())
    return [m for m in index if m["state"] == "READY"] if ready_only else index


def _data_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _tensor(spec: dict[str, Any], optional: bool) -> dict[str, Any]:
    """A KServe metadata tensor (its first axis the batch) as a Triton config tensor: ``dims``
    without the batch axis; a tensor of the batch axis alone is ``[1]`` reshaped to ``[]``, as
    Triton writes it."""
    dims = spec["shape"][1:]
    tensor: dict[str, Any] = {"name": spec["name"], "data_type": _data_type(spec["datatype"])}
    tensor["dims"] = dims or [1]
    if not dims:
        tensor["reshape"] = {"shape": []}
    if optional:
        tensor["optional"] = True
    return tensor


def model_config(
    manifest: Manifest, settings: Settings, providers: list[str] | None, scheduled: str
) -> dict[str, Any]:
    """The model's configuration as Triton's ``ModelConfig`` says it (JSON field names). An image
    model takes ``IMAGE`` or ``PIXELS``: both are ``optional``, one is required. ``scheduled``:
    :func:`scheduling`, under ``parameters``."""
    meta = kserve.metadata(manifest, settings.limits)
    batching = settings.batching_for(manifest.name)
    images = manifest.task != "translation"
    limits = settings.limits
    gpu = bool(providers) and providers[0] == "CUDAExecutionProvider"  # type: ignore[index]
    parameters = {"task": manifest.task, "family": manifest.family, "description": manifest.description}
    parameters |= {k: str(v) for k, v in meta["parameters"].items()} | {"scheduling": scheduled}
    return {
        "name": manifest.name,
        "platform": kserve.PLATFORM,
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}},
        # what one request may carry: larger batches are refused, a batch-sized part at a time computes
        "max_batch_size": limits.max_images if images else limits.max_texts,
        "input": [_tensor(t, optional=images) for t in meta["inputs"]],
        "output": [_tensor(t, optional=False) for t in meta["outputs"]],
        "dynamic_batching": {
            "preferred_batch_size": [batching.max_batch_size],
            "max_queue_delay_microseconds": round(batching.batch_wait_timeout_s * 1e6),
        },
        "instance_group": [
            {"name": manifest.name, "kind": "KIND_GPU" if gpu else "KIND_CPU", "count": 1, "gpus": []}
        ],
        "parameters": {key: {"string_value": value} for key, value in parameters.items()},
    }


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def statistics(snapshots: list[Snapshot]) -> dict[str, Any]:
    """``{"model_stats": [...]}``, one entry per model version, as Triton answers it."""
    return {
        "model_stats": [
            {
                "name": s.name,
                "version": str(s.version),
                "last_inference": s.last_inference_ms,
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "inference_stats": {
                    "success": _duration(s.success),
                    "fail": _duration(s.fail),
                    "queue": _duration(s.queue),
                    "compute_input": _duration(s.compute_input),
                    "compute_infer": _duration(s.compute_infer),
                    "compute_output": _duration(s.compute_output),
                    "cache_hit": {"count": 0, "ns": 0},
                    "cache_miss": {"count": 0, "ns": 0},
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": {"count": d.count, "ns": 0},
                        "compute_infer": _duration(d),
                        "compute_output": {"count": d.count, "ns": 0},
                    }
                    for size, d in s.batches.items()
                ],
            }
            for s in snapshots
        ]
    }


def repository_index(
    entries: dict[str, ModelEntry], rejected: dict[str, str], ready: bool
) -> list[dict[str, Any]]:
    """Every model version the repository holds that the service looked at: READY when served
    (LOADING while the replica warms up), UNAVAILABLE with the reason when refused (a version
    refused beside an older one served is listed with its own number)."""
    state = "READY" if ready else "LOADING"
    index = [{"name": n, "version": str(e.version), "state": state, "reason": ""} for n, e in entries.items()]
    for key, why in rejected.items():  # "<name>/<version>", or a name without a valid version
        name, _, version = key.partition("/")
        index.append({"name": name, "version": version, "state": "UNAVAILABLE", "reason": why})
    return sorted(index, key=lambda m: (m["name"], int(m["version"] or 0)))
