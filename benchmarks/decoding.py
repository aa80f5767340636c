"""``make bench-decoding``: the translation decoder — KV cache and the per-model scheduler (issue #17).

Writes ``benchmarks/results/<date>-decoding.{json,md,png}``:

a. **Decoder cost per token vs output length**, KV-cached step (per-layer caches, what export
   writes; and the packed cache of older repositories) against the whole-prefix step of the same
   weights, at batch 1 and 16: the dates-transformer demo checkpoint, bible-fr-en-transformer
   when ``make models-real`` has built it, and the same architecture at opus-mt-en-de's shape
   (6 + 6 layers, d 512, 8 heads, FFN 2048; weights random — the cost does not depend on them).
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

This module exports the graph variants and orchestrates; the load drivers are in
``benchmarks/decoding_load.py``, the report and plot in ``benchmarks/decoding_report.py``.
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

from benchmarks import outputs
from benchmarks.decoding_load import (
    TEXTS,
    closed_loop,
    median_round,
    open_loop,
    solo_then_mixed,
    step_feeds,
    worker,
)
from benchmarks.decoding_report import write_report
from export import checkpoint
from export.graphs import transformer_plans, transformer_prefix_plans
from export.models.transformer import Transformer, TransformerConfig
from export.onnx_export import export_graph
from service.inference.jobs import TranslateJob
from service.inference.manifest import Manifest
from service.inference.translation import Translator

ROOT = Path(__file__).resolve().parents[1]
OPUS_SHAPE = {"d_model": 512, "heads": 8, "ff_dim": 2048, "enc_layers": 6, "dec_layers": 6, "max_len": 256}
LENGTHS = (1, 8, 16, 32, 64, 128)
ROUNDS = 3  # (b): served runs, each bracketed by offline decodes
MODEL = "dates-transformer"  # every variant keeps the name (and tokenizers) of the demo model


#: (a)'s variants: contract → its graph plans; "kv" is what export writes
CONTRACTS = {
    "kv": ("transformer-kv-layers", transformer_plans),
    "kv-packed": ("transformer-kv", lambda m: transformer_plans(m, packed=True)),
    "prefix": ("transformer", transformer_prefix_plans),
}


def export_version(
    model: Transformer, like: Path, directory: Path, contract: str = "kv", max_target: int | None = None
) -> Path:
    """``model`` as a version with ``like``'s tokenizers, in one of :data:`CONTRACTS`."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.load(like)
    assert manifest.translation is not None
    for f in (manifest.translation.source_tokenizer.file, manifest.translation.target_tokenizer.file):
        (directory / f).write_bytes((like / f).read_bytes())
    decoder, plans = CONTRACTS[contract]
    graphs = {plan.key: export_graph(plan, directory).spec for plan in plans(model)}
    translation = manifest.translation.model_copy(
        update={"decoder": decoder, "max_target_tokens": max_target or manifest.translation.max_target_tokens}
    )
    manifest.model_copy(update={"graphs": graphs, "translation": translation}).write(directory)
    return directory


def write_long_model(trained: Transformer, like: Path, root: Path) -> Path:
    """(c)'s and (e)'s model: ``trained``'s architecture with random weights that never emit EOS,
    so every request runs to its ``max_length`` (up to 120 tokens) → its version directory under
    ``root`` (``root/dates-transformer/1``). The GPU check reads it from there
    (``--write-long-model``)."""
    torch.manual_seed(1)
    random_model = Transformer(dataclasses.replace(trained.cfg, max_len=256)).eval()
    spec = Manifest.load(like).translation
    assert spec is not None
    with torch.no_grad():  # never EOS: every request runs to its max_length
        random_model.generator.bias[spec.target_tokenizer.eos_id] = -1e4
    return export_version(random_model, like, root / MODEL / "1", "kv", 120)


