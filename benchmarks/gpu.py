"""The GPU check (``benchmarks/gpu_check.sh``): CUDA against CPU, fp16 drift, and the ViT and NMT
paths at GPU batch sizes against ONNX Runtime CUDA alone → ``benchmarks/results/<date>-gpu.{json,md}``.

1. **Parity.** Every model of the repository on CUDA against the CPU provider: the ViT's logits
   and attention on a batch of 64 (fp32 goal ≤ 1e-3; measured with TF32 off, ONNX Runtime's
   ``use_tf32=0``, and as served — TF32 off too since 2026-12-04); each translation model's
   greedy decodes — the resident loop on CUDA against the numpy loop on CPU — tokens equal,
   attention's largest difference. ``<name>-fp16`` variants: their drift from fp32 on CUDA.
2. **ViT.** ONNX Runtime CUDA alone (I/O binding, logits only) at batch 1 … 512 → its best
   images/s, beside it the one-process pipeline ceiling (the service's PNG decode and
   preprocessing of each image, then one CUDA run per batch); then the service (in-replica
   frontend, CUDA, one replica) under 64 and 256 closed-loop HTTP clients sending Fashion-MNIST
   PNGs. Goal: ≥ 0.9 × the pipeline ceiling. Where Ray is not installed (``--vit-in-process``, or
   a GPU machine that has only the inference core's packages) the same clients call the model's
   worker in this process instead — its batcher, PNG decode and preprocessing, no HTTP — and
   2 and 4 such workers in processes of their own share the GPU (replicas without Ray); the
   report says which path it measured.
3. **NMT.** Offline batched greedy decode (the resident loop, batches of 128) against the model's
   worker with its scheduler under 128 in-process clients, the loop on a thread and in its decode
   process (the default; the child chooses CUDA itself). Goal: served ≥ 0.8 × offline.
4. **Short requests among long ones** (issue #17, 5c) with ``--long-model DIR`` (written by
   ``python -m benchmarks.decoding --write-long-model DIR``: random weights that never emit EOS):
   ``make bench-decoding``'s (c) with the scheduler's loop on CUDA in its decode process — 8
   clients of 100-token requests, 8 of 10-token ones; the short p50 against a lone short request
   (goal ≤ 1.3 ×), and the mean step with rows per step alone and mixed.

Needs a CUDA GPU and onnxruntime-gpu (the ``serve-gpu`` extra); refuses to run without them.
``--smoke-on-cpu`` runs every part on the CPU provider in seconds (the resident loop included) so
that the test suite proves the script works on a machine without a GPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import importlib.util
import json
import multiprocessing
import os
import queue
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.ceilings import timed, vit_pipeline_images_per_s
from benchmarks.decoding_load import TEXTS, calling, closed_loop, solo_then_mixed
from benchmarks.decoding_load import worker as decoding_worker
from benchmarks.gpu_report import markdown
from benchmarks.loadgen import Request, percentile
from benchmarks.loadgen import closed_loop as http_closed_loop
from benchmarks.outputs import free_stem
from service.inference.jobs import ClassifyJob, TranslateJob
from service.inference.manifest import Manifest
from service.inference.model_set import take_turns
from service.inference.repository import load_entry
from service.inference.runtime import GraphSession
from service.inference.scheduler import TranslationScheduler
from service.inference.translation import Translator
from service.inference.worker import ModelWorker
from service.settings import Batching, Settings

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CPU = ["CPUExecutionProvider"]
VIT_BATCHES = (1, 8, 32, 64, 128, 256, 512)
GOALS = {"vit_vs_raw": 0.9, "nmt_vs_offline": 0.8, "fp32_max_diff": 1e-3}


def vit_parity(directory: Path, providers: list[str]) -> dict[str, float]:
    manifest = Manifest.load(directory)
    graph = manifest.graphs["model"]
    pixels = np.random.default_rng(0).standard_normal((64, 1, 48, 48)).astype(np.float32)
    want = GraphSession(directory / graph.file, graph, CPU).run({"pixels": pixels})
    got = GraphSession(directory / graph.file, graph, providers).run({"pixels": pixels})
    first: Any = ("CUDAExecutionProvider", {"use_tf32": "0"}) if providers == CUDA else providers[0]
    strict = ort.InferenceSession(
        str(directory / graph.file), providers=[first, *CPU] if providers == CUDA else CPU
    )
    logits, attentions = strict.run(
        ["logits", "attentions"], {"pixels": pixels.astype(graph.inputs[0].dtype)}
    )
    return {
        "logits_max_diff_tf32_off": float(np.abs(logits - want["logits"]).max()),
        "attention_max_diff_tf32_off": float(np.abs(attentions - want["attentions"]).max()),
        "logits_max_diff_served": float(np.abs(got["logits"].astype(np.float32) - want["logits"]).max()),
        "attention_max_diff_served": float(
            np.abs(got["attentions"].astype(np.float32) - want["attentions"]).max()
        ),
    }


def translation_parity(directory: Path, providers: list[str]) -> dict[str, float]:
    manifest = Manifest.load(directory)
    cpu = Translator(directory, manifest, CPU)
    gpu = Translator(directory, manifest, providers, resident=True)
    assert gpu.ops is not None and gpu.ops.providers[0] == providers[0]
    same, diff = 0, 0.0
    for a, b in zip(cpu.translate(TEXTS), gpu.translate(TEXTS), strict=True):
        same += a.target_tokens == b.target_tokens
        n = min(len(a.attention), len(b.attention))
        diff = max(diff, float(np.abs(a.attention[:n] - b.attention[:n]).max()))
    return {"texts": len(TEXTS), "same_tokens": same, "attention_max_diff": diff}


def vit_raw(directory: Path, providers: list[str], seconds: float) -> dict[str, Any]:
    manifest = Manifest.load(directory)
    graph = manifest.graphs["model"]
    session = GraphSession(directory / graph.file, graph, providers)
    rates = {}
    for batch in VIT_BATCHES:
        pixels = np.random.default_rng(batch).standard_normal((batch, 1, 48, 48)).astype(np.float32)
        rates[batch] = batch * timed(lambda p=pixels: session.run({"pixels": p}, ["logits"]), seconds)
    best = max(rates, key=rates.__getitem__)
    return {"images_per_s_by_batch": rates, "best_batch": best, "best_images_per_s": rates[best]}


def vit_served(
    repository: Path, out: Path, clients: tuple[int, ...], providers: list[str], seconds: float
) -> dict[int, dict[str, float]]:
    import base64

    from benchmarks.peers.smoke import test_images
    from benchmarks.run import configurations, start

    config = configurations(repository, repository.parent / "build" / "checkpoints")["in-replica"]
    env = {"ATTN_PROVIDERS": json.dumps(providers)}
    server = start("attention-serve-gpu", dataclasses.replace(config, env={**config.env, **env}), out)
    requests = [
        Request.json("/v1/models/fashion-vit/classify", {"image": base64.b64encode(p).decode(), "top_k": 5})
        for p in test_images(256)
    ]
    results = {}
    try:
        for n in clients:
            r = asyncio.run(http_closed_loop("127.0.0.1", server.port, requests, n, seconds))
            results[n] = {
                "images_per_s": r.ok / r.elapsed_s,
                "p50_ms": percentile(r.latencies_s, 50) * 1000,
                "p99_ms": percentile(r.latencies_s, 99) * 1000,
                "errors": r.errors,
            }
    finally:
        server.stop()
    return results


async def classify_load(worker: ModelWorker, jobs: list[ClassifyJob], clients: int, seconds: float) -> dict:
    """:func:`benchmarks.decoding_load.calling` on images: images/s, p50/p99, the mean batch."""
    done, elapsed = await calling(worker, jobs, clients, seconds)
    latencies = [s for s, _ in done]
    return {
        "images_per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "mean_batch": float(np.mean([answer.metrics.batch_size for _, answer in done])),
        "latencies_s": latencies,
    }


def vit_worker(directory: Path, providers: list[str], replica: str) -> tuple[ModelWorker, list[ClassifyJob]]:
    """The ViT's worker as a replica holds it, and 256 Fashion-MNIST PNGs to send it (top 5)."""
    from benchmarks.peers.smoke import test_images

    settings = Settings(repository=directory.parent.parent, providers=providers)
    entry = load_entry(directory.parent.parent, directory.parent.name, 1)
    worker = ModelWorker(entry, settings, replica, "local")
    take_turns(settings)  # as a serving process does (ModelSet)
    return worker, [ClassifyJob(image=png, top_k=5) for png in test_images(256)]


