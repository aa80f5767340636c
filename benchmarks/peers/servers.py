"""Start, stop and talk to the peer servers of the image-classification benchmark (issue #19).

For a benchmark driver in the main venv (no torch or Ray imported here). :func:`start` brings a
peer up on free loopback ports, in its own venv (``versions.venv``) and its own session, with its
files under ``build/peers/<name>/`` (wiped at each start, kept after stop for the logs), waits
until the model answers readiness checks, and returns a :class:`PeerServer`: the inference port,
the PIDs of the whole process tree (for CPU accounting) and ``stop()``, which ends exactly what
was started.

* ``torchserve``: ``torch-model-archiver`` packs ``torchserve_handler.py``, ``peer_vision.py``, the
  graph and its manifest (no-archive format); ``torchserve --foreground`` runs the Java frontend
  with a private ``config.properties`` (batch 32, max delay 5 ms, one worker, one netty thread
  each side, quiet log4j2 config), which starts one Python backend worker. Stopped with
  ``torchserve --stop`` (its pid file lives in the private ``TMPDIR``), then whatever is left.
* ``pytriton``: ``pytriton_server.py`` (Triton binary, Python backend stub, the ``@batch``
  function in the script's process). Stopped with SIGTERM (PyTriton's orderly stop), then
  whatever is left.

:func:`request` builds one request per peer and payload kind (``KINDS``) for a PNG: path,
content type, extra headers and body (``PeerRequest.loadgen`` as a ``benchmarks.loadgen.Request``,
whose extra headers carry Triton's ``Inference-Header-Content-Length``); :meth:`PeerRequest.raw`
gives the full HTTP/1.1 request bytes for a plain socket.
:func:`parse_answer` reads either peer's answer into (index, label, probability) rows.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import psutil

from benchmarks.loadgen import Request
from benchmarks.peers import versions

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MODEL = "fashion-vit"
MODEL_DIR = ROOT / "model_repository" / MODEL / "1"
READY_TIMEOUT_S = 180.0
#: payload kinds each peer speaks
KINDS = {"torchserve": ("json", "multipart"), "pytriton": ("json", "v2-binary")}
MULTIPART_BOUNDARY = "peer-image-boundary-5c1f"

#: the JVM: 1 GiB heap, serial GC, as if on one core (thread pools sized from it), the fewest JIT
#: compiler threads, no hsperfdata file
JVM_OPTIONS = "-Xmx1g -XX:+UseSerialGC -XX:ActiveProcessorCount=1 -XX:CICompilerCount=2 -XX:-UsePerfData"
#: warnings and errors only, on stdout (the peer's log file): no access, metrics or model logs
LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="warn"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the peer binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str) -> tuple[int, bytes]:
    """GET on 127.0.0.1 → (status, body); (0, b"") when nothing answers yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError):  # refused, reset, timed out, or not HTTP yet
        return 0, b""


