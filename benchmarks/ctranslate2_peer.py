"""``make bench-ctranslate2``: CTranslate2 as a peer reference for translation (issue #17, item 5f).

CTranslate2 (Klein et al. 2020, OpenNMT) is the usual fast CPU engine for Marian/OPUS-MT models, so
it is the yardstick for our decoder. Both engines run the *same* Marian checkpoint of
opus-mt-en-de's shape (``benchmarks/ct2_checkpoint.py``: d 512, 6 + 6 layers, 8 heads, FFN 2048,
random weights, ``</s>`` biased away so every translation is exactly ``--max-length`` tokens):
ours through ``export import-hf`` (the ``transformer-kv-layers`` graphs on ONNX Runtime), CTranslate2's
through ``ct2-transformers-converter``, in a virtual environment of its own with pinned versions
(:data:`CT2_PINS`; ``benchmarks/ct2_runner.py`` is its side). Both compute on one thread.

Measured, in ``--rounds`` interleaved rounds (medians reported):

* **offline**: target tokens/s of one batch of the 32 source texts, greedy — CTranslate2's
  ``translate_batch(max_decoding_length=N)`` (inter_threads 1, intra_threads 1; compute type
  float32, and int8 as context) against our ``Translator.translate(max_length=N)`` with one ONNX
  Runtime thread; for ours also the share of the time spent inside the two graphs' ``run``.
* **served**: closed-loop load (``benchmarks/loadgen.py``) at each ``--concurrency`` for
  ``--duration`` s: CTranslate2 behind a plain FastAPI app that batches concurrent requests into
  one ``translate_batch`` (``ct2_runner.py serve``) against the service itself
  (``python -m service``, in-replica frontend, one replica, one ORT thread); requests/s, target
  tokens/s, p50/p99 and the server's CPU per request (its whole process tree, as ``make bench``).
* **where our time goes**, for the report's causes: our scheduler in this process (no HTTP, no
  Ray) at the top concurrency, ONNX Runtime's profile of one decoder step by operator type, and a
  py-spy pass over our replica under load (outside the rounds).

The goals (issue #17): served tokens/s and p99 at 32 clients better than CTranslate2 served;
offline tokens/s ≥ 0.7 × CTranslate2's. Writes ``benchmarks/results/<date>-ctranslate2.{json,md}``.
Everything built (checkpoint, repository, converted model, venv, server logs) is cached under
``build/``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import ct2_checkpoint, ct2_offline, ct2_report, outputs, profiling, report, run
from benchmarks.loadgen import Request, closed_loop, percentile
from benchmarks.peers.versions import install
from service.inference.manifest import Manifest, file_sha256

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "benchmarks" / "ct2_runner.py"
MODEL = "opus-mt-shape"
#: the CTranslate2 environment: the engine, its converter's needs (torch from the local CPU wheel,
#: never a CUDA build), and the same web stack as the service's (uvicorn with uvloop + httptools)
CT2_PINS = (
    "ctranslate2==4.8.5",
    "torch==2.13.0",
    "transformers==5.24.0",
    "sentencepiece==0.2.3",
    "numpy==2.4.6",
    "fastapi==0.165.0",
    "uvicorn==0.55.0",
    "uvloop==0.23.0",
    "httptools==0.9.0",
)
OURS = "attention-serve"
#: what the JSON keeps of every round's served point, beside the medians
ROUND_FIGURES = ("tokens_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_request", "load_1min")


# -- building both engines' models -----------------------------------------------------------------


def ct2_venv(directory: Path) -> Path:
    """The CTranslate2 venv's python, created or brought to :data:`CT2_PINS` when needed."""
    return install(directory, CT2_PINS)


def import_ours(checkpoint: Path, repository: Path) -> Path:
    """``export import-hf`` of the checkpoint (again only when its weights or the decoder contract
    that export writes changed)."""
    version = repository / MODEL / "1"
    weights = file_sha256(checkpoint / "model.safetensors")
    if (version / "manifest.json").is_file():
        manifest = Manifest.load(version)
        contract = manifest.translation.decoder if manifest.translation else None
        if manifest.checkpoint_sha256 == weights and contract == "transformer-kv-layers":
            return version
    print("export import-hf (ONNX export and the parity checks: a minute or two)", flush=True)
    cmd = [sys.executable, "-m", "export", "import-hf", str(checkpoint), "--name", MODEL,
           "--repository", str(repository), "--force"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT)
    return version


