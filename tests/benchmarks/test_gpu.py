"""The GPU check's script and benchmark, on a machine without a GPU: ``benchmarks/gpu.py`` refuses
without CUDA and runs every part on the CPU provider in its smoke mode (the report it writes has
the parity rows, the raw and served ViT rates, the NMT ratios and short requests among long ones); ``gpu_check.sh`` parses and the
make target it installs ``.venv-gpu`` with exists."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from benchmarks import gpu
from benchmarks.decoding_load import PARTS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="a GPU is here")
def test_the_gpu_benchmark_refuses_without_cuda(tmp_path: Path) -> None:
    assert gpu.main(["--repository", str(tmp_path), "--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_every_part_of_the_gpu_benchmark_runs_on_the_cpu_provider(
    tiny_repository: Path, tmp_path: Path
) -> None:
    earlier = tmp_path / f"{datetime.date.today()}-gpu.json"  # a run of the same day's
    earlier.write_text("{}")
    args = ["--repository", str(tiny_repository), "--out", str(tmp_path), "--smoke-on-cpu"]
    assert gpu.main([*args, "--long-model", str(tiny_repository)]) == 0  # the demo model stands in
    assert earlier.read_text() == "{}"  # kept: this run's report has a name of its own
    [report] = set(tmp_path.glob("*-gpu*.json")) - {earlier}
    r = json.loads(report.read_text())
    for name in ("dates-transformer", "dates-bahdanau"):
        assert r["parity"][name]["same_tokens"] == r["parity"][name]["texts"]  # resident = numpy loop
    assert r["parity"]["fashion-vit"]["logits_max_diff_tf32_off"] == 0.0
    assert r["vit_raw"]["best_images_per_s"] > 0 and set(r["vit_served"]) == {"64", "256"}
    assert r["vit_served"]["64"]["images_per_s"] > 0 and r["nmt"]["dates-transformer"]["ratio"] > 0
    assert r["vit_pipeline"]["images_per_s"] > 0
    c = r["short_among_long"]
    assert c["short_requests"] > 0 and c["solo_short_ms"] > 0 and set(c["parts"]) == set(PARTS)
    md = report.with_suffix(".md").read_text()
    assert "× pipeline ceiling (goal ≥ 0.9)" in md and "× solo** (goal ≤ 1.3)" in md


@pytest.mark.slow
def test_the_vit_in_process_and_as_replica_processes_on_the_cpu_provider(tiny_repository: Path) -> None:
    """The GPU machine's path without Ray: the worker called in process, then two spawned
    replica processes started together; every request answered, batches formed."""
    vit = tiny_repository / "fashion-vit" / "1"
    alone = gpu.vit_in_process(vit, (8,), gpu.CPU, 0.5)
    assert alone[8]["images_per_s"] > 0 and alone[8]["mean_batch"] >= 1 and "latencies_s" not in alone[8]
    two = gpu.vit_replicas(vit, 2, 8, gpu.CPU, 0.5)
    assert two["replicas"] == 2 and two["images_per_s"] > 0 and two["p99_ms"] >= two["p50_ms"] > 0


def test_the_gpu_benchmark_imports_without_matplotlib() -> None:
    """``.venv-gpu`` has the serve-gpu extra, without matplotlib: the served ViT's path imports
    ``benchmarks.run`` (and its report module), which must not need it until it plots."""
    code = "import sys; sys.modules['matplotlib'] = None; import benchmarks.gpu, benchmarks.run"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_the_gpu_check_script_parses_and_its_make_targets_exist() -> None:
    script = ROOT / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "make .venv-gpu/.installed" in text and "benchmarks.gpu" in text
    dry = subprocess.run(
        ["make", "-n", "-B", "-C", str(ROOT), ".venv-gpu/.installed"], capture_output=True, text=True
    )
    assert dry.returncode == 0 and "serve-gpu" in dry.stdout
    assert (ROOT / "tests" / "service" / "inference" / "test_gpu.py").exists()


@pytest.mark.slow
def test_the_gpu_checks_fp16_step_writes_the_variants_beside_the_built_models(
    tiny_repository: Path, fp16_repository: Path, tmp_path: Path
) -> None:
    """The script's fp16 step, run as the script runs it after ``make models``: the fp32 versions
    exist, a variant does not (an ``export export`` there was refused, the version existing, and
    ``set -e`` stopped the script before its GPU tests) and is written; one that exists is left
    alone, and so is everything on a second run."""
    repository = tmp_path / "repo"
    for name in ("fashion-vit", "dates-transformer"):
        shutil.copytree(tiny_repository / name, repository / name)
    shutil.copytree(fp16_repository / "fashion-vit-fp16", repository / "fashion-vit-fp16")
    kept = (repository / "fashion-vit-fp16" / "1" / "manifest.json").read_bytes()
    [step] = [line for line in (ROOT / "benchmarks" / "gpu_check.sh").read_text().splitlines()
              if "--precision fp16" in line and not line.startswith("#")]  # fmt: skip
    step = step.replace(".venv/bin/python", sys.executable)
    env = {**os.environ, "REPO": str(repository)}
    for _ in range(2):
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", step], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (repository / "dates-transformer-fp16" / "1" / "manifest.json").is_file()
    assert (repository / "fashion-vit-fp16" / "1" / "manifest.json").read_bytes() == kept
    assert sorted(p.name for p in repository.iterdir()) == [
        "dates-transformer",
        "dates-transformer-fp16",
        "fashion-vit",
        "fashion-vit-fp16",
    ]
