"""The reference point: plain FastAPI + uvicorn + ONNX Runtime, no Ray, no batching.

Same runners, same request schema as the service, one request at a time per model — what a
user would write by hand. ``python -m benchmarks.baseline_server --repository R --port P``.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from service.api.rest_codec import classify_json_job, result_json, translate_job
from service.api.schemas import ClassifyRequest, TranslateRequest
from service.inference.repository import discover
from service.inference.runners import make_runner
from service.settings import Limits


def build(repository: Path) -> FastAPI:
    found = discover(repository)
    runners = {n: make_runner(e, ["CPUExecutionProvider"], 1, Limits()) for n, e in found.models.items()}
    locks = {n: threading.Lock() for n in runners}  # one ORT call at a time per model, like a replica
    app = FastAPI()

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    def run(name: str, job: Any, options: TranslateRequest | ClassifyRequest) -> dict[str, Any]:
        runner = runners[name]
        work = runner.preprocess(job)
        with locks[name]:
            [out] = runner.infer([work])
        return result_json(runner.postprocess(work, out), options)

    @app.post("/v1/models/{name}/translate")
    async def translate(name: str, body: TranslateRequest) -> dict[str, Any]:
        return await asyncio.to_thread(run, name, translate_job(body), body)

    @app.post("/v1/models/{name}/classify")
    async def classify(name: str, body: ClassifyRequest) -> dict[str, Any]:
        return await asyncio.to_thread(run, name, classify_json_job(body), body)

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        build(args.repository), host="127.0.0.1", port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