def _best_ms(fn: Any, repeat: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def step_cost(directory: Path, batch: int) -> dict[int, float]:
    """ms per decoder step at each past length (one ORT thread): a KV step gets a cache of that
    length, the whole-prefix step a prefix of that length."""
    manifest = Manifest.load(directory)
    translator = Translator(directory, manifest, ["CPUExecutionProvider"], 1)
    rows = translator.encode([[5] * 11 + [translator.spec.source_tokenizer.eos_id]] * batch)
    out = {}
    limit = translator.spec.max_target_tokens + 1  # positions the graph has
    for length in (t for t in LENGTHS if t <= limit):
        if translator.past_names:
            feeds = step_feeds(translator, rows, length - 1)
        else:
            feeds = {"tokens": np.full((batch, length), 5), "src_mask": rows.src_mask, **rows.tensors}
        out[length] = _best_ms(lambda feeds=feeds: translator.decoder.run(feeds))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decoding", description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "build" / "checkpoints")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--write-long-model",
        type=Path,
        metavar="DIR",
        help="only write (c)'s long-decoding model under DIR (for the GPU check) and stop",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    outputs.stop_on_sigterm()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    like = args.repository / MODEL / "1"
    if not (args.checkpoints / MODEL).is_dir():  # `make models` skips what the repository holds
        print(f"error: no checkpoint at {args.checkpoints / MODEL} (the PyTorch side of (a)); train it: "
              f"`.venv/bin/python -m export train {MODEL} --checkpoints {args.checkpoints}`",
              file=sys.stderr)  # fmt: skip
        return 2
    trained = checkpoint.load(args.checkpoints / MODEL).model
    assert isinstance(trained, Transformer)
    if args.write_long_model:
        print(f"wrote {write_long_model(trained, like, args.write_long_model)}")
        return 0
    results: dict[str, Any] = {"date": stamp, "cost_ms_per_step": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        opus = Transformer(
            TransformerConfig(src_vocab=trained.cfg.src_vocab, tgt_vocab=trained.cfg.tgt_vocab, **OPUS_SHAPE)
        ).eval()
        models = [("dates-transformer", trained), ("opus-mt-shape", opus)]
        bible = args.checkpoints / "bible-fr-en-transformer"
        if bible.is_dir():  # make models-real
            real = checkpoint.load(bible).model
            assert isinstance(real, Transformer)
            models.insert(1, ("bible-fr-en-transformer", real.eval()))
        for name, model in models:
            for contract in CONTRACTS:
                print(f"(a) {name} {contract}", flush=True)
                d = export_version(
                    model, like, root / f"{name}-{contract}" / MODEL / "1", contract, model.cfg.max_len - 1
                )
                results["cost_ms_per_step"][f"{name}/{contract}"] = {b: step_cost(d, b) for b in (1, 16)}
        kv = export_version(trained, like, root / "kv" / MODEL / "1")
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
        served, static = median_round(rounds, "scheduler"), median_round(rounds, "static")
        capacity = max(served["requests"], static["requests"]) / args.duration  # closed-loop req/s
        results["open_loop"] = {"capacity_requests_per_s": capacity}
        for mode in ("scheduler", "static"):
            results["open_loop"][mode] = [
                asyncio.run(
                    open_loop(worker(kv, static=mode == "static"), jobs, load * capacity, args.duration)
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
        long = write_long_model(trained, like, root / "random")
        results["short_among_long"] = {}
        for mode in ("scheduler", "static"):
            print(f"(c, e) {mode}", flush=True)
            solo, mixed = asyncio.run(solo_then_mixed(worker(long, static=mode == "static"), args.duration))
            results["short_among_long"][mode] = {
                "solo_short_ms": solo,
                **mixed,
                "short_p50_vs_solo": mixed["short_p50_ms"] / solo,
            }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{outputs.free_stem(args.out, f'{stamp}-decoding')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    md = write_report(results, path.with_suffix(".md"))
    print(f"wrote {path} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
