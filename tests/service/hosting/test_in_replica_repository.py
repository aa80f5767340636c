"""A repository that changes while it is served, in the default in-replica frontend and behind
Ray's proxy: a new version published under load is swapped in without a failed request, and a new
model directory is served at the next poll in-replica (behind Ray's proxy a new name needs a
redeploy)."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from benchmarks.loadgen import Request, closed_loop
from tests.conftest import Service, running_service

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["in-replica", "ray-proxy"])
def swappable(
    request: pytest.FixtureRequest, tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, Path]]:
    """The tiny repository with a writable copy of dates-bahdanau, polled every second, in the
    default frontend and behind Ray's proxy (a deployment per model)."""
    root = tmp_path_factory.mktemp("swappable")
    repository = root / "repository"
    repository.mkdir()
    for model in tiny_repository.iterdir():
        if model.name == "dates-bahdanau":
            shutil.copytree(model, repository / model.name)
        else:
            (repository / model.name).symlink_to(model, target_is_directory=True)
    with running_service(repository, root, ATTN_REPOSITORY_POLL_S="1", ATTN_FRONTEND=request.param) as svc:
        yield svc, repository


def publish_version_2(model: Path) -> None:
    """What export does: stage the new version beside the others, then rename it into place."""
    staging = model / ".staging-2"
    shutil.copytree(model / "1", staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    (staging / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    staging.rename(model / "2")


def test_a_new_version_is_swapped_in_under_load_without_a_failed_request(
    swappable: tuple[Service, Path],
) -> None:
    svc, repository = swappable
    host, port = svc.url.removeprefix("http://").split(":")
    work = [Request.json("/v1/models/dates-bahdanau/translate", {"text": "3 juin 1980"})]
    timer = threading.Timer(3, publish_version_2, (repository / "dates-bahdanau",))
    timer.start()
    result = asyncio.run(closed_loop(host, int(port), work, 4, 12, keep_every=1))
    timer.join()
    assert result.errors == 0 and result.ok > 100, (result.statuses, result.errors)
    versions = [json.loads(body)["version"] for body in result.bodies]
    assert versions[0] == 1 and versions[-1] == 2, "the swap did not happen within the load"
    assert {json.loads(body)["translations"][0]["text"] for body in result.bodies} == {"1980-06-03"}
    models = requests.get(f"{svc.url}/v1/models", timeout=30).json()["models"]
    assert [m["version"] for m in models if m["name"] == "dates-bahdanau"] == [2]


def test_a_model_published_after_the_start_is_served_at_the_poll(
    swappable: tuple[Service, Path], request: pytest.FixtureRequest
) -> None:
    """In-replica serving the whole repository: a new model directory, written as export writes
    it, answers within a few polls, and every protocol's listing has it. Behind Ray's proxy (a
    deployment per model) a new name needs a redeploy: the served set stays as it was."""
    svc, repository = swappable
    model = repository / "dates-new"
    model.mkdir()
    publish = model / ".staging-1"
    shutil.copytree(repository / "dates-bahdanau" / "1", publish)
    manifest = json.loads((publish / "manifest.json").read_text())
    (publish / "manifest.json").write_text(json.dumps({**manifest, "name": "dates-new", "version": 1}))
    publish.rename(model / "1")
    url = f"{svc.url}/v1/models/dates-new/translate"
    in_replica = request.node.callspec.params["swappable"] == "in-replica"
    deadline = time.monotonic() + (20 if in_replica else 5)  # polled every second
    while (answer := requests.post(url, json={"text": "3 juin 1980"}, timeout=30)).status_code == 404:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not in_replica:
        assert answer.status_code == 404 and "dates-new" in answer.json()["error"]
        return
    assert answer.status_code == 200, answer.text
    assert answer.json()["translations"][0]["text"] == "1980-06-03" and answer.json()["model"] == "dates-new"
    listed = [m["name"] for m in requests.get(f"{svc.url}/v1/models", timeout=30).json()["models"]]
    index = requests.post(f"{svc.url}/v2/repository/index", timeout=30).json()
    assert (
        "dates-new" in listed
        and {"name": "dates-new", "version": "1", "state": "READY", "reason": ""} in index
    )
    assert requests.get(f"{svc.url}/v2/models/dates-new", timeout=30).json()["versions"] == ["1"]