def _replica(directory: Path, providers: list[str], clients: int, seconds: float, go: Any, out: Any) -> None:
    """(A spawned process: one replica.) The ViT's worker, warm; then, once every replica is,
    ``clients`` closed-loop callers for ``seconds``."""
    worker, jobs = vit_worker(directory, providers, f"replica-{os.getpid()}")
    out.put("ready")
    go.wait()
    out.put(asyncio.run(classify_load(worker, jobs, clients, seconds)))
    worker.close()


def _collect(out: Any, processes: list[Any], seconds: float) -> Any:
    """The next message of the replicas; a replica that died stops the wait."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            return out.get(timeout=0.5)
        except queue.Empty:
            dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a replica process exited with {dead[0]}") from None
    raise TimeoutError("the replicas did not answer")


def vit_replicas(
    directory: Path, replicas: int, clients: int, providers: list[str], seconds: float
) -> dict[str, float]:
    """``replicas`` processes, each the ViT's worker with its share of ``clients`` — how replicas
    that share one GPU (``ATTN_NUM_GPUS_PER_REPLICA``) add the cores that decode the images."""
    context = multiprocessing.get_context("spawn")
    go, out = context.Event(), context.Queue()
    shares = [clients // replicas + (i < clients % replicas) for i in range(replicas)]
    processes = [
        context.Process(target=_replica, args=(directory, providers, n, seconds, go, out), daemon=True)
        for n in shares
    ]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            ready = _collect(out, processes, 300)
            if ready != "ready":
                raise RuntimeError(f"a replica process said {ready!r} before it was ready")
        go.set()
        parts = [_collect(out, processes, seconds + 120) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    latencies = [x for part in parts for x in part["latencies_s"]]
    return {
        "replicas": replicas,
        "images_per_s": sum(part["images_per_s"] for part in parts),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "mean_batch": float(np.mean([part["mean_batch"] for part in parts])),
    }


def vit_in_process(
    directory: Path, clients: tuple[int, ...], providers: list[str], seconds: float
) -> dict[int, dict[str, float]]:
    """The ViT's worker called by closed-loop callers in this process (no Ray, no HTTP): its
    batcher, each request's PNG decode and preprocessing, top-5."""
    worker, jobs = vit_worker(directory, providers, "gpu")

    async def each() -> dict[int, dict[str, float]]:  # one event loop for every caller
        return {n: await classify_load(worker, jobs, n, seconds) for n in clients}

    try:
        results = asyncio.run(each())
    finally:
        worker.close()
    for r in results.values():
        del r["latencies_s"]
    return results


