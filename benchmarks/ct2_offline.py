"""Decoding without a server for the CTranslate2 peer benchmark: both engines on one batch, our
scheduler in process, and where ours spends its time.

* :func:`offline_ours`: our ``Translator.translate`` (one ONNX Runtime thread), timed, plus the
  share of the time inside the two graphs' ``run`` (the rest is the search in Python/numpy).
* :func:`offline_ct2`: ``benchmarks/ct2_runner.py offline`` in the CTranslate2 venv.
* :func:`in_process`: our per-model scheduler without HTTP or Ray — the model's ``ModelWorker``,
  what a replica holds, driven by asyncio clients in this process — which splits the served gap
  into the scheduler's part and the server's.
* :func:`step_profile`: ONNX Runtime's own profiler on one decoder step at the batch's shape —
  the time per operator type, to tell GEMM speed from the graph's other work.
* :func:`agreement`: the two engines' greedy outputs compared token for token.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import onnxruntime as ort

from benchmarks.decoding_load import closed_loop, step_feeds
from benchmarks.profiling import own_tree_cpu_s
from service.inference.jobs import TranslateJob
from service.inference.manifest import Manifest
from service.inference.model_set import take_turns
from service.inference.repository import ModelEntry
from service.inference.runtime import GraphSession
from service.inference.translation import Translator
from service.inference.worker import ModelWorker
from service.settings import Batching, Settings

RUNNER = Path(__file__).resolve().parent / "ct2_runner.py"


def _median_call(fn: Callable[[], object], repeat: int) -> list[float]:
    fn()  # warm-up
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def offline_ours(version: Path, texts: list[str], max_length: int, repeat: int) -> dict[str, Any]:
    """Our batched greedy decode, one ORT thread: tokens/s, and where the time goes."""
    translator = Translator(version, Manifest.load(version), ["CPUExecutionProvider"], 1)
    answers = translator.translate(texts, max_length=max_length)
    seconds = _median_call(lambda: translator.translate(texts, max_length=max_length), repeat)
    tokens = sum(len(a.target_tokens) for a in answers)
    in_graphs: dict[str, float] = {}
    run_graph = GraphSession.run

    def timed(session: GraphSession, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        try:
            return run_graph(session, tensors)
        finally:
            key = "encoder" if session is translator.encoder else "decoder_step"
            in_graphs[key] = in_graphs.get(key, 0.0) + time.perf_counter() - start

    with mock.patch.object(GraphSession, "run", timed):
        start = time.perf_counter()
        translator.translate(texts, max_length=max_length)
        total = time.perf_counter() - start
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / statistics.median(seconds),
        "share_in_graphs": {k: v / total for k, v in in_graphs.items()},
        "source_tokens": [a.source_tokens for a in answers],
        "target_tokens": [a.target_tokens for a in answers],
    }


def offline_ct2(
    python: Path, model: Path, checkpoint: Path, texts: Path, max_length: int, repeat: int, compute: str
) -> dict[str, Any]:
    cmd = [str(python), str(RUNNER), "offline", "--model", str(model), "--spm", str(checkpoint),
           "--compute-type", compute, "--texts", str(texts), "--max-length", str(max_length),
           "--repeat", str(repeat)]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, check=True, env={**os.environ, "CT2_VERBOSE": "1"}
    )
    result: dict[str, Any] = json.loads(done.stdout)
    result["backend"] = [
        line.split("[info]", 1)[1].strip() for line in done.stderr.splitlines() if "[info]" in line
    ]
    return result


def in_process(
    version: Path, texts: list[str], max_length: int, clients: int, seconds: float
) -> dict[str, Any]:
    """``clients`` closed-loop callers of the model's worker in this process (one ORT thread, max
    batch 32, as served): tokens/s, latency, the mean time per output token and the CPU of this
    whole process (clients included) and its decode process per request."""
    settings = Settings(
        repository=version.parent.parent, batching=Batching(max_batch_size=32), intra_op_threads=1
    )
    entry = ModelEntry(version.parent.name, int(version.name), version, Manifest.load(version))
    worker = ModelWorker(entry, settings, "bench", "local")
    take_turns(settings)  # as a serving process does (ModelSet)
    jobs = [TranslateJob(texts=[t], max_length=max_length) for t in texts]
    cpu = own_tree_cpu_s()
    try:
        result = asyncio.run(closed_loop(worker, jobs, clients, seconds))
        cpu = own_tree_cpu_s() - cpu  # before close: the decode process (a child, by default) counts too
    finally:
        worker.close()
    return {
        "clients": clients,
        **{k: v for k, v in result.items() if k != "requests"},
        "process_cpu_ms_per_request": cpu / max(1, result["requests"]) * 1000,
    }


def step_profile(version: Path, texts: list[str], past: int, runs: int = 20) -> dict[str, Any]:
    """One decoder step at the offline batch (the texts' encoder outputs, a cache of ``past``
    positions) under ONNX Runtime's profiler, one thread: ms per step and each operator type's
    share of the operator time."""
    manifest = Manifest.load(version)
    translator = Translator(version, manifest, ["CPUExecutionProvider"], 1)
    batch = translator.encode([translator.tokenize(t)[0] for t in texts])
    n, feeds = len(texts), step_feeds(translator, batch, past)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_profiling, options.profile_file_prefix = True, str(Path(tmp) / "step")
        path = version / manifest.graphs["decoder_step"].file
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: feeds[i.name] for i in session.get_inputs()}
        for _ in range(runs + 1):  # the first is a warm-up, left out below
            session.run(None, inputs)
        trace = json.loads(Path(session.end_profiling()).read_text())
    runs_us = [e["dur"] for e in trace if e.get("name") == "model_run"][1:]
    by_op: Counter[str] = Counter()
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values())
    return {
        "batch": n,
        "past_len": past,
        "ms_per_step": statistics.median(runs_us) / 1000,
        "op_share": {op: d / total for op, d in by_op.most_common()},
    }


def agreement(ours: list[list[str]], theirs: list[list[str]]) -> dict[str, float]:
    """Translations identical token for token, and the mean share of tokens before the first
    difference (greedy search: one flipped argmax changes everything after it)."""
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    prefix = []
    for a, b in zip(ours, theirs, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(a), 1))
    return {"identical": same, "of": len(ours), "mean_common_prefix": statistics.fmean(prefix)}


def median_of_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "tokens": rows[0]["tokens"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
        "tokens_per_s_by_round": [r["tokens_per_s"] for r in rows],
        "seconds_per_batch": statistics.median(s for r in rows for s in r["seconds"]),
    }
    if "share_in_graphs" in rows[0]:
        out["share_in_graphs"] = {
            k: statistics.median(r["share_in_graphs"][k] for r in rows) for k in rows[0]["share_in_graphs"]
        }
    return out
