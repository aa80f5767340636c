"""``make bench-decoding``: the translation decoder — KV cache and the per-model scheduler (issue #17).

Writes ``benchmarks/results/<date>-decoding.{json,md,png}``:

a. **Decoder cost per token vs output length**, KV-cached step against the whole-prefix step of
   the same weights, at batch 1 and 16: the dates-transformer demo checkpoint, and the same
   architecture at opus-mt-en-de's shape (6 + 6 layers, d 512, 8 heads, FFN 2048; weights
   random — the cost does not depend on them).
b. **Served tokens/s at 32 clients** through the model's scheduler against offline batched greedy
   decoding of the same graphs (one ORT thread each).
c. **Short requests among long ones**: 8 clients send long translations (100 tokens) while 8
   others send short ones (10 tokens); the short ones' p50/p99 against their solo latency, with
   the scheduler and with static batches (the batcher as before the scheduler: 5 ms wait, a
   batch decodes to completion).
d. **Open-loop Poisson arrivals** at 50 / 80 / 95 % of the closed-loop capacity: p50 / p99,
   scheduler against static batches.
e. **One client**: latency of a lone short request, scheduler against static batch.

The server side is the model's ``ModelWorker`` in this process — the same object a replica
holds — driven by asyncio clients, so the figures are the scheduling, not HTTP (``make bench``
measures the whole service). Long outputs need a model that does not stop early: (c) and (e) use
the dates-transformer architecture with random weights, which emits EOS rarely, and cap each
request with ``max_length``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.loadgen import percentile
from export import checkpoint
from export.graphs import transformer_plans, transformer_prefix_plans
from export.models.transformer import Transformer, TransformerConfig
from export.onnx_export import export_graph
from service.errors import Overloaded
from service.inference.jobs import Translated, TranslateJob
from service.inference.manifest import Manifest
from service.inference.repository import ModelEntry
from service.inference.runtime import GraphSession
from service.inference.translation import Translator
from service.inference.worker import ModelWorker
from service.settings import Batching, Settings

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "5 mars 2024",
    "Tuesday, July 4, 1995",
    "31.12.1999",
    "12 de mayo de 2003",
    "3 juin 1980",
    "Samstag, 15. Mai 1976",
    "9/9/1986",
    "mar, 31 mar 2009",
]
OPUS_SHAPE = {"d_model": 512, "heads": 8, "ff_dim": 2048, "enc_layers": 6, "dec_layers": 6, "max_len": 256}
LENGTHS = (1, 8, 16, 32, 64, 128)
ROUNDS = 3  # (b): served runs, each bracketed by offline decodes
MODEL = "dates-transformer"  # every variant keeps the name (and tokenizers) of the demo model


def export_version(
    model: Transformer, like: Path, directory: Path, cached: bool, max_target: int | None = None
) -> Path:
    """``model`` as a version with ``like``'s tokenizers, in the KV-cached or whole-prefix contract."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.load(like)
    assert manifest.translation is not None
    for f in (manifest.translation.source_tokenizer.file, manifest.translation.target_tokenizer.file):
        (directory / f).write_bytes((like / f).read_bytes())
    plans = transformer_plans(model) if cached else transformer_prefix_plans(model)
    graphs = {plan.key: export_graph(plan, directory).spec for plan in plans}
    translation = manifest.translation.model_copy(
        update={
            "decoder": "transformer-kv" if cached else "transformer",
            "max_target_tokens": max_target or manifest.translation.max_target_tokens,
        }
    )
    manifest.model_copy(update={"graphs": graphs, "translation": translation}).write(directory)
    return directory