def nmt(directory: Path, providers: list[str], seconds: float) -> dict[str, Any]:
    manifest = Manifest.load(directory)
    translator = Translator(directory, manifest, providers, resident=True)
    batch = [TEXTS[i % len(TEXTS)] for i in range(128)]
    produced = sum(len(t.target_tokens) for t in translator.translate(batch))
    offline = produced * timed(lambda: translator.translate(batch), seconds / 3)
    jobs = [TranslateJob(texts=[t]) for t in TEXTS]
    r: dict[str, Any] = {"offline_tokens_per_s": offline}
    for mode in ("thread", "process"):
        settings = Settings(
            repository=directory.parent.parent,
            providers=providers,
            decode_process=mode == "process",
            batching=Batching(max_batch_size=128, batch_wait_timeout_s=0.0),
        )
        entry = load_entry(directory.parent.parent, directory.parent.name, 1)
        worker = ModelWorker(entry, settings, "gpu", "local")
        take_turns(settings)  # as a serving process does (ModelSet)
        try:
            # on CUDA resident already; forced for the CPU smoke run
            if isinstance(worker.scheduler, TranslationScheduler):
                worker.scheduler.decoder = translator
            served = asyncio.run(closed_loop(worker, jobs, 128, seconds))
        finally:
            worker.close()
        served["providers"] = list(worker.runner.providers)
        r["served" if mode == "thread" else "served_process"] = served
        r["ratio" if mode == "thread" else "ratio_process"] = served["tokens_per_s"] / offline
    return r


