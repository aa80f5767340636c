"""No install path puts both ONNX Runtime wheels in one environment.

``onnxruntime`` (CPU) and ``onnxruntime-gpu`` write the same ``onnxruntime/`` package: in one
environment whichever was installed last wins, silently. So the extras keep them apart
(``serve`` / ``serve-gpu`` over ``serve-core``), every environment the Makefile and the
Dockerfiles install is checked here against the extras, and pip itself resolves ``serve-gpu``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
WHEELS = {"onnxruntime", "onnxruntime-gpu"}
#: the last onnxruntime-gpu on PyPI built for CUDA 12 (1.27.0 on: CUDA 13)
CUDA12_ORT = "1.26.0"


def requirements(extras: set[str]) -> dict[str, Requirement]:
    """What ``pip install '.[extras]'`` asks for directly: the dependencies and each extra's, the
    project's own extras (``attention-serve[serve-core]``) expanded."""
    found = {canonicalize_name(r.name): r for r in map(Requirement, PROJECT["dependencies"])}
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        assert extra in EXTRAS, f"no extra {extra!r} in pyproject.toml"
        if extra in seen:
            continue
        seen.add(extra)
        for req in map(Requirement, EXTRAS[extra]):
            if canonicalize_name(req.name) == canonicalize_name(PROJECT["name"]):
                todo.extend(req.extras)
            else:
                found[canonicalize_name(req.name)] = req
    return found


def installs() -> dict[str, set[str]]:
    """Each environment the Makefile or a Dockerfile installs the project into → the extras it gets
    (an environment installed twice gets both sets)."""
    envs: dict[str, set[str]] = {}
    sources = [ROOT / "Makefile", ROOT / "deploy" / "Dockerfile", ROOT / "deploy" / "Dockerfile.gpu"]
    for path in sources:
        text = re.sub(r"\\\n\s*", " ", path.read_text())
        for line in text.splitlines():
            for command in line.split("&&"):
                found = re.search(
                    r"(\S+?)(?:/bin/python -m pip|/bin/pip| -m pip) install .*'\.\[([\w,-]+)\]'", command
                )
                if found:
                    env = f"{path.name}:{found.group(1)}"
                    envs.setdefault(env, set()).update(found.group(2).split(","))
    return envs


def test_every_install_path_gets_exactly_one_onnxruntime() -> None:
    envs = installs()
    # the developer venv (make), the GPU venv (make serve-gpu) and each image's runtime
    assert {
        "Makefile:$(PY)",
        "Makefile:$(GPU_VENV)",
        "Dockerfile:/opt/venv",
        "Dockerfile.gpu:/opt/venv",
    } <= set(envs)
    for env, extras in envs.items():
        wheels = WHEELS & set(requirements(extras))
        assert len(wheels) == 1, f"{env} installs .[{','.join(sorted(extras))}]: ONNX Runtime wheels {wheels}"
    assert envs["Dockerfile.gpu:/opt/venv"] == envs["Makefile:$(GPU_VENV)"] == {"serve-gpu"}
    assert envs["Dockerfile:/opt/venv"] == {"serve"}


def test_extras_split_the_wheels_and_pin_a_cuda_12_build() -> None:
    assert not WHEELS & set(requirements({"serve-core"}))
    assert WHEELS & set(requirements({"serve"})) == {"onnxruntime"}
    gpu = requirements({"serve-gpu"})
    assert WHEELS & set(gpu) == {"onnxruntime-gpu"}
    ort = gpu["onnxruntime-gpu"]
    assert str(ort.specifier) == f"=={CUDA12_ORT}" and ort.extras == {"cuda", "cudnn"}
    # serve-gpu is serve with the other wheel, nothing else
    assert set(gpu) - {"onnxruntime-gpu"} == set(requirements({"serve"})) - {"onnxruntime"}
    # export verifies its graphs with the CPU wheel: never beside serve-gpu
    assert "onnxruntime" in requirements({"export"})
    assert "gpu" not in EXTRAS, "the old `gpu` extra added onnxruntime-gpu beside serve's onnxruntime"


@pytest.mark.slow
def test_pip_resolves_serve_gpu_to_the_cuda_12_wheels_only(tmp_path: Path) -> None:
    """The real resolution, against the package index (about 30 s): the CUDA 12 build with its
    CUDA runtime and cuDNN wheels, and no CPU onnxruntime pulled in by any dependency."""
    report = tmp_path / "report.json"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), f"{ROOT}[serve-gpu]"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    resolved = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert resolved["onnxruntime-gpu"] == CUDA12_ORT
    assert "onnxruntime" not in resolved
    assert resolved["nvidia-cuda-runtime-cu12"].startswith("12.")
    assert resolved["nvidia-cudnn-cu12"].startswith("9.")
    assert not any(name.endswith("-cu13") for name in resolved), "a CUDA 13 library came in"
    assert "torch" not in resolved
    print(f"pip resolved .[serve-gpu] in {time.monotonic() - started:.1f} s")