@dataclass
class PeerServer:
    """A started peer: ``port`` takes inference requests; ``ports`` lists every port it bound.

    The root process leads its own session and is not reaped before :meth:`stop`, so its PID, the
    id of that session, cannot be reused meanwhile: everything in the session is the peer's."""

    name: str
    port: int
    ports: dict[str, int]
    process: subprocess.Popen[bytes]
    workdir: Path
    env: dict[str, str]
    stop_command: list[str] | None = None  # else SIGTERM to the root process
    log: Path = field(init=False)
    stopped: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.log = self.workdir / "server.log"

    def running(self) -> bool:
        """Whether the root process has not exited (checked without reaping it)."""
        if self.stopped:
            return False
        return os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None

    def processes(self) -> list[psutil.Process]:
        """The root process and all its descendants that are alive now."""
        if self.stopped:
            return []
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def pids(self) -> list[int]:
        """PIDs of the whole process tree, for CPU accounting (it can change: call it again)."""
        return [p.pid for p in self.processes()]

    def session(self) -> list[psutil.Process]:
        """Every process of the root's session, orphans included."""
        members = []
        for p in psutil.process_iter():
            with contextlib.suppress(OSError):  # gone meanwhile
                if os.getsid(p.pid) == self.process.pid:
                    members.append(p)
        return members

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the root process to exit (without reaping it): has it?"""
        deadline = time.monotonic() + timeout_s
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        return not self.running()

    def stop(self, timeout_s: float = 60.0) -> None:
        """The peer's own orderly stop, then SIGTERM and SIGKILL to anything left of its tree (as
        it was before the stop) and of its session; the root is reaped last. Idempotent."""
        if self.stopped:
            return
        tree = self.processes()
        if self.running():
            if self.stop_command is not None:
                subprocess.run(self.stop_command, env=self.env, cwd=self.workdir, timeout=timeout_s,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)  # fmt: skip
            else:
                self.process.send_signal(signal.SIGTERM)
            self.wait(timeout_s)
        root = self.process.pid
        left = [p for p in {p.pid: p for p in [*tree, *self.session()]}.values() if p.pid != root]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.running():
                self.process.send_signal(sig)
            for p in left:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(sig)
            _, left = psutil.wait_procs(left, timeout=5)
            self.wait(5)
        self.process.wait()
        self.stopped = True

    def __enter__(self) -> PeerServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _fresh(directory: Path) -> Path:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def _launch(name: str, cmd: list[str], ports: dict[str, int], workdir: Path, env: dict[str, str],
            stop_command: list[str] | None = None) -> PeerServer:  # fmt: skip
    with (workdir / "server.log").open("wb") as log:
        process = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    return PeerServer(name, ports["inference"], ports, process, workdir, env, stop_command)


def _wait_ready(server: PeerServer, checks: list[Callable[[], bool]], timeout_s: float) -> None:
    """Until every check holds in turn, or fail with the log's tail (and stop the peer)."""
    deadline = time.monotonic() + timeout_s
    pending = list(checks)
    try:
        while pending:
            if not server.running() or time.monotonic() > deadline:
                why = "exited" if not server.running() else f"not ready after {timeout_s:.0f} s"
                server.stop()
                tail = "\n".join(server.log.read_text(errors="replace").splitlines()[-40:])
                raise RuntimeError(f"{server.name} {why}; end of {server.log}:\n{tail}")
            if pending[0]():
                pending.pop(0)
            else:
                time.sleep(0.25)
    except BaseException:  # Ctrl-C or a SIGTERM while it starts: it is in a session of its own
        server.stop()
        raise


def _answers_200(port: int, path: str) -> Callable[[], bool]:
    return lambda: http_get(port, path)[0] == 200


def _workers_ready(management_port: int) -> Callable[[], bool]:
    """TorchServe's management API lists the model with all its workers READY."""

    def check() -> bool:
        status, body = http_get(management_port, f"/models/{MODEL}")
        workers = json.loads(body)[0]["workers"] if status == 200 else []
        return bool(workers) and all(w["status"] == "READY" for w in workers)

    return check


