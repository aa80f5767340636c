"""The REST and KServe v2 HTTP routes of ``create_app(server)`` against fake models, without Ray or
a graph: what each protocol sends the core (a typed job, decoded once) and how it encodes the
answer; errors in the documented shape; the limits the OpenAPI document shows."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.api.http import create_app
from tests.service.fakes import fake_server


def call(app: Any, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Any:
    """One HTTP exchange with the ASGI app, in process; → (status, headers, body)."""
    messages: list[dict[str, Any]] = []
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)  # a client that stays: the route's disconnect watch waits
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    raw.append((b"content-length", str(len(body)).encode()))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": raw, "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    start = next(m for m in messages if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, content


def post_json(app: Any, path: str, payload: Any) -> tuple[int, Any]:
    status, _, content = call(
        app, "POST", path, json.dumps(payload).encode(), {"content-type": "application/json"}
    )
    return status, json.loads(content)


BOUNDARY = "XyZ"


def multipart(image: bytes, top_k: int = 2) -> bytes:
    """A form upload of ``image`` as ``file`` with ``top_k``, between :data:`BOUNDARY` lines."""
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n{top_k}\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def served(tmp_path: Path) -> Any:
    return fake_server(tmp_path)


def test_translate_decodes_once_into_a_job_and_encodes_the_answer(served: Any) -> None:
    server, translator, _, recorded = served
    status, body = post_json(
        create_app(server), "/v1/models/fake-translator/translate",
        {"text": ["abc", "hello"], "beam_size": 3, "return_attention": True},
    )  # fmt: skip
    assert status == 200, body
    [job] = translator.jobs
    assert job.texts == ["abc", "hello"] and job.beam_size == 3 and job.attention == "default"
    assert job.truncate is False  # a text over the model's source limit is refused unless asked
    assert body["model"] == "fake-translator" and body["version"] == 1
    first = body["translations"][0]
    assert first["text"] == "cba" and first["score"] == -3.0 and first["finished"] is True
    assert first["attention"] == {
        "kind": "alignment",
        "shape": [3, 3],
        "values": [[0, 0, 1], [0, 1, 0], [1, 0, 0]],
    }
    assert body["metrics"]["tokens_generated"] == 8 and body["metrics"]["total_ms"] >= 0
    assert recorded.records == [("fake-translator", "translate", 200)]


def test_attention_as_png(served: Any) -> None:
    status, body = post_json(
        create_app(served[0]), "/v1/models/fake-translator/translate",
        {"text": "abc", "return_attention": True, "attention_format": "png"},
    )  # fmt: skip
    assert status == 200
    image = base64.b64decode(body["translations"][0]["attention"]["png_base64"])
    assert image.startswith(b"\x89PNG")


def test_classify_json_multipart_and_kserve_give_the_core_the_same_job(served: Any) -> None:
    server, _, classifier, _ = served
    app = create_app(server)
    pixels = np.array([[1, 1], [2, 0]])
    image = png(pixels)
    status, by_json = post_json(app, "/v1/models/fake-classifier/classify",
                                {"image": base64.b64encode(image).decode(), "top_k": 2, "return_attention": True})  # fmt: skip
    assert status == 200, by_json
    status, _, content = call(app, "POST", "/v1/models/fake-classifier/classify", multipart(image),
                              {"content-type": f"multipart/form-data; boundary={BOUNDARY}"})  # fmt: skip
    assert status == 200, content
    by_form = json.loads(content)
    infer = {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 2, 2], "data": pixels.ravel().tolist()}],
             "parameters": {"top_k": 2}}  # fmt: skip
    status, by_v2 = post_json(app, "/v2/models/fake-classifier/infer", infer)
    assert status == 200, by_v2
    json_job, form_job, v2_job = classifier.jobs
    assert json_job.image == form_job.image == image  # bytes stay bytes
    assert v2_job.pixels is not None and v2_job.pixels.dtype == np.uint8  # arrays stay arrays
    assert json_job.attention == "rollout" and form_job.attention == v2_job.attention == "none"
    assert (
        [p["label"] for p in by_json["predictions"]]
        == [p["label"] for p in by_form["predictions"]]
        == ["one", "zero"]
    )
    outputs = {o["name"]: o["data"] for o in by_v2["outputs"]}
    assert outputs["LABELS"] == ["one", "zero"] or outputs["LABELS"] == [["one", "zero"]]
    assert by_json["attention"]["kind"] == "rollout-mean" and by_json["attention"]["shape"] == [2, 2]


def test_kserve_translation_tensors(served: Any) -> None:
    infer = {
        "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": ["ab", "xyz"]}],
        "outputs": [{"name": "TRANSLATION"}, {"name": "SCORE"}, {"name": "ATTENTION"}],
    }
    status, body = post_json(create_app(served[0]), "/v2/models/fake-translator/infer", infer)
    assert status == 200, body
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["TRANSLATION"]["data"] == ["ba", "zyx"] and outputs["SCORE"]["data"] == [-2.0, -3.0]
    attention = np.array(outputs["ATTENTION"]["data"]).reshape(outputs["ATTENTION"]["shape"])
    assert attention.shape == (2, 3, 3) and attention[0, :2, :2].tolist() == [[0, 1], [1, 0]]
    assert attention[0, 2].sum() == 0  # zero-padded to the longest


def test_truncate_reaches_the_job_over_rest_and_kserve(served: Any) -> None:
    server, translator, _, _ = served
    app = create_app(server)
    status, _ = post_json(app, "/v1/models/fake-translator/translate", {"text": "abc", "truncate": True})
    assert status == 200
    infer = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["ab"]}],
             "parameters": {"truncate": True}}  # fmt: skip
    status, _ = post_json(app, "/v2/models/fake-translator/infer", infer)
    assert status == 200
    status, _ = post_json(app, "/v2/models/fake-translator/infer", {**infer, "parameters": {}})
    assert status == 200
    assert [j.truncate for j in translator.jobs] == [True, True, False]
    assert [j.field for j in translator.jobs] == ["text", "TEXT", "TEXT"]  # what messages name


@pytest.mark.parametrize(
    ("path", "payload", "status", "words"),
    [
        ("/v1/models/nope/translate", {"text": "x"}, 404, "not found"),
        ("/v1/models/fake-classifier/translate", {"text": "x"}, 400, "not translation"),
        ("/v1/models/fake-translator/translate", {"text": "x", "beam_size": 0}, 422, "beam_size"),
        ("/v1/models/fake-translator/translate", {"txt": "x"}, 422, "text"),
        ("/v1/models/fake-classifier/classify", {"image": "%%%"}, 422, "image"),
        ("/v2/models/fake-translator/infer", {"inputs": []}, 422, "inputs"),
    ],
)
def test_errors_are_json_with_their_status(
    served: Any, path: str, payload: Any, status: int, words: str
) -> None:
    got, body = post_json(create_app(served[0]), path, payload)
    assert got == status and words in body["error"], body


def test_a_declared_body_over_the_limit_is_refused_before_reading(served: Any) -> None:
    app = create_app(served[0])
    status, headers, content = call(
        app, "POST", "/v1/models/fake-translator/translate", b"{}",
        {"content-type": "application/json", "content-length": str(10**9)},
    )  # fmt: skip
    assert status == 413 and "body" in json.loads(content)["error"] and headers["connection"] == "close"


def test_models_and_readiness(served: Any) -> None:
    app = create_app(served[0])
    status, _, content = call(app, "GET", "/v1/models")
    listed = json.loads(content)
    assert status == 200 and [m["name"] for m in listed["models"]] == ["fake-classifier", "fake-translator"]
    assert listed["rejected"] == {"broken/1": "failed to load: a reason"}
    # the runtime fields before any readiness probe came (they were null until one did)
    assert [(m["providers"], m["max_batch_size"]) for m in listed["models"]] == [
        (["CPUExecutionProvider"], 4)
    ] * 2
    _, _, content = call(app, "GET", "/v1/models/fake-translator")
    one = json.loads(content)
    assert one["max_batch_size"] == 4 and (one["max_source_tokens"], one["max_target_tokens"]) == (8, 8)
    assert listed["models"][0]["max_source_tokens"] is None  # an image model
    status, _, content = call(app, "GET", "/readyz")
    assert status == 200 and json.loads(content)["warmup_ms"] == {
        "fake-classifier": 1.0,
        "fake-translator": 1.0,
    }


def test_openapi_shows_the_served_limits(tmp_path: Path) -> None:
    server = fake_server(tmp_path, limits={"max_texts": 7, "max_beam_size": 3})[0]
    status, _, content = call(create_app(server), "GET", "/openapi.json")
    props = json.loads(content)["paths"]["/v1/models/{name}/translate"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["properties"]  # fmt: skip
    assert status == 200 and props["beam_size"]["maximum"] == 3
    assert next(v for v in props["text"]["anyOf"] if v.get("type") == "array")["maxItems"] == 7


def test_two_apps_two_servers_nothing_shared(tmp_path: Path) -> None:
    """create_app builds from its argument: no module global decides which server answers."""
    one, two = fake_server(tmp_path)[0], fake_server(tmp_path)[0]
    two.serve({}, {}, {})
    assert call(create_app(one), "GET", "/v1/models/fake-translator")[0] == 200
    assert call(create_app(two), "GET", "/v1/models/fake-translator")[0] == 404


def test_kserve_metadata_shows_the_served_limits(tmp_path: Path) -> None:
    server = fake_server(tmp_path, limits={"max_texts": 7, "max_top_k": 9})[0]
    app = create_app(server)
    translator = json.loads(call(app, "GET", "/v2/models/fake-translator")[2])
    classifier = json.loads(call(app, "GET", "/v2/models/fake-classifier")[2])
    assert translator["parameters"]["max_texts"] == 7 and translator["parameters"]["max_beam_size"] == 8
    assert classifier["parameters"]["max_top_k"] == 9


def test_requests_refused_before_a_model_sees_them_are_counted(served: Any) -> None:
    """A malformed body, a tensor the model cannot take, an unknown model: refused while the
    protocol decodes the request, and counted in the request metrics as the refusals after it are."""
    server, translator, _, recorded = served
    app = create_app(server)
    status, _, _ = call(
        app, "POST", "/v1/models/fake-translator/translate", b"{", {"content-type": "application/json"}
    )
    assert status == 422
    assert post_json(app, "/v1/models/nope/classify", {"image": ""})[0] == 404
    tensor = {"name": "TEXT", "datatype": "FP32", "shape": [1], "data": [1.0]}
    assert post_json(app, "/v2/models/fake-translator/infer", {"inputs": [tensor]})[0] == 422
    assert recorded.records == [
        ("fake-translator", "translate", 422),
        ("_unknown", "classify", 404),
        ("fake-translator", "v2_infer", 422),
    ]
    assert not translator.jobs


@pytest.mark.parametrize(
    ("ctype", "status"),
    [
        (f"Multipart/Form-Data; boundary={BOUNDARY}", 200),  # a media type is case-insensitive
        (f"MULTIPART/FORM-DATA ; boundary={BOUNDARY}", 200),
        ("multipart/form-datax", 422),  # another type, not a prefix of this one
        ("text/plain", 422),
    ],
)
def test_a_classify_upload_s_media_type_is_read_in_any_case(served: Any, ctype: str, status: int) -> None:
    app = create_app(served[0])
    got, _, content = call(app, "POST", "/v1/models/fake-classifier/classify", multipart(png(np.eye(2))),
                           {"content-type": ctype})  # fmt: skip
    assert got == status, content
    if status == 422:
        assert json.loads(content)["error"].startswith("content-type: expected application/json")


def test_an_upload_whose_boundary_the_parser_refuses_is_a_422_naming_the_content_type(served: Any) -> None:
    """RFC 2046 allows 70 characters; python-multipart takes up to 256 and refuses more when its
    parser is made (that was a 500)."""
    boundary = "b" * 300
    body = multipart(png(np.eye(2))).replace(BOUNDARY.encode(), boundary.encode())
    got, _, content = call(create_app(served[0]), "POST", "/v1/models/fake-classifier/classify", body,
                           {"content-type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    assert got == 422, content
    assert json.loads(content)["error"].startswith("content-type: the multipart boundary is refused")


@pytest.mark.parametrize("ctype", ["Application/JSON; charset=UTF-8", "application/vnd.api+json"])
def test_a_json_body_s_media_type_is_read_in_any_case(served: Any, ctype: str) -> None:
    """As FastAPI's JSON routes read theirs: application/json, or any application/*+json."""
    image = base64.b64encode(png(np.eye(2))).decode()
    got, _, content = call(create_app(served[0]), "POST", "/v1/models/fake-classifier/classify",
                           json.dumps({"image": image}).encode(), {"content-type": ctype})  # fmt: skip
    assert got == 200, content


