"""Shared fixtures: a tiny model repository built once per session by the real pipeline, and the
service running on it (``python -m service`` on loopback), started once per session."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from export.data.fashion import DEBIAN_DIR

#: recipe → (training examples, epochs): enough for the dates models to translate correctly,
#: the ViT only has to be a real exported graph
TINY = {"dates-bahdanau": (6000, 2), "dates-transformer": (6000, 5), "fashion-vit": (400, 1)}


def fashion_available() -> bool:
    return (DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").exists()


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train each default recipe briefly on a few thousand examples and export it (plus an int8
    variant of the ViT) — the same code path as ``make models``, minus the floors."""
    from export import build, recipes

    root = tmp_path_factory.mktemp("tiny")
    repository = root / "model_repository"
    for name, (n, epochs) in TINY.items():
        if name.startswith("fashion") and not fashion_available():
            pytest.skip("Debian package dataset-fashion-mnist is not installed")
        recipe = recipes.get(name).scaled(n_train=n, n_test=64, epochs=epochs)
        build.train(recipe, root / "checkpoints" / name)
        build.export(
            root / "checkpoints" / name,
            recipe,
            repository,
            quantize="int8" if name == "fashion-vit" else None,
        )
    return repository


@pytest.fixture(scope="session")
def fp16_repository(tiny_repository: Path) -> Path:
    """The float16 variant (``<name>-fp16``) of each tiny model, in a repository of its own beside
    the tiny one — the code path of ``--precision fp16``, from the fp32 versions already built."""
    from export import recipes
    from export.variants import write_variant

    repository = tiny_repository.parent / "fp16_repository"
    for name, (n, epochs) in TINY.items():
        recipe = recipes.get(name).scaled(n_train=n, n_test=64, epochs=epochs)
        write_variant(tiny_repository / name / "1", recipe, repository, "fp16", force=False)
    return repository


def wait_ready(url: str, proc: subprocess.Popen | None, timeout_s: float, logs: Callable[[], str]) -> None:
    """Poll ``url`` until it answers 200; fail with the logs if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before {url} was ready:\n{logs()}")
        try:
            if requests.get(url, timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s:\n{logs()}")
        time.sleep(0.5)


def wait_deployed(log: Path, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Until ``python -m service`` says every replica is up: /readyz answers as soon as the first
    replica listens, the banner only once serve.run has seen all of them running."""
    deadline = time.monotonic() + timeout_s
    while "serving on http" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"not every replica came up:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.5)


def free_port() -> int:
    from benchmarks.ports import free_port as outside_ephemeral_range

    return outside_ephemeral_range()


def service_ports() -> tuple[int, int, int]:
    from benchmarks.ports import service_ports as spaced

    return spaced()


@dataclass
class Service:
    url: str
    grpc_target: str
    metrics_url: str
    repository: Path
    log: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """Stop it now, as the end of its ``running_service`` would (which then has nothing left
        to do)."""
        stop(self.process, self.log)

    def get(self, path: str, **kw: object) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kw)  # type: ignore[arg-type]

    def post(self, path: str, **kw: object) -> requests.Response:
        return requests.post(self.url + path, timeout=60, **kw)  # type: ignore[arg-type]


