"""The GPUs this machine gives a private Ray (``python -m service`` without ``ATTN_RAY_ADDRESS``):
whether the CUDA provider can run here at all, and how many GPUs Ray will count. No Ray import:
``service/__main__.py`` asks before Ray's variables are set."""

from __future__ import annotations

import functools
import logging
import os
import subprocess
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings


@functools.cache
def _nvidia_smi() -> subprocess.CompletedProcess[str] | None:
    """``nvidia-smi -L``, run once per process (a start asks :func:`no_local_gpu`, then
    :func:`local_gpus`); None where it cannot run."""
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None


def no_local_gpu() -> str | None:
    """Why this machine cannot run the CUDA provider, or None when it can."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider (the serve-gpu extra brings it: make serve-gpu)"
    listed = _nvidia_smi()
    if listed is None:
        return "nvidia-smi is not here (no NVIDIA driver)"
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return "nvidia-smi lists no GPU"
    return None


def local_gpus(listing: str | None = None) -> int:
    """The GPUs a private Ray finds here, as it counts them: those ``nvidia-smi -L`` lists (or
    ``listing``), at most as many as ``CUDA_VISIBLE_DEVICES`` names when it is set."""
    if listing is None:
        listed = _nvidia_smi()
        listing = listed.stdout if listed is not None and listed.returncode == 0 else ""
    count = sum(1 for line in listing.splitlines() if line.startswith("GPU "))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip()]))
    return count


def on_the_cpu(settings: Settings, why: str) -> Settings:
    """``settings`` without the CUDA provider, said: replicas reserving a GPU share that this Ray
    will never have would wait forever."""
    logging.getLogger("service").warning("CUDA was asked for, but %s: serving on the CPU", why)
    cpu_only = [p for p in settings.providers if p != "CUDAExecutionProvider"] or ["CPUExecutionProvider"]
    return settings.model_copy(update={"providers": cpu_only})