def convert(python: Path, checkpoint: Path, out: Path) -> Path:
    """``ct2-transformers-converter`` to a float32 model (int8 is chosen at load time)."""
    stamp, weights = out / ".checkpoint_sha256", file_sha256(checkpoint / "model.safetensors")
    if stamp.is_file() and stamp.read_text() == weights:
        return out
    print("ct2-transformers-converter", flush=True)
    converter = python.parent / "ct2-transformers-converter"
    cmd = [str(converter), "--model", str(checkpoint), "--output_dir", str(out), "--force"]
    subprocess.run(cmd, check=True)
    stamp.write_text(weights)
    return out


# -- served ----------------------------------------------------------------------------------------


def servers(
    python: Path, ct2_model: Path, checkpoint: Path, repository: Path, args: argparse.Namespace
) -> dict[str, tuple[run.Configuration, str]]:
    """name → (how to start it, its translate path). Ours: ``make bench``'s in-replica service."""
    ours = run.configurations(repository, ROOT / "build" / "checkpoints")["in-replica"]
    ours = dataclasses.replace(ours, env={**ours.env, "ATTN_INTRA_OP_THREADS": "1"})
    out = {}
    for compute in args.ct2_compute:
        cmd = [str(python), str(RUNNER), "serve", "--model", str(ct2_model), "--spm", str(checkpoint),
               "--compute-type", compute, "--max-batch", "32", "--wait-ms", str(args.wait_ms)]  # fmt: skip
        out[f"ctranslate2-{compute}"] = (run.Configuration(cmd, {"CT2_VERBOSE": "1"}), "/translate")
        if compute == args.ct2_compute[0]:  # ours right after the main comparison
            out[OURS] = (ours, f"/v1/models/{MODEL}/translate")
    return out


def measure(server: run.Server, requests: list[Request], clients: int, seconds: float) -> dict[str, Any]:
    """``make bench``'s figures for one point (``run.measure``), but with every answer kept: the
    target tokens are counted from all of them, and the mean batch comes from all of them."""
    before = server.cpu_by_process()
    result = asyncio.run(closed_loop("127.0.0.1", server.port, requests, clients, seconds, keep_every=1))
    after = server.cpu_by_process()
    by_process = {k: after[k] - before.get(k, 0.0) for k in after}
    answers = [json.loads(body) for body in result.bodies]
    tokens = sum(len(t["target_tokens"]) for a in answers for t in a["translations"])
    ok = max(1, result.ok)
    return {
        "requests_per_s": result.ok / result.elapsed_s,
        "tokens_per_s": tokens / result.elapsed_s,
        "tokens_per_request": tokens / ok,
        "p50_ms": percentile(result.latencies_s, 50) * 1000,
        "p90_ms": percentile(result.latencies_s, 90) * 1000,
        "p99_ms": percentile(result.latencies_s, 99) * 1000,
        "server_cpu_ms_per_request": sum(by_process.values()) / ok * 1000,
        "mean_batch_size": statistics.fmean(a["metrics"]["batch_size"] for a in answers) if answers else None,
        "errors": result.errors,
        "requests": result.ok,
        "cpu_ms_per_request_by_process": {
            k: v / ok * 1000 for k, v in sorted(by_process.items(), key=lambda kv: -kv[1]) if v / ok > 5e-5
        },
        "load_1min": os.getloadavg()[0],
        **answer_timings(answers),
    }


def answer_timings(answers: list[dict[str, Any]]) -> dict[str, float]:
    """Means of the timings our answers carry (the scheduler's queue wait, time to first token,
    time per output token — one decoder step of the batch); CTranslate2's app has none."""
    out = {}
    for key in ("queue_wait_ms", "time_to_first_token_ms", "time_per_output_token_ms"):
        values = [a["metrics"][key] for a in answers if a["metrics"].get(key) is not None]
        if values:
            out[f"mean_{key}"] = statistics.fmean(values)
    return out