@contextlib.contextmanager
def running_service(
    repository: Path, directory: Path, port_offset: int = 0, **settings: str
) -> Iterator[Service]:
    """``python -m service`` on free loopback ports with ``settings`` (ATTN_* variables) added;
    ready when yielded, stopped by PID (SIGINT: serve.shutdown(); ray.shutdown()) after.
    Clients connect ``port_offset`` above the configured ports (the ray-direct frontend)."""
    http, grpc, metrics = service_ports()  # ray-direct's ingress ranges above each free as well
    log = directory / "service.log"
    env = {
        **os.environ,
        "ATTN_REPOSITORY": str(repository),
        "ATTN_HTTP_PORT": str(http),
        "ATTN_GRPC_PORT": str(grpc),
        "ATTN_METRICS_PORT": str(metrics),
        "ATTN_NUM_CPUS": "4",
        "ATTN_BATCHING__BATCH_WAIT_TIMEOUT_S": "0.02",
        "RAY_USAGE_STATS_ENABLED": "0",
        **settings,
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    svc = Service(
        f"http://127.0.0.1:{http + port_offset}",
        f"127.0.0.1:{grpc + port_offset}",
        f"http://127.0.0.1:{metrics}/metrics",
        repository,
        log,
        proc,
    )
    try:
        wait_ready(f"{svc.url}/readyz", proc, 180, lambda: log.read_text()[-4000:])
        wait_deployed(log, proc)
        yield svc
    finally:
        stop(proc, log)


#: how long ``python -m service`` may take to stop on SIGINT (the drain is 2 s by default)
STOP_WITHIN_S = 10.0


def stop(proc: subprocess.Popen, log: Path) -> None:
    """SIGINT, as Ctrl-C: the service must be gone within ``STOP_WITHIN_S`` and print no error
    while stopping (it used to take ~40 s and end with "Controller failed to shut down")."""
    if proc.poll() is not None:
        return
    before = log.stat().st_size
    started, signalled = time.monotonic(), datetime.datetime.now()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    took = time.monotonic() - started
    with log.open("rb") as out:
        out.seek(before)
        stopping = out.read().decode(errors="replace")
    assert took <= STOP_WITHIN_S, f"the service took {took:.1f} s to stop:\n{stopping[-3000:]}"
    bad = [
        line
        for line in logged_since(stopping, signalled)
        if re.search(r"ERROR|Traceback|failed|[Ee]rror:", line)
    ]
    assert not bad, "errors while stopping:\n" + "\n".join(bad[:20])


def logged_since(text: str, moment: datetime.datetime) -> list[str]:
    """The lines logged at or after ``moment``: Ray forwards its workers' lines with a lag, so
    text that arrives after the signal may have been logged before it. A line without a time
    stamp (a traceback's) belongs with the line before it."""
    since, recent = [], True
    for line in text.splitlines():
        stamp = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})", line)
        if stamp:
            when = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")
            recent = when + datetime.timedelta(milliseconds=int(stamp.group(2)) + 1) >= moment
        if recent:
            since.append(line)
    return since


#: the services tests share, each stopped once the last collected test that uses it has run: an
#: idle Ray cluster takes ~8 % of a core, and ``guarded``'s tests are done a third into the suite
SHARED_SERVICES = ("service", "guarded")
#: shared service → the node id of the last collected test that uses it
_last_users: dict[str, str] = {}
#: shared services started and not yet stopped
_started: dict[str, Service] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    """The items in the order they run: after every selection and reordering (-k, -m, --ff,
    --nf, plugins), which pytest_collection_modifyitems may still see undone."""
    _last_users.clear()
    for item in session.items:
        for name in SHARED_SERVICES:
            if name in getattr(item, "fixturenames", ()):
                _last_users[name] = item.nodeid


@pytest.fixture(autouse=True)
def _stop_shared_services_after_their_last_test(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in SHARED_SERVICES:  # a failure to stop cleanly is this test's teardown error
        if _last_users.get(name) == request.node.nodeid and name in _started:
            _started.pop(name).stop()


@contextlib.contextmanager
def shared(name: str, repository: Path, directory: Path, **settings: str) -> Iterator[Service]:
    with running_service(repository, directory, **settings) as svc:
        _started[name] = svc
        try:
            yield svc
        finally:
            _started.pop(name, None)


@pytest.fixture(scope="session")
def service(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service on the tiny repository with the default settings (the in-replica frontend)."""
    with shared("service", tiny_repository, tmp_path_factory.mktemp("service")) as svc:
        yield svc


#: the bearer token of the ``guarded`` service
API_TOKEN = "correct-horse-battery-staple"
#: the gRPC calls the ``guarded`` service holds at once (``max_grpc_calls``)
GUARDED_GRPC_CALLS = 8
#: the ``guarded`` service's answer limit: the tiny ViT's every-layer attention is ~88 kB as
#: float32 (binary, gRPC) and ~197 kB as JSON (``tests/service/api/test_answer_size.py``)
GUARDED_MAX_RESPONSE_BYTES = 128 * 1024


@pytest.fixture(scope="session")
def guarded(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service on the tiny repository with an API token (``API_TOKEN``), taking at most
    ``GUARDED_GRPC_CALLS`` gRPC calls at once, answering at most ``GUARDED_MAX_RESPONSE_BYTES``."""
    with shared(
        "guarded",
        tiny_repository,
        tmp_path_factory.mktemp("guarded"),
        ATTN_API_TOKEN=API_TOKEN,
        ATTN_LIMITS__MAX_GRPC_CALLS=str(GUARDED_GRPC_CALLS),
        ATTN_LIMITS__MAX_RESPONSE_BYTES=str(GUARDED_MAX_RESPONSE_BYTES),
    ) as svc:
        yield svc
