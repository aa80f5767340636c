"""The CTranslate2 side of ``benchmarks/ctranslate2_peer.py``, run by the *other* virtual environment.

CTranslate2 (Klein et al. 2020) and its converter's transformers/torch pins live in
``build/venvs/ctranslate2``, not in the project's venv, so this file imports nothing of the
project and is run as a script with that environment's python::

    build/venvs/ctranslate2/bin/python benchmarks/ct2_runner.py offline --model DIR --spm DIR ...
    build/venvs/ctranslate2/bin/python benchmarks/ct2_runner.py serve --model DIR --spm DIR --port P

* ``offline``: ``translate_batch`` of the given texts in one batch, greedy, ``max_decoding_length``
  N, timed ``--repeat`` times after one warm-up; prints one JSON object (tokens, seconds per call,
  the source pieces and the first hypotheses, for the caller's cross-checks).
* ``serve``: a plain FastAPI app, what one would write to serve CTranslate2: ``POST /translate``
  ``{"text": ..., "max_length": N}``; concurrent requests wait in a queue, and a batcher takes up
  to ``--max-batch`` of them — those already queued, then whatever arrives within ``--wait-ms`` —
  into one ``translate_batch`` in a worker thread (CTranslate2 releases the GIL). The answer has
  the service's shape (``translations[].target_tokens``, ``metrics.batch_size``), so the same
  load generator and token count apply. ``GET /readyz`` is 200 once the model has translated once.

Both use one inter-op and one intra-op thread unless told otherwise, and tokenize as
MarianTokenizer does: the source SentencePiece pieces, then ``</s>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ctranslate2
import sentencepiece as spm
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, Field

EOS = "</s>"


@dataclass
class Engine:
    translator: Any  # ctranslate2.Translator
    source: spm.SentencePieceProcessor
    target: spm.SentencePieceProcessor

    @classmethod
    def load(cls, model: Path, spm_dir: Path, compute_type: str, threads: int) -> Engine:
        translator = ctranslate2.Translator(
            str(model), device="cpu", compute_type=compute_type, inter_threads=1, intra_threads=threads
        )
        source = spm.SentencePieceProcessor(model_file=str(spm_dir / "source.spm"))
        target = spm.SentencePieceProcessor(model_file=str(spm_dir / "target.spm"))
        return cls(translator, source, target)

    def tokenize(self, text: str) -> list[str]:
        return [*self.source.encode(text, out_type=str), EOS]

    def translate(self, sources: list[list[str]], max_length: int) -> list[list[str]]:
        """Greedy search; → each source's target pieces (without ``</s>``)."""
        results = self.translator.translate_batch(
            sources, beam_size=1, max_decoding_length=max_length, return_scores=True
        )
        return [list(r.hypotheses[0]) for r in results]


def offline(args: argparse.Namespace) -> dict[str, Any]:
    engine = Engine.load(args.model, args.spm, args.compute_type, args.threads)
    texts: list[str] = json.loads(args.texts.read_text())
    sources = [engine.tokenize(t) for t in texts]
    hyps = engine.translate(sources, args.max_length)  # warm-up
    seconds = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        engine.translate(sources, args.max_length)
        seconds.append(time.perf_counter() - start)
    tokens = sum(len(h) for h in hyps)
    return {
        "compute_type": args.compute_type,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / statistics.median(seconds),
        "source_tokens": sources,
        "target_tokens": hyps,
    }


@dataclass
class Pending:
    source: list[str]
    max_length: int
    done: asyncio.Future[list[str]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    batch_size: int = 0


class Batcher:
    """Requests → batches of at most ``max_batch``: the first waiting request, everything queued
    behind it, and what arrives within ``wait_s`` of it; one ``translate_batch`` at a time."""

    def __init__(self, engine: Engine, max_batch: int, wait_s: float) -> None:
        self.engine, self.max_batch, self.wait_s = engine, max_batch, wait_s
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ct2")

    async def submit(self, text: str, max_length: int) -> tuple[list[str], int]:
        pending = Pending(self.engine.tokenize(text), max_length)
        await self.queue.put(pending)
        return await pending.done, pending.batch_size

    async def _collect(self) -> list[Pending]:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            longest = max(p.max_length for p in batch)
            try:
                hyps = await loop.run_in_executor(
                    self.pool, self.engine.translate, [p.source for p in batch], longest
                )
            except Exception as exc:  # a batch failure reaches every waiting caller
                for p in batch:
                    if not p.done.done():
                        p.done.set_exception(exc)
                continue
            for p, hyp in zip(batch, hyps, strict=True):
                p.batch_size = len(batch)
                if not p.done.done():  # the client may have gone
                    p.done.set_result(hyp[: p.max_length])


class TranslateRequest(BaseModel):
    text: str = Field(min_length=1, max_length=4096)
    max_length: int = Field(256, ge=1, le=1024)


def create_app(batcher: Batcher) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = FastAPI(lifespan=lifespan)

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/translate")
    async def translate(request: TranslateRequest) -> dict[str, Any]:
        start = time.perf_counter()
        pieces, batch_size = await batcher.submit(request.text, request.max_length)
        finished = len(pieces) < request.max_length
        return {
            "translations": [
                {
                    "text": batcher.engine.target.decode(pieces),
                    "target_tokens": [*pieces, EOS] if finished else pieces,
                    "finished": finished,
                }
            ],
            "metrics": {"batch_size": batch_size, "total_ms": (time.perf_counter() - start) * 1000},
        }

    return app


def serve(args: argparse.Namespace) -> None:
    engine = Engine.load(args.model, args.spm, args.compute_type, args.threads)
    engine.translate([engine.tokenize("Warm up.")], 4)  # ready means it has translated
    app = create_app(Batcher(engine, args.max_batch, args.wait_ms / 1000))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("offline", "serve"):
        p = sub.add_parser(name)
        p.add_argument("--model", type=Path, required=True, help="a converted CTranslate2 model directory")
        p.add_argument("--spm", type=Path, required=True, help="the checkpoint with source.spm, target.spm")
        p.add_argument("--compute-type", default="float32")
        p.add_argument("--threads", type=int, default=1, help="intra_threads (inter_threads is 1)")
    o = sub.choices["offline"]
    o.add_argument("--texts", type=Path, required=True, help="a JSON list of source texts")
    o.add_argument("--max-length", type=int, required=True)
    o.add_argument("--repeat", type=int, default=5)
    s = sub.choices["serve"]
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--max-batch", type=int, default=32)
    s.add_argument("--wait-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.command == "offline":
        print(json.dumps(offline(args)))
    else:
        serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