def short_among_long(directory: Path, providers: list[str], seconds: float) -> dict[str, Any]:
    """(4): ``make bench-decoding``'s (c) and (e) with the scheduler's loop in its decode process
    on ``providers``."""
    w = decoding_worker(directory, static=False, providers=providers)
    try:
        solo, mixed = asyncio.run(solo_then_mixed(w, seconds))
    finally:
        w.close()
    return {"solo_short_ms": solo, **mixed, "short_p50_vs_solo": mixed["short_p50_ms"] / solo}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--seconds", type=float, default=15.0, help="each load phase")
    p.add_argument("--smoke-on-cpu", action="store_true", help="every part on the CPU provider, briefly")
    p.add_argument(
        "--vit-in-process",
        action="store_true",
        help="the served ViT as its worker in this process, not over HTTP (the default where Ray is missing)",
    )
    p.add_argument(
        "--long-model",
        type=Path,
        metavar="DIR",
        help="part 4 on this model (python -m benchmarks.decoding --write-long-model DIR writes it)",
    )
    args = p.parse_args(argv)
    providers, seconds = (CPU, 1.0) if args.smoke_on_cpu else (CUDA, args.seconds)
    if not args.smoke_on_cpu and "CUDAExecutionProvider" not in ort.get_available_providers():
        print(
            "no CUDA provider: install the serve-gpu extra on a machine with an NVIDIA GPU", file=sys.stderr
        )
        return 2
    repo = args.repository
    names = sorted(d.name for d in repo.iterdir() if (d / "1" / "manifest.json").exists())
    r: dict[str, Any] = {"date": dt.date.today().isoformat(), "device": ort.get_device(), "parity": {}}
    for name in names:
        directory = repo / name / "1"
        task = Manifest.load(directory).task
        print(f"parity {name}", flush=True)
        check = vit_parity if task == "image-classification" else translation_parity
        r["parity"][name] = check(directory, providers)
        if name.endswith("-fp16"):  # its drift from fp32, measured at export (CPU)
            r["parity"][name] |= {f"export_{k}": v for k, v in Manifest.load(directory).eval_details.items()
                                  if isinstance(v, float)}  # fmt: skip
    print("ViT: ONNX Runtime CUDA alone, then served", flush=True)
    vit = repo / "fashion-vit" / "1"
    r["vit_raw"] = vit_raw(vit, providers, seconds / 5)
    from benchmarks.peers.smoke import test_images

    r["vit_pipeline"] = vit_pipeline_images_per_s(
        vit, test_images(64), tuple(providers), VIT_BATCHES, seconds / 10
    )
    if args.vit_in_process or importlib.util.find_spec("ray") is None:
        r["vit_path"] = "the worker in process (batcher, PNG decode, preprocessing; no HTTP, no Ray)"
        r["vit_served"] = vit_in_process(vit, (64, 256), providers, seconds)
        print("ViT: replicas as processes sharing the device", flush=True)
        r["vit_replicas"] = {n: vit_replicas(vit, n, 256, providers, seconds) for n in (2, 4)}
    else:
        r["vit_path"] = "HTTP, in-replica frontend, one replica"
        with tempfile.TemporaryDirectory() as logs:
            r["vit_served"] = vit_served(repo, Path(logs), (64, 256), providers, seconds)
    print("NMT: offline vs served", flush=True)
    r["nmt"] = {
        n: nmt(repo / n / "1", providers, seconds)
        for n in ("dates-transformer", "bible-fr-en-transformer")
        if n in names
    }
    if args.long_model:
        print("NMT: short requests among long ones", flush=True)
        long = args.long_model / "dates-transformer" / "1"
        r["short_among_long"] = short_among_long(long, providers, seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / free_stem(args.out, f"{r['date']}-gpu")  # never over an earlier run's
    stem.with_suffix(".json").write_text(json.dumps(r, indent=2, default=str))
    stem.with_suffix(".md").write_text(markdown(r))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