def serve_round(
    configs: dict[str, tuple[run.Configuration, str]], texts: list[str], args: argparse.Namespace,
    logs: Path, raw: dict[str, Any],
) -> None:  # fmt: skip
    """Each server in turn: started, measured at every concurrency, stopped."""
    for name, (config, path) in configs.items():
        requests = [Request.json(path, {"text": t, "max_length": args.max_length}) for t in texts]
        server = run.start(name, config, logs)
        into = raw.setdefault(name, {"startup_s": [], "rss_bytes": [], "by_clients": {}})
        into["startup_s"].append(server.startup_s)
        try:
            for clients in args.concurrency:
                print(f"  served {name} c={clients}", flush=True)
                row = measure(server, requests, clients, args.duration)
                into["by_clients"].setdefault(str(clients), []).append(row)
            into["rss_bytes"].append(server.rss_bytes())
        finally:
            server.stop()


def profile_ours(
    config: run.Configuration, texts: list[str], args: argparse.Namespace, logs: Path
) -> dict[str, Any]:
    """py-spy on our replica during one more point at the top concurrency — kept out of the
    measured rounds, as the sampler takes CPU of its own. Empty if py-spy is missing."""
    clients = max(args.concurrency)
    print(f"profile {OURS} c={clients} (py-spy)", flush=True)
    requests = [Request.json(f"/v1/models/{MODEL}/translate", {"text": t, "max_length": args.max_length})
                for t in texts]  # fmt: skip
    raw = logs / "profile.txt"
    raw.unlink(missing_ok=True)
    server = run.start(OURS, config, logs)
    try:
        replica = server.replica_pid()
        spy = profiling.start(replica, args.duration - 1, raw) if replica else None
        if spy is None:
            return {}
        measure(server, requests, clients, args.duration)
        spy.wait(timeout=60)
    finally:
        server.stop()
    return {"clients": clients, **profiling.summarise(raw)} if raw.exists() else {}


# -- the run ---------------------------------------------------------------------------------------


def versions(python: Path) -> dict[str, dict[str, str]]:
    """What each venv really has (the pins say what was asked for)."""
    packages = ("ctranslate2", "transformers", "torch", "sentencepiece", "numpy", "fastapi", "uvicorn")
    code = f"import json, importlib.metadata as m; print(json.dumps({{p: m.version(p) for p in {packages}}}))"
    theirs = json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout)
    mine = ("onnxruntime", "numpy", "ray", "fastapi", "uvicorn", "tokenizers")
    return {"ctranslate2_venv": theirs, "attention_serve_venv": {p: metadata.version(p) for p in mine}}