@pytest.mark.parametrize(
    ("ctype", "status"),
    [
        ("", 200),
        ("application/json", 200),
        ("Application/JSON; charset=UTF-8", 200),
        ("application/vnd.api+json", 200),
        # what a web page sends a local service without a CORS preflight: refused, as FastAPI does
        ("text/plain", 422),
        ("application/x-www-form-urlencoded", 422),
        ("multipart/form-data; boundary=x", 422),
    ],
)
def test_translate_reads_json_bodies_only(served: Any, ctype: str, status: int) -> None:
    headers = {"content-type": ctype} if ctype else {}
    got, _, content = call(create_app(served[0]), "POST", "/v1/models/fake-translator/translate",
                           json.dumps({"text": "abc"}).encode(), headers)  # fmt: skip
    assert got == status, content
    if status == 422:
        assert json.loads(content) == {"error": f"content-type: expected application/json, got {ctype!r}"}


def test_translate_names_an_unknown_model_before_its_body(served: Any) -> None:
    """As classify does: 404 for a model that is not served, whatever the body (it was 422
    "text: Field required" on translate and 404 on classify for the same request)."""
    app = create_app(served[0])
    for route in ("translate", "classify"):
        got, _, content = call(
            app, "POST", f"/v1/models/nope/{route}", b"{}", {"content-type": "application/json"}
        )
        assert got == 404 and "not found" in json.loads(content)["error"], (route, content)