def start_torchserve(
    root: Path = ROOT, timeout_s: float = READY_TIMEOUT_S, model_dir: Path = MODEL_DIR
) -> PeerServer:
    python = versions.venv("torchserve", root)
    bindir = python.parent
    workdir = _fresh(root / "build" / "peers" / "torchserve")
    store, tmp = workdir / "model-store", workdir / "tmp"
    store.mkdir()
    tmp.mkdir()
    archive = [str(bindir / "torch-model-archiver"), "--model-name", MODEL, "--version", "1.0",
               "--handler", str(HERE / "torchserve_handler.py"),
               "--serialized-file", str(model_dir / "model.onnx"),
               "--extra-files", f"{model_dir / 'manifest.json'},{HERE / 'peer_vision.py'}",
               "--export-path", str(store), "--archive-format", "no-archive"]  # fmt: skip
    subprocess.run(archive, check=True, cwd=workdir)
    names = ("inference", "management", "metrics", "grpc_inference", "grpc_management")
    ports = {name: free_port() for name in names}
    models = {MODEL: {"1.0": {"defaultVersion": True, "marName": MODEL, "minWorkers": 1, "maxWorkers": 1,
                              "batchSize": 32, "maxBatchDelay": 5, "responseTimeout": 120}}}  # fmt: skip
    properties = {
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_inference_port": ports["grpc_inference"],
        "grpc_management_address": "127.0.0.1",
        "grpc_management_port": ports["grpc_management"],
        "disable_token_authorization": "true",
        "enable_model_api": "true",
        "model_store": store,
        "load_models": MODEL,
        "models": json.dumps(models),
        "default_workers_per_model": 1,
        "install_py_dep_per_model": "false",
        "number_of_gpu": 0,
        "number_of_netty_threads": 1,
        "netty_client_threads": 1,
        "job_queue_size": 1000,
        "disable_system_metrics": "true",
        "vmargs": JVM_OPTIONS,
    }
    config = workdir / "config.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in properties.items()))
    (workdir / "log4j2.xml").write_text(LOG4J2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
    # the pid file of ``torchserve --stop`` (tempfile.gettempdir()) and the JVM's java.io.tmpdir,
    # where the worker's Unix socket lives: both private
    env |= {"TMPDIR": str(tmp), "TEMP": str(tmp)}
    cmd = [str(bindir / "torchserve"), "--start", "--foreground", "--ncs", "--ts-config", str(config),
           "--model-store", str(store), "--log-config", str(workdir / "log4j2.xml")]  # fmt: skip
    stop = [str(bindir / "torchserve"), "--stop", "--foreground"]
    server = _launch("torchserve", cmd, ports, workdir, env, stop)
    _wait_ready(server, [_answers_200(server.port, "/ping"), _workers_ready(ports["management"])], timeout_s)
    return server


def start_pytriton(
    root: Path = ROOT, timeout_s: float = READY_TIMEOUT_S, model_dir: Path = MODEL_DIR
) -> PeerServer:
    python = versions.venv("pytriton", root)
    workdir = _fresh(root / "build" / "peers" / "pytriton")
    ports = {"inference": free_port(), "grpc": free_port(), "metrics": free_port()}
    cmd = [str(python), str(HERE / "pytriton_server.py"), "--model-dir", str(model_dir),
           "--http-port", str(ports["inference"]), "--grpc-port", str(ports["grpc"]),
           "--metrics-port", str(ports["metrics"]), "--workspace", str(workdir / "workspace")]  # fmt: skip
    server = _launch("pytriton", cmd, ports, workdir, dict(os.environ))
    ready = [
        _answers_200(server.port, "/v2/health/ready"),
        _answers_200(server.port, f"/v2/models/{MODEL}/ready"),
    ]
    _wait_ready(server, ready, timeout_s)
    return server


def start(
    name: str, root: Path = ROOT, timeout_s: float = READY_TIMEOUT_S, model_dir: Path = MODEL_DIR
) -> PeerServer:
    """Start the peer ``name`` (a key of ``KINDS``) on the ViT version in ``model_dir`` and wait
    until it is ready."""
    starters = {"torchserve": start_torchserve, "pytriton": start_pytriton}
    return starters[name](root, timeout_s, model_dir)


# -- requests and answers --------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerRequest:
    """One POST: ``headers`` are those beyond Host, Content-Type and Content-Length."""

    path: str
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()

    def loadgen(self) -> Request:
        """As ``benchmarks.loadgen.Request``, for its closed loop."""
        return Request(self.path, self.body, self.content_type, self.headers)

    def raw(self, host: str = "127.0.0.1") -> bytes:
        """The whole HTTP/1.1 request (keep-alive), ready for a socket."""
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {host}", f"Content-Type: {self.content_type}",
                 f"Content-Length: {len(self.body)}", *(f"{k}: {v}" for k, v in self.headers)]  # fmt: skip
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def request(peer: str, kind: str, png: bytes) -> PeerRequest:
    """The request that classifies one PNG on ``peer`` in payload ``kind`` (see ``KINDS``)."""
    if kind not in KINDS[peer]:
        raise ValueError(f"{peer} speaks {KINDS[peer]}, not {kind!r}")
    text = base64.b64encode(png).decode()
    if peer == "torchserve":
        path = f"/predictions/{MODEL}"
        if kind == "json":
            return PeerRequest(path, json.dumps({"image": text}).encode(), "application/json")
        part = (f"--{MULTIPART_BOUNDARY}\r\n"
                'Content-Disposition: form-data; name="image"; filename="image.png"\r\n'
                "Content-Type: image/png\r\n\r\n").encode()  # fmt: skip
        body = part + png + f"\r\n--{MULTIPART_BOUNDARY}--\r\n".encode()
        return PeerRequest(path, body, f"multipart/form-data; boundary={MULTIPART_BOUNDARY}")
    path = f"/v2/models/{MODEL}/infer"
    if kind == "json":
        payload = {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]}
        return PeerRequest(path, json.dumps(payload).encode(), "application/json")
    tensor = struct.pack("<I", len(png)) + png  # one BYTES element: little-endian length, then bytes
    header = {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                          "parameters": {"binary_data_size": len(tensor)}}]}  # fmt: skip
    head = json.dumps(header).encode()
    return PeerRequest(path, head + tensor, "application/octet-stream",
                       (("Inference-Header-Content-Length", str(len(head))),))  # fmt: skip


def parse_answer(peer: str, body: bytes) -> list[tuple[int, str, float]]:
    """A peer's answer for one image → its top-5 rows (index, label, probability)."""
    answer = json.loads(body)
    if peer == "torchserve":
        return [(p["index"], p["label"], p["probability"]) for p in answer["predictions"]]
    outputs = {o["name"]: o["data"] for o in answer["outputs"]}
    return list(zip(outputs["indices"], outputs["labels"], outputs["probabilities"], strict=True))
