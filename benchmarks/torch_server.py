"""The PyTorch-eager reference: the demo Transformer checkpoint served by FastAPI + PyTorch.

What a user would run before exporting: the trained ``nn.Module`` in eval mode under
``torch.inference_mode``, greedy decoding with the same prefix-recompute decoder step the ONNX
graphs use, one request at a time, one intra-op thread (like a replica). Answers carry
``target_tokens`` like the service's, so the load generator counts tokens the same way.
``python -m benchmarks.torch_server --checkpoint build/checkpoints/dates-transformer --port P``.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI

from export import checkpoint
from export.data.tokenizer import BOS_ID, EOS_ID
from service.api.schemas import TranslateRequest

MAX_TARGET_TOKENS = 16


def build(directory: Path) -> FastAPI:
    torch.set_num_threads(1)
    ckpt = checkpoint.load(directory)
    model, source, target = ckpt.model, ckpt.source_tokenizer, ckpt.target_tokenizer
    assert source is not None and target is not None, f"{directory} holds no translation model"
    lock = threading.Lock()
    app = FastAPI()

    @torch.inference_mode()
    def greedy(text: str) -> list[int]:
        src = torch.tensor([source.encode(text).ids])  # (1, S)
        mask = torch.ones_like(src, dtype=torch.bool)
        memory = model.encode(src, mask)  # type: ignore[operator]
        tokens = torch.tensor([[BOS_ID]])  # (1, T)
        for _ in range(MAX_TARGET_TOKENS):
            logits, _ = model.step(tokens, memory, mask)  # type: ignore[operator]
            nxt = logits.argmax(-1, keepdim=True)  # (1, 1)
            tokens = torch.cat([tokens, nxt], dim=1)
            if int(nxt) == EOS_ID:
                break
        return tokens[0, 1:].tolist()

    def run(body: TranslateRequest) -> dict[str, Any]:
        texts = [body.text] if isinstance(body.text, str) else body.text
        out = []
        with lock:
            for text in texts:
                ids = greedy(text)
                out.append(
                    {"text": target.decode(ids), "target_tokens": [target.id_to_token(i) for i in ids]}
                )
        return {"translations": out}

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/models/{name}/translate")
    async def translate(name: str, body: TranslateRequest) -> dict[str, Any]:
        return await asyncio.to_thread(run, body)

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = build(args.checkpoint)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
