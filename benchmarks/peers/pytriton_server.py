"""PyTriton peer for ``fashion-vit``: Triton Inference Server with a Python ``@batch`` function.

Run by the ``pytriton`` venv's python (``versions.py``)::

    python pytriton_server.py --model-dir model_repository/fashion-vit/1 \\
        --http-port P --grpc-port G --metrics-port M [--workspace DIR]

Binds model ``fashion-vit`` (one instance, dynamic batcher: max batch 32, 2 ms queue delay) on
127.0.0.1 only. Input ``image``: BYTES, shape [1] per request, the PNG. Over KServe v2 JSON a BYTES
element is a string and reaches the function as the bytes of that string, so JSON clients send
the base64 text of the PNG; with the binary tensor extension the element is the raw PNG (4-byte
little-endian length, then the bytes, in the request body). The function takes an element that
starts with the PNG signature as it is and base64-decodes anything else. Outputs, the top 5:
``labels`` BYTES [5], ``indices`` INT64 [5], ``probabilities`` FP32 [5]. A bad image fails the
whole batch it was merged into (``@batch`` has no per-request errors).

SIGTERM or SIGINT stops Triton and the Python backend stub, then exits. The stub is started with
this interpreter's ``LIBDIR`` first on ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sysconfig
from pathlib import Path

import numpy as np
from peer_vision import Model, png_or_base64  # this script's own directory is on sys.path
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

MODEL = "fashion-vit"
MAX_BATCH = 32
QUEUE_DELAY_US = 2000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--workspace", type=Path, help="PyTriton's files (default: a temp dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as SIGINT: PyTriton's orderly stop
    # Triton's Python backend stub embeds libpython3.11 and runs this venv's stdlib: it must load
    # this interpreter's libpython, not another 3.11 patch release that the loader finds first
    libdir = str(sysconfig.get_config_var("LIBDIR"))
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))

    model = Model(args.model_dir)
    labels = np.array([label.encode() for label in model.labels], dtype=np.object_)

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        pixels = np.stack([model.preprocess(png_or_base64(bytes(item))) for item in image[:, 0]])
        top, probs = model.top_k(pixels)
        return {"labels": labels[top], "indices": top, "probabilities": probs}

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
        allow_cpu_metrics=False,
        log_verbose=0,
        exit_timeout_secs=5,
    )
    with Triton(config=config, workspace=args.workspace) as triton:
        triton.bind(
            model_name=MODEL,
            infer_func=infer,
            inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
            outputs=[
                Tensor(name="labels", dtype=np.bytes_, shape=(5,)),
                Tensor(name="indices", dtype=np.int64, shape=(5,)),
                Tensor(name="probabilities", dtype=np.float32, shape=(5,)),
            ],
            config=ModelConfig(
                max_batch_size=MAX_BATCH,
                batcher=DynamicBatcher(max_queue_delay_microseconds=QUEUE_DELAY_US),
            ),
        )
        triton.serve()


if __name__ == "__main__":
    main()