def test_top_k_over_the_served_limit_names_the_limit(served: Any) -> None:
    """Over the schema's old ceiling (1000) the message named 1000, under it the served 100."""
    for top_k in (500, 5000):
        status, body = post_json(create_app(served[0]), "/v1/models/fake-classifier/classify",
                                 {"pixels": [[1]], "top_k": top_k})  # fmt: skip
        assert status == 422 and body["error"] == f"top_k: {top_k} exceeds the limit of 100", body


def test_the_explorer_is_checked_with_the_server_on_every_load(served: Any) -> None:
    """No Cache-Control let a browser keep an old explorer.js for days after an upgrade."""
    app = create_app(served[0])
    for path in ("/", "/static/explorer.js", "/static/explorer.css"):
        got, headers, _ = call(app, "GET", path)
        assert got == 200 and headers.get("cache-control") == "no-cache", (path, headers)


def test_a_retry_now_answer_says_when(served: Any) -> None:
    """503 "moved to a new version while computed; retry it" (NotReady) carries Retry-After, as
    a shed request's does: a client that backs off by the header retried at once."""
    from service.errors import NotReady

    server, translator, _, _ = served

    async def predict(job: Any) -> Any:
        raise NotReady("model 'fake-translator' moved from version 1 to 2 while this request was computed")

    translator.predict = predict
    got, headers, _ = call(create_app(server), "POST", "/v1/models/fake-translator/translate", b'{"text": "abc"}',
                           {"content-type": "application/json"})  # fmt: skip
    assert got == 503 and headers.get("retry-after") == "1", headers