def _best_ms(fn: Any, repeat: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def step_cost(directory: Path, batch: int) -> dict[int, float]:
    """ms per decoder step at each past length (one ORT thread): the KV step gets a cache of that
    length, the whole-prefix step a prefix of that length."""
    manifest = Manifest.load(directory)
    spec = manifest.translation
    assert spec is not None
    session = GraphSession(
        directory / manifest.graphs["decoder_step"].file,
        manifest.graphs["decoder_step"],
        ["CPUExecutionProvider"],
        1,
    )
    encoder = GraphSession(
        directory / manifest.graphs["encoder"].file, manifest.graphs["encoder"], ["CPUExecutionProvider"], 1
    )
    src = np.full((batch, 12), 5, dtype=np.int64)
    mask = np.ones((batch, 12), dtype=bool)
    encoded = encoder.run({"src": src, "src_mask": mask})
    out = {}
    limit = spec.max_target_tokens + 1  # positions the graph has
    for length in (t for t in LENGTHS if t <= limit):
        if spec.decoder == "transformer-kv":
            keys = encoded["cross_keys"]
            cache = (
                np.random.default_rng(0)
                .standard_normal((*keys.shape[:3], length - 1, keys.shape[4]))
                .astype(np.float32)
            )
            feeds = {
                "tokens": np.full(batch, 5),
                "positions": np.full(batch, length - 1),
                "past_keys": cache,
                "past_values": cache,
                "past_mask": np.ones((batch, length - 1), dtype=bool),
                "cross_keys": keys,
                "cross_values": encoded["cross_values"],
                "src_mask": mask,
            }
        else:
            feeds = {"tokens": np.full((batch, length), 5), "memory": encoded["memory"], "src_mask": mask}
        out[length] = _best_ms(lambda feeds=feeds: session.run(feeds))
    return out


async def closed_loop(
    worker: ModelWorker, jobs: list[TranslateJob], clients: int, seconds: float
) -> dict[str, Any]:
    """``clients`` callers of ``worker`` in this process, each sending its next job as soon as
    the last is answered, for ``seconds``: requests/s, target tokens/s, p50/p99 and the mean
    time per output token the answers report."""
    latencies: list[float] = []
    per_token: list[float] = []
    tokens = 0
    stop = time.perf_counter() + seconds

    async def client(i: int) -> None:
        nonlocal tokens
        k = i
        while time.perf_counter() < stop:
            start = time.perf_counter()
            answer = await worker.predict(jobs[k % len(jobs)])
            latencies.append(time.perf_counter() - start)
            assert isinstance(answer.result, Translated)
            tokens += answer.result.tokens_generated
            if answer.metrics.time_per_output_token_ms is not None:
                per_token.append(answer.metrics.time_per_output_token_ms)
            k += clients

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / elapsed,
        "tokens_per_s": tokens / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "mean_time_per_output_token_ms": statistics.fmean(per_token) if per_token else None,
    }


