"""An answer's attention is sized as its protocol writes it before any work, against
``limits.max_response_bytes``: JSON takes ~9 bytes a value, the KServe v2 binary extension and gRPC's
raw contents 4 (float32). The ``guarded`` service answers at most 128 KiB; the tiny ViT's
every-layer attention (``ATTENTIONS``) is ~88 kB as float32 and ~197 kB as JSON."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import requests

from service.api.protos import grpc_service_pb2 as pb
from service.api.protos import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import API_TOKEN, Service
from tests.service.test_app import canvas_png

pytestmark = pytest.mark.slow
BEARER = {"Authorization": f"Bearer {API_TOKEN}"}
URL = "/v2/models/fashion-vit/infer"


def v2_http(service: Service, binary_attention: bool) -> requests.Response:
    png = canvas_png()[0]
    header = {
        "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 4 + len(png)}}],
        "outputs": [{"name": "LABELS"}, {"name": "ATTENTIONS", "parameters": {"binary_data": binary_attention}}],
    }  # fmt: skip
    head = json.dumps(header).encode()
    body = head + len(png).to_bytes(4, "little") + png
    headers = {
        **BEARER,
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }
    return requests.post(service.url + URL, data=body, headers=headers, timeout=60)


def test_every_layer_s_attention_fits_as_float32_where_json_would_not(guarded: Service) -> None:
    """The guard charged JSON's 9 bytes a value to every answer: a binary or gRPC answer that fit
    the limit was refused (an imported ViT-B's every-layer attention: ~50 MB as JSON, 22 MB raw)."""
    refused = v2_http(guarded, binary_attention=False)
    assert refused.status_code == 422 and "ATTENTIONS" in refused.json()["error"], refused.text
    binary = v2_http(guarded, binary_attention=True)
    assert binary.status_code == 200, binary.text[:500]
    head = json.loads(binary.content[: int(binary.headers["inference-header-content-length"])])
    [attention] = [o for o in head["outputs"] if o["name"] == "ATTENTIONS"]
    assert attention["parameters"]["binary_data_size"] == 4 * int(np.prod(attention["shape"]))
    assert 64 * 1024 < attention["parameters"]["binary_data_size"] < 128 * 1024

    request = pb.ModelInferRequest(model_name="fashion-vit")
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        canvas_png()[0]
    )
    request.outputs.add(name="ATTENTIONS")
    with grpc.insecure_channel(guarded.grpc_target) as channel:
        answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=[("authorization", f"Bearer {API_TOKEN}")], timeout=60
        )
    [output] = answer.outputs
    assert output.name == "ATTENTIONS" and len(answer.raw_output_contents[0]) == 4 * int(
        np.prod(output.shape)
    )
