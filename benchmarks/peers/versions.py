"""Pinned versions of the peer servers (issue #19) and the virtual environments that hold them.

Each peer lives in ``build/venvs/<name>`` with exactly its pins: the serving framework, and the same
ONNX Runtime and Pillow as the service's own venv (NumPy too, except where the framework forbids
it), so the peers compute what the service computes. TorchServe's handler does not import torch,
but its worker process does, so that venv has the local CPU wheel of torch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: the numerical stack, as in the service's venv (``.venv``)
ORT, PILLOW, NUMPY = "onnxruntime==1.32.0", "pillow==13.0.0", "numpy==2.4.6"

PINS: dict[str, tuple[str, ...]] = {
    # the Java frontend comes inside the wheel; the archiver only packs the handler and the graph.
    # TorchServe's Python worker imports torch and yaml without declaring them: the CPU wheel of
    # torch (on this machine's disk, never a CUDA build) and PyYAML as in the service's venv
    "torchserve": (
        "torchserve==0.12.0",
        "torch-model-archiver==0.12.0",
        "torch==2.13.0",
        "pyyaml==6.0.4",
        ORT,
        PILLOW,
        NUMPY,
    ),
    # the wheel ships its own tritonserver binary (Python backend, HTTP/gRPC frontends); it requires
    # numpy<2, so this venv has the last 1.x (ONNX Runtime's wheel accepts numpy>=1.21.6)
    "pytriton": ("nvidia-pytriton==0.7.0", ORT, PILLOW, "numpy==1.26.4"),
}


def venv(name: str, root: Path) -> Path:
    """The python of ``<root>/build/venvs/<name>``, created and brought to ``PINS[name]`` if needed."""
    return install(root / "build" / "venvs" / name, PINS[name])


def install(directory: Path, pins: tuple[str, ...]) -> Path:
    """The python of the venv ``directory``, created and brought to ``pins`` if needed. A marker
    file records the pins installed; a second call with unchanged pins does nothing."""
    python, stamp = directory / "bin" / "python", directory / ".pins"
    if python.exists() and stamp.is_file() and stamp.read_text().split() == list(pins):
        return python
    if not python.exists():
        print(f"creating {directory}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(directory)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins], check=True)
    stamp.write_text("\n".join(pins) + "\n")
    return python