async def _open_loop(
    worker: ModelWorker, jobs: list[TranslateJob], rate: float, seconds: float
) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` requests/s (seeded), each answered whenever it is done."""
    rng = np.random.default_rng(0)
    latencies: list[float] = []
    shed = 0

    async def one(job: TranslateJob) -> None:
        nonlocal shed
        start = time.perf_counter()
        try:
            await worker.predict(job)
        except Overloaded:  # past the model's queue limit: the service answers 503
            shed += 1
            return
        latencies.append(time.perf_counter() - start)

    tasks, k = [], 0
    start = time.perf_counter()
    next_at = start
    while next_at < start + seconds:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        tasks.append(asyncio.ensure_future(one(jobs[k % len(jobs)])))
        k += 1
        next_at += rng.exponential(1 / rate)
    await asyncio.gather(*tasks)
    return {
        "rate": rate,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "shed": shed,
    }


async def _mixed(worker: ModelWorker, seconds: float) -> dict[str, Any]:
    """8 clients of long requests and 8 of short ones at once; the short ones' latencies."""
    long_job = TranslateJob(texts=["Samstag, 15. Mai 1976"], max_length=100)
    short = [TranslateJob(texts=[t], max_length=10) for t in TEXTS]
    stop = time.perf_counter() + seconds
    short_latencies: list[float] = []

    long_tokens: list[int] = []

    async def long_client() -> None:
        while time.perf_counter() < stop:
            answer = await worker.predict(long_job)
            assert isinstance(answer.result, Translated)
            long_tokens.append(answer.result.tokens_generated)

    async def short_client(i: int) -> None:
        await asyncio.sleep(0.05 + i * 0.01)  # after the long ones started
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await worker.predict(short[i % len(short)])
            short_latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(long_client() for _ in range(8)), *(short_client(i) for i in range(8)))
    return {
        "short_p50_ms": percentile(short_latencies, 50) * 1000,
        "short_p99_ms": percentile(short_latencies, 99) * 1000,
        "short_requests": len(short_latencies),
        "long_tokens_mean": statistics.fmean(long_tokens) if long_tokens else 0.0,
    }


async def _solo(worker: ModelWorker, job: TranslateJob, n: int = 30) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await worker.predict(job)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


async def _solo_then_mixed(w: ModelWorker, seconds: float) -> tuple[float, dict[str, Any]]:
    """(e) then (c), on one event loop (a worker's queue belongs to the loop it first ran on).
    With the scheduler, also the mean decoder step (ms, Python included) and rows per step in
    each phase: a short request shares steps with the long ones, so ten of its steps cost ten
    steps of the whole batch — the floor under its latency."""
    steps: list[tuple[int, float]] = []
    if w.scheduler is not None:
        w.scheduler.on_step = lambda rows, live, tokens, s: steps.append((rows, s))
    solo = await _solo(w, TranslateJob(texts=["3 juin 1980"], max_length=10))
    alone, steps[:] = list(steps), []
    mixed = await _mixed(w, seconds)
    for phase, seen in (("solo", alone), ("mixed", steps)):
        if seen:
            mixed[f"{phase}_step_ms"] = statistics.fmean(s for _, s in seen) * 1000
            mixed[f"{phase}_rows_per_step"] = statistics.fmean(r for r, _ in seen)
    return solo, mixed


def _median_round(rounds: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """``mode``'s run of the round with the median ratio to that round's offline rate, with the
    ratio (each round's served run against the offline decode measured around it)."""
    ratios = [r[mode]["tokens_per_s"] / r["offline_tokens_per_s"] for r in rounds]
    middle = sorted(range(len(rounds)), key=ratios.__getitem__)[len(rounds) // 2]
    return {**rounds[middle][mode], "ratio_to_offline": ratios[middle], "ratios": ratios}


def worker(directory: Path, static: bool) -> ModelWorker:
    """The model's worker as a replica holds it; ``static``: its static batcher with the wait the
    service used before the scheduler (5 ms), as a baseline."""
    batching = Batching(max_batch_size=32, batch_wait_timeout_s=0.005 if static else 0.0)
    settings = Settings(repository=directory.parent.parent, batching=batching, intra_op_threads=1)
    w = ModelWorker(
        ModelEntry(directory.parent.name, 1, directory, Manifest.load(directory)), settings, "bench", "local"
    )
    if static:
        w.scheduler = None
    return w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decoding", description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "build" / "checkpoints")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    like = args.repository / MODEL / "1"
    trained = checkpoint.load(args.checkpoints / MODEL).model
    assert isinstance(trained, Transformer)
    results: dict[str, Any] = {"date": stamp, "cost_ms_per_step": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        opus = Transformer(
            TransformerConfig(src_vocab=trained.cfg.src_vocab, tgt_vocab=trained.cfg.tgt_vocab, **OPUS_SHAPE)
        ).eval()
        for name, model in (("dates-transformer", trained), ("opus-mt-shape", opus)):
            for cached in (True, False):
                contract = "kv" if cached else "prefix"
                print(f"(a) {name} {contract}", flush=True)
                d = export_version(
                    model, like, root / f"{name}-{contract}" / MODEL / "1", cached, model.cfg.max_len - 1
                )
                results["cost_ms_per_step"][f"{name}/{contract}"] = {b: step_cost(d, b) for b in (1, 16)}
        kv = export_version(trained, like, root / "kv" / MODEL / "1", True)
        print("(b) served vs offline", flush=True)
        translator = Translator(kv, Manifest.load(kv), ["CPUExecutionProvider"], 1)
        batch = (TEXTS * 4)[:32]
        produced = sum(len(t.target_tokens) for t in translator.translate(batch))
        jobs = [TranslateJob(texts=[t]) for t in TEXTS]
        rounds: list[dict[str, Any]] = []
        for _ in range(ROUNDS):  # this machine's speed drifts: offline brackets each served run
            before = produced / (_best_ms(lambda: translator.translate(batch), 10) / 1000)
            served = asyncio.run(closed_loop(worker(kv, static=False), jobs, 32, args.duration))
            static = asyncio.run(closed_loop(worker(kv, static=True), jobs, 32, args.duration))
            offline = (before + produced / (_best_ms(lambda: translator.translate(batch), 10) / 1000)) / 2
            rounds.append({"offline_tokens_per_s": offline, "scheduler": served, "static": static})
        print("(d) open loop", flush=True)
        served, static = _median_round(rounds, "scheduler"), _median_round(rounds, "static")
        capacity = max(served["requests"], static["requests"]) / args.duration  # closed-loop req/s
        results["open_loop"] = {"capacity_requests_per_s": capacity}
        for mode in ("scheduler", "static"):
            results["open_loop"][mode] = [
                asyncio.run(
                    _open_loop(worker(kv, static=mode == "static"), jobs, load * capacity, args.duration)
                )
                | {"load": load}
                for load in (0.5, 0.8, 0.95)
            ]
        results["served_32_clients"] = {
            "offline_tokens_per_s": statistics.median(r["offline_tokens_per_s"] for r in rounds),
            "scheduler": served,
            "static": static,
            "rounds": rounds,
        }
        torch.manual_seed(1)
        random_model = Transformer(dataclasses.replace(trained.cfg, max_len=256)).eval()
        spec = Manifest.load(like).translation
        assert spec is not None
        with torch.no_grad():  # never EOS: every request runs to its max_length
            random_model.generator.bias[spec.target_tokenizer.eos_id] = -1e4
        long = export_version(random_model, like, root / "random" / MODEL / "1", True, 120)
        results["short_among_long"] = {}
        for mode in ("scheduler", "static"):
            print(f"(c, e) {mode}", flush=True)
            solo, mixed = asyncio.run(_solo_then_mixed(worker(long, static=mode == "static"), args.duration))
            results["short_among_long"][mode] = {
                "solo_short_ms": solo,
                **mixed,
                "short_p50_vs_solo": mixed["short_p50_ms"] / solo,
            }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stamp}-decoding.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    md = write_report(results, args.out / f"{stamp}-decoding.md")
    print(f"wrote {path} and {md}")
    return 0


def plot(r: dict[str, Any], path: Path) -> Path:
    """(a) step cost against past length, KV-cached and whole-prefix; (d) latency against load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, model in zip(axes[:2], ("dates-transformer", "opus-mt-shape"), strict=True):
        for key, by_batch in r["cost_ms_per_step"].items():
            if not key.startswith(model + "/"):
                continue
            for batch, costs in by_batch.items():
                lengths = sorted(costs, key=int)
                style = "-" if key.endswith("/kv") else "--"
                label = f"{key.split('/')[1]}, batch {batch}"
                xs, ys = [int(t) for t in lengths], [costs[t] for t in lengths]
                ax.plot(xs, ys, style, marker="o", label=label)
        ax.set(title=f"(a) {model}: ms per decoder step", xlabel="past tokens", yscale="log")
        ax.legend(fontsize=8)
    ax = axes[2]
    for mode in ("scheduler", "static"):
        points = r["open_loop"][mode]
        loads = [100 * m["load"] for m in points]
        ax.plot(loads, [m["p50_ms"] for m in points], marker="o", label=f"{mode} p50")
        ax.plot(loads, [m["p99_ms"] for m in points], "--", marker="o", label=f"{mode} p99")
    ax.set(title="(d) open-loop Poisson arrivals", xlabel="% of capacity", ylabel="ms", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(r: dict[str, Any], path: Path) -> Path:
    image = plot(r, path.with_suffix(".png"))
    lines = [
        f"# Translation decoding: KV cache and the per-model scheduler ({r['date']})",
        "",
        "`python -m benchmarks.decoding` (see its docstring). One ONNX Runtime thread, 2-core machine.",
        "",
        f"![step cost and open-loop latency]({image.name})",
        "",
        "## (a) Decoder step cost (ms) by past length",
        "",
        "| model / contract | batch | " + " | ".join(f"T={t}" for t in LENGTHS) + " |",
        "|---|---|" + "---|" * len(LENGTHS),
    ]
    for name, by_batch in r["cost_ms_per_step"].items():
        for b, costs in by_batch.items():
            costs = {int(t): ms for t, ms in costs.items()}  # str keys once read back from json
            cells = (f"{costs[t]:.2f}" if t in costs else "–" for t in LENGTHS)
            lines.append(f"| {name} | {b} | " + " | ".join(cells) + " |")
    s = r["served_32_clients"]
    lines += [
        "",
        "## (b) Served tokens/s at 32 clients (in-process worker) vs offline batched greedy",
        "",
        "Each round's served runs are bracketed by offline decodes of a batch of 32; the row is the "
        "round with the median ratio, the last column every round's ratio.",
        "",
        "| | tokens/s | p50 ms | p99 ms | ratio to offline | ratios by round |",
        "|---|---|---|---|---|---|",
        f"| offline batch of 32 | {s['offline_tokens_per_s']:.0f} | | | 1.00 | |",
    ]
    for mode in ("scheduler", "static"):
        m = s[mode]
        ratio = m.get("ratio_to_offline", m["tokens_per_s"] / s["offline_tokens_per_s"])
        by_round = ", ".join(f"{x:.2f}" for x in m.get("ratios", []))
        lines.append(
            f"| {mode} | {m['tokens_per_s']:.0f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
            f"{ratio:.2f} | {by_round} |"
        )
    o = r["open_loop"]
    lines += [
        "",
        f"## (d) Open-loop Poisson arrivals (capacity {o['capacity_requests_per_s']:.0f} req/s, closed loop)",
        "",
        "| batching | load | requests/s offered | p50 ms | p99 ms | shed (503) |",
        "|---|---|---|---|---|---|",
    ]
    for mode in ("scheduler", "static"):
        for m in o[mode]:
            row = f"{m['rate']:.0f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | {m['shed']}"
            lines.append(f"| {mode} | {m['load']:.0%} | {row} |")
    lines += [
        "",
        "## (c, e) Short requests (10 tokens) while long ones (100 tokens) decode",
        "",
        "| batching | solo short ms (e) | short p50 ms | short p99 ms | p50 / solo | long answers' tokens "
        "| step ms (rows): solo → mixed |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, m in r["short_among_long"].items():
        step = (
            f"{m['solo_step_ms']:.2f} ({m['solo_rows_per_step']:.0f}) → "
            f"{m['mixed_step_ms']:.2f} ({m['mixed_rows_per_step']:.1f})"
            if "mixed_step_ms" in m
            else "–"
        )
        lines.append(
            f"| {mode} | {m['solo_short_ms']:.1f} | {m['short_p50_ms']:.1f} | {m['short_p99_ms']:.1f} | "
            f"{m['short_p50_vs_solo']:.2f} | {m['long_tokens_mean']:.0f} | {step} |"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