def git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_in_service_or_export": git("status", "--porcelain", "service", "export").splitlines(),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ctranslate2_peer", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--build", type=Path, default=ROOT / "build" / "ct2_peer")
    parser.add_argument("--venv", type=Path, default=ROOT / "build" / "venvs" / "ctranslate2")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per served measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--max-length", type=int, default=48, help="N: target tokens of every translation")
    parser.add_argument("--texts", type=int, default=32, help="source texts (the offline batch)")
    parser.add_argument("--repeat", type=int, default=5, help="offline: timed calls per round")
    parser.add_argument("--wait-ms", type=float, default=5.0, help="the CTranslate2 app's batch window")
    parser.add_argument("--ct2-compute", nargs="+", default=["float32", "int8"], help="first: the main one")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy pass over our replica")
    parser.add_argument("--note", default="", help="a line for the report, e.g. that the machine was shared")
    parser.add_argument(
        "--report-only",
        type=Path,
        metavar="JSON",
        help="measure nothing: rewrite the Markdown of this result",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.report_only:
        results = json.loads(args.report_only.read_text())
        print(f"wrote {ct2_report.write(results, args.report_only.with_suffix('.md'), OURS)}")
        return 0
    outputs.stop_on_sigterm()
    build: Path = args.build
    build.mkdir(parents=True, exist_ok=True)
    print("checkpoint", flush=True)
    checkpoint = ct2_checkpoint.build(build / "checkpoint")
    version = import_ours(checkpoint, build / "repository")
    python = ct2_venv(args.venv)
    ct2_model = convert(python, checkpoint, build / "ct2-model")
    texts = ct2_checkpoint.english_texts(args.texts)
    texts_file = build / "texts.json"
    texts_file.write_text(json.dumps(texts))
    configs = servers(python, ct2_model, checkpoint, build / "repository", args)
    logs = build / "logs"
    logs.mkdir(exist_ok=True)
    offline: dict[str, list[dict[str, Any]]] = {}
    served: dict[str, Any] = {}
    in_process: list[dict[str, Any]] = []
    load = [os.getloadavg()]
    for r in range(args.rounds):  # offline and served, every engine in every round
        print(f"round {r + 1}/{args.rounds}", flush=True)
        print(f"  offline {OURS}", flush=True)
        mine = ct2_offline.offline_ours(version, texts, args.max_length, args.repeat)
        offline.setdefault(OURS, []).append(mine)
        for compute in args.ct2_compute:
            print(f"  offline ctranslate2-{compute}", flush=True)
            row = ct2_offline.offline_ct2(
                python, ct2_model, checkpoint, texts_file, args.max_length, args.repeat, compute
            )
            offline.setdefault(f"ctranslate2-{compute}", []).append(row)
        top = max(args.concurrency)
        print(f"  {OURS} scheduler in process c={top}", flush=True)
        worker = ct2_offline.in_process(version, texts, args.max_length, top, args.duration)
        in_process.append(worker)
        serve_round(configs, texts, args, logs, served)
        load.append(os.getloadavg())
    print("ONNX Runtime profile of one decoder step", flush=True)
    step = ct2_offline.step_profile(version, texts, args.max_length // 2)
    spy = {} if args.no_profile else profile_ours(configs[OURS][0], texts, args, logs)
    results = summarise(args, checkpoint, python, texts, offline, served, load)
    spec = Manifest.load(version).translation
    results["decoder_contract"] = spec.decoder if spec else None
    results |= {"in_process": report.median_row(in_process), "step_profile": step, "replica_profile": spy}
    results["goals"] = ct2_report.goals(results, OURS, f"ctranslate2-{args.ct2_compute[0]}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{outputs.free_stem(args.out, results['date'] + '-ctranslate2')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    md = ct2_report.write(results, path.with_suffix(".md"), OURS)
    print(f"wrote {path} and {md}")
    return 0


def summarise(
    args: argparse.Namespace, checkpoint: Path, python: Path, texts: list[str],
    offline: dict[str, list[dict[str, Any]]], served: dict[str, Any], load: list[tuple[float, float, float]],
) -> dict[str, Any]:  # fmt: skip
    """The rounds' medians with everything the report states about the setup."""
    first, n = {name: rows[0] for name, rows in offline.items()}, args.max_length
    ours = first[OURS]
    config = json.loads((checkpoint / "config.json").read_text())
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "load_avg_by_round": load},
        "note": args.note,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "git": git_state(),
        "versions": versions(python),
        "pins": list(CT2_PINS),
        "checkpoint": {**ct2_checkpoint.recipe(), "sha256": file_sha256(checkpoint / "model.safetensors"),
                       "vocab_size": config["vocab_size"]},
        "texts": texts,
        "source_tokens": [len(s) for s in ours["source_tokens"]],
        "source_tokens_identical": all(r["source_tokens"] == ours["source_tokens"] for r in first.values()),
        "ct2_backend": first[f"ctranslate2-{args.ct2_compute[0]}"]["backend"],
        "agreement": {
            name: ct2_offline.agreement([t[:n] for t in ours["target_tokens"]], row["target_tokens"])
            for name, row in first.items()
            if name != OURS
        },
        "offline": {name: ct2_offline.median_of_rounds(rows) for name, rows in offline.items()},
        "served": {name: served_summary(s) for name, s in served.items()},
    }  # fmt: skip


def served_summary(raw: dict[str, Any]) -> dict[str, Any]:
    """One server's rounds: medians, and each round's headline figures."""
    return {
        "startup_s": statistics.median(raw["startup_s"]),
        "rss_bytes": statistics.median(raw["rss_bytes"]),
        "by_clients": {c: report.median_row(rows) for c, rows in raw["by_clients"].items()},
        "by_round": {
            c: [{k: row[k] for k in ROUND_FIGURES} for row in rows] for c, rows in raw["by_clients"].items()
        },
    }


if __name__ == "__main__":
    sys.exit(main())
