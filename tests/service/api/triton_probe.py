"""Drive the service with tritonclient, unchanged, and print what it saw as JSON.

Runs in its own environment (tritonclient needs protobuf < 7 and its generated classes clash
with ours): ``python triton_probe.py HTTP_URL GRPC_URL IMAGE.png``. The pytest side
(``test_kserve_clients.py``) asserts on the printed results.
"""

import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

TEXTS = ["5 mars 2024", "Tuesday, July 4, 1995", "31.12.1999"]


def _s(value: Any) -> str:
    """BYTES elements arrive as bytes (binary) or str (JSON)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _error(fn: Any) -> dict[str, Any]:
    try:
        fn()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": exc.message()}
    return {"status": "no error"}


def probe_http(url: str, png: bytes) -> dict[str, Any]:
    c = httpclient.InferenceServerClient(url)
    out: dict[str, Any] = {
        "live": c.is_server_live(),
        "ready": c.is_server_ready(),
        "server": c.get_server_metadata(),
        "model_ready": c.is_model_ready("dates-transformer"),
        "model_ready_v1": c.is_model_ready("dates-transformer", "1"),
        "metadata": c.get_model_metadata("fashion-vit"),
    }
    for binary in (False, True):
        text = httpclient.InferInput("TEXT", [len(TEXTS)], "BYTES")
        text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=np.object_), binary_data=binary)
        outputs = [
            httpclient.InferRequestedOutput(n, binary_data=binary)
            for n in ("TRANSLATION", "SCORE", "ATTENTION")
        ]
        r = c.infer("dates-bahdanau", [text], outputs=outputs, request_id="h1", parameters={"beam_size": 2})
        out[f"translate_binary_{binary}"] = {
            "id": r.get_response()["id"],
            "text": [_s(t) for t in r.as_numpy("TRANSLATION")],
            "score": r.as_numpy("SCORE").tolist(),
            "attention_shape": list(r.as_numpy("ATTENTION").shape),
            "attention_row_sums": r.as_numpy("ATTENTION").sum(-1).tolist(),
        }
    plain = httpclient.InferInput("TEXT", [1], "BYTES")
    plain.set_data_from_numpy(np.array([b"3 juin 1980"], dtype=np.object_))
    r = c.infer("dates-transformer", [plain])  # no outputs named: the defaults, binary by default
    out["translate_defaults"] = {"outputs": [o["name"] for o in r.get_response()["outputs"]],
                                 "text": _s(r.as_numpy("TRANSLATION")[0])}  # fmt: skip
    # TEXT as the model configuration describes it to a Triton client: dims [1] under the batch
    column = httpclient.InferInput("TEXT", [2, 1], "BYTES")
    column.set_data_from_numpy(np.array([[b"3 juin 1980"], [b"July 4, 1976"]], dtype=np.object_))
    r = c.infer("dates-transformer", [column], outputs=[httpclient.InferRequestedOutput("TRANSLATION")])
    out["translate_column"] = [_s(t) for t in r.as_numpy("TRANSLATION")]
    image = httpclient.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([png], dtype=np.object_))
    wanted = [httpclient.InferRequestedOutput(n) for n in ("LABELS", "PROBABILITIES", "INDICES", "ROLLOUT")]
    r = c.infer("fashion-vit", [image], outputs=wanted, parameters={"top_k": 3, "head_fusion": "max"})
    out["classify_image"] = {"labels": [_s(x) for x in r.as_numpy("LABELS")[0]],
                             "probabilities": r.as_numpy("PROBABILITIES")[0].tolist(),
                             "rollout_shape": list(r.as_numpy("ROLLOUT").shape),
                             "rollout_max": float(r.as_numpy("ROLLOUT").max())}  # fmt: skip
    # Triton's classification extension, as its image_client asks for it (binary, class_count)
    wanted = [httpclient.InferRequestedOutput("PROBABILITIES", binary_data=True, class_count=3)]
    out["classify_classes"] = [
        _s(x) for x in c.infer("fashion-vit", [image], outputs=wanted).as_numpy("PROBABILITIES")[0]
    ]
    # beside LABELS, which keep the default top_k: class_count changes only its own output
    wanted = [
        httpclient.InferRequestedOutput("LABELS"),
        httpclient.InferRequestedOutput("PROBABILITIES", class_count=2),
    ]
    r = c.infer("fashion-vit", [image], outputs=wanted)
    out["classify_classes_beside_labels"] = {
        "labels": [_s(x) for x in r.as_numpy("LABELS")[0]],
        "classes": [_s(x) for x in r.as_numpy("PROBABILITIES")[0]],
    }
    pixels = httpclient.InferInput("PIXELS", [2, 48, 48], "UINT8")
    pixels.set_data_from_numpy(np.zeros((2, 48, 48), dtype=np.uint8))
    r = c.infer("fashion-vit", [pixels], outputs=[httpclient.InferRequestedOutput("ATTENTIONS")])
    out["classify_pixels_attentions_shape"] = list(r.as_numpy("ATTENTIONS").shape)
    wrong = httpclient.InferInput("WRONG", [1], "BYTES")
    wrong.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    bad_pixels = httpclient.InferInput("PIXELS", [1, 4], "FP64")
    bad_pixels.set_data_from_numpy(np.zeros((1, 4)))
    out["compressed"] = probe_http_compression(url, png)
    out["errors"] = {
        "unknown_model": _error(lambda: c.infer("nope", [plain])),
        "unknown_version": _error(lambda: c.infer("dates-transformer", [plain], model_version="7")),
        "wrong_input": _error(lambda: c.infer("dates-transformer", [wrong])),
        "wrong_dtype": _error(lambda: c.infer("fashion-vit", [bad_pixels])),
        "metadata_unknown": _error(lambda: c.get_model_metadata("nope")),
    }
    return out


def probe_http_compression(url: str, png: bytes) -> dict[str, Any]:
    """Both models at once from 8 connections, each request with its own request and answer
    compression (tritonclient's request_/response_compression_algorithm), beside plain ones:
    what each saw, keyed by compression, to compare with the plain answers."""
    c = httpclient.InferenceServerClient(url, concurrency=8)
    text = httpclient.InferInput("TEXT", [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=np.object_), binary_data=True)
    image = httpclient.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([png], dtype=np.object_))
    asks = {
        "dates-bahdanau": ([text], [httpclient.InferRequestedOutput(n, binary_data=b)
                                    for n, b in (("TRANSLATION", False), ("SCORE", True), ("ATTENTION", True))]),
        "fashion-vit": ([image], [httpclient.InferRequestedOutput(n) for n in ("PROBABILITIES", "ROLLOUT")]),
    }  # fmt: skip
    pending = []
    codings = [(None, None), ("gzip", "gzip"), ("deflate", "deflate"), ("gzip", None), (None, "deflate")]
    for _ in range(3):
        for request, response in codings:
            for model, (inputs, outputs) in asks.items():
                handle = c.async_infer(model, inputs, outputs=outputs, request_compression_algorithm=request,
                                       response_compression_algorithm=response)  # fmt: skip
                pending.append((f"{model} {request} {response}", handle))
    seen: dict[str, list[Any]] = {}
    for key, handle in pending:
        r = handle.get_result()
        got = {name: r.as_numpy(name).tolist() for name in ("SCORE", "ATTENTION", "PROBABILITIES", "ROLLOUT")
               if r.get_output(name) is not None}  # fmt: skip
        if r.get_output("TRANSLATION") is not None:
            got["TRANSLATION"] = [_s(t) for t in r.as_numpy("TRANSLATION")]
        seen.setdefault(key, []).append(got)
    c.close()
    return seen


def probe_grpc(url: str, png: bytes) -> dict[str, Any]:
    c = grpcclient.InferenceServerClient(url)
    out: dict[str, Any] = {
        "live": c.is_server_live(),
        "ready": c.is_server_ready(),
        "server": c.get_server_metadata(as_json=True),
        "model_ready": c.is_model_ready("fashion-vit"),
        # Triton's answer for what it does not serve: False, not an error
        "model_ready_not_served": [c.is_model_ready("fashion-vit", "2"), c.is_model_ready("nope")],
        "metadata": c.get_model_metadata("dates-bahdanau", as_json=True),
    }
    text = grpcclient.InferInput("TEXT", [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=np.object_))
    outputs = [
        grpcclient.InferRequestedOutput(n) for n in ("TRANSLATION", "SCORE", "TARGET_TOKENS", "ATTENTION")
    ]
    r = c.infer("dates-transformer", [text], outputs=outputs, request_id="g1", parameters={"beam_size": 2})
    out["translate"] = {"id": r.get_response().id, "text": [_s(t) for t in r.as_numpy("TRANSLATION")],
                        "score": r.as_numpy("SCORE").tolist(),
                        "target_tokens": [[_s(t) for t in row] for row in r.as_numpy("TARGET_TOKENS")],
                        "attention_shape": list(r.as_numpy("ATTENTION").shape)}  # fmt: skip
    image = grpcclient.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([png], dtype=np.object_))
    r = c.infer("fashion-vit", [image], outputs=[grpcclient.InferRequestedOutput("LABELS"),
                                                 grpcclient.InferRequestedOutput("ROLLOUT")])  # fmt: skip
    out["classify"] = {"labels": [_s(x) for x in r.as_numpy("LABELS")[0]],
                       "rollout_shape": list(r.as_numpy("ROLLOUT").shape)}  # fmt: skip
    wanted = [grpcclient.InferRequestedOutput("PROBABILITIES", class_count=3)]
    out["classify_classes"] = [
        _s(x) for x in c.infer("fashion-vit", [image], outputs=wanted).as_numpy("PROBABILITIES")[0]
    ]
    # streaming: two good requests and one for an unknown model, answered in order
    results: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    for i, (model, t) in enumerate(
        [("dates-bahdanau", "1 mai 2001"), ("nope", "x"), ("dates-transformer", "2 mai 2002")]
    ):
        inp = grpcclient.InferInput("TEXT", [1], "BYTES")
        inp.set_data_from_numpy(np.array([t.encode()], dtype=np.object_))
        c.async_stream_infer(model, [inp], request_id=f"s{i}")
    stream = []
    for _ in range(3):
        result, error = results.get(timeout=60)
        stream.append({"error": str(error) if error else None,
                       "id": result.get_response().id if result else None,
                       "text": _s(result.as_numpy("TRANSLATION")[0]) if result else None})  # fmt: skip
    c.stop_stream()
    out["stream"] = stream
    out["compressed"] = {
        algorithm: [_s(t) for t in c.infer("dates-transformer", [text], outputs=outputs[:1],
                                           compression_algorithm=algorithm).as_numpy("TRANSLATION")]
        for algorithm in ("gzip", "deflate")
    }  # fmt: skip
    out["decoupled"] = probe_decoupled(c)
    out["errors"] = {
        "unknown_model": _error(lambda: c.infer("nope", [text])),
        "wrong_input": _error(lambda: c.infer("fashion-vit", [text])),
        "unimplemented": _error(lambda: c.unload_model("dates-transformer")),
        "metadata_unknown": _error(lambda: c.get_model_metadata("nope")),
    }
    return out


def probe_decoupled(c: Any) -> dict[str, Any]:
    """Translations streamed token by token (parameters stream: true), two models interleaved on
    one stream, as Triton's decoupled models answer: responses until triton_final_response."""
    results: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    asks = {
        "d0": ("dates-transformer", ["5 mars 2024", "3 juin 1980"], True),
        "d1": ("dates-bahdanau", ["31.12.1999"], False),
    }
    for request_id, (model, texts, attention) in asks.items():
        inp = grpcclient.InferInput("TEXT", [len(texts)], "BYTES")
        inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
        names = ["TRANSLATION", "TARGET_TOKENS"] + (["ATTENTION"] if attention else [])
        outputs = [grpcclient.InferRequestedOutput(n) for n in names]
        c.async_stream_infer(
            model, [inp], outputs=outputs, request_id=request_id, parameters={"stream": True}
        )
    got: dict[str, Any] = {request_id: {"tokens": [], "final": None} for request_id in asks}
    while any(g["final"] is None for g in got.values()):
        result, error = results.get(timeout=60)
        if error:
            raise RuntimeError(str(error))
        response = result.get_response()
        mine = got[response.id]
        if response.parameters["triton_final_response"].bool_param:
            mine["final"] = {
                "text": [_s(t) for t in result.as_numpy("TRANSLATION")],
                "target_tokens": [[_s(t) for t in row] for row in result.as_numpy("TARGET_TOKENS")],
                "attention_shape": list(result.as_numpy("ATTENTION").shape) if asks[response.id][2] else None,
            }
        else:
            attention = result.as_numpy("ATTENTION")
            mine["tokens"].append({
                "text": _s(result.as_numpy("TOKEN")[0]), "token_id": int(result.as_numpy("TOKEN_ID")[0]),
                "text_index": int(result.as_numpy("TEXT_INDEX")[0]), "logprob": float(result.as_numpy("LOGPROB")[0]),
                "attention_shape": list(attention.shape) if attention is not None else None,
            })  # fmt: skip
    c.stop_stream()
    return got


def probe_extensions(http_url: str, grpc_url: str) -> dict[str, Any]:
    """Triton's model-configuration, statistics and repository-index calls, over both protocols
    one right after the other (nothing else is sent meanwhile, so they must agree)."""
    h, g = httpclient.InferenceServerClient(http_url), grpcclient.InferenceServerClient(grpc_url)
    return {
        "http_stats": h.get_inference_statistics(),
        "grpc_stats": g.get_inference_statistics(as_json=True),
        "http_stats_one": h.get_inference_statistics("dates-bahdanau", "1"),
        "grpc_stats_one": g.get_inference_statistics("dates-bahdanau", as_json=True),
        "http_config": {m: h.get_model_config(m) for m in ("fashion-vit", "dates-transformer")},
        "grpc_config": {m: g.get_model_config(m, as_json=True) for m in ("fashion-vit", "dates-transformer")},
        "http_index": h.get_model_repository_index(),
        "grpc_index": g.get_model_repository_index(as_json=True),
        "errors": {
            "http_stats_unknown": _error(lambda: h.get_inference_statistics("nope")),
            "grpc_config_unknown": _error(lambda: g.get_model_config("nope")),
            "http_config_version": _error(lambda: h.get_model_config("fashion-vit", "9")),
        },
    }


if __name__ == "__main__":
    http_url, grpc_url, image_path = sys.argv[1:4]
    with open(image_path, "rb") as f:
        png = f.read()
    print(json.dumps({
        "http": probe_http(http_url, png),
        "grpc": probe_grpc(grpc_url, png),
        "extensions": probe_extensions(http_url, grpc_url),
    }, default=str))  # fmt: skip
