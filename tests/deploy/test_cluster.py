"""Scale-out: a second Ray node (``ray start`` on loopback, its own ports, stopped by PID) joins the
head; with at most one replica per node, the model's two replicas land on both and both serve. A
node stopped as Kubernetes stops a pod hands its replica to a third node without a failed request."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from service.settings import Settings
from tests.conftest import free_port, wait_deployed, wait_ready

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).with_name("ray")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started, by PID: SIGINT (graceful), then SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, 60), (signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


#: Ray 2.60 clusters started with `ray start` require token authentication; every process of
#: this one (head, worker, the service as a driver) shares one random token through the env.
#: RAY_enable_open_telemetry: the metrics export the service sets for the Ray it starts (README)
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_enable_open_telemetry": "0"}  # fmt: skip


def ray_node(
    args: list[str], log: Path, worker_ports: int, environment: dict[str, str], agent: int
) -> subprocess.Popen:
    """``worker_ports`` starts a 200-port range below free_port's range (20000–32767), so that no
    port picked for the node's other components can fall inside it; ``environment``: what the
    node's processes see besides :data:`RAY_ENV`; ``agent``: the dashboard agent's HTTP port."""
    ports = {
        "--node-manager-port": free_port(), "--object-manager-port": free_port(),
        "--metrics-export-port": free_port(), "--dashboard-agent-listen-port": agent,
        "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
    }  # fmt: skip
    cmd = [str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats",
           f"--min-worker-port={worker_ports}", f"--max-worker-port={worker_ports + 199}",
           *[f"{k}={v}" for k, v in ports.items()], *args]  # fmt: skip
    return subprocess.Popen(
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **environment, **RAY_ENV}
    )


@dataclass
class Cluster:
    url: str  # the service's HTTP
    gcs: int  # the head's port
    tmp: Path
    agents: list[int]  # each node's dashboard agent (HTTP)
    nodes: list[subprocess.Popen]  # `ray start --block` of the head and of the worker
    ports: int  # the first of the worker-port ranges: 200 ports a node, the third node's free
    image: dict[str, str]  # the environment a KubeRay pod's `ray start` reads from the image


@pytest.fixture(scope="module")
def two_node_service(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    gcs = free_port()
    # three disjoint ranges in 10100–19999: Ray's worker-port range, outside both the kernel's
    # ephemeral range and the 20000–32767 that free_port picks the other components' ports from
    ports = 10100 + (os.getpid() % 16) * 600
    # as KubeRay's pods, whose `ray start` reads the images' environment: Ray's metrics export and
    # Serve's control loop as the service sets them (test_images checks the images carry them)
    image = Settings(repository=tiny_repository).ray_environment()
    started: list[subprocess.Popen] = []
    agents = [free_port(), free_port()]
    try:
        head = ["--head", f"--port={gcs}", f"--temp-dir={tmp / 'ray'}", "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}"]  # fmt: skip
        started.append(ray_node(head, tmp / "head.log", ports, image, agents[0]))
        time.sleep(5)
        started.append(
            ray_node([f"--address=127.0.0.1:{gcs}"], tmp / "worker.log", ports + 200, image, agents[1])
        )
        http = free_port()
        env = {
            **os.environ, **RAY_ENV, "ATTN_REPOSITORY": str(tiny_repository),
            "ATTN_RAY_ADDRESS": f"127.0.0.1:{gcs}", "ATTN_MODELS": '["dates-bahdanau"]', "ATTN_NUM_REPLICAS": "2",
            "ATTN_MAX_REPLICAS_PER_NODE": "1", "ATTN_PROXY_LOCATION": "HeadOnly", "ATTN_HTTP_PORT": str(http),
            "ATTN_GRPC_PORT": str(free_port()), "ATTN_METRICS_PORT": str(free_port()),
        }  # fmt: skip
        service = subprocess.Popen([sys.executable, "-m", "service"], env=env, stdout=(tmp / "service.log").open("wb"),
                                   stderr=subprocess.STDOUT)  # fmt: skip
        started.append(service)
        url = f"http://127.0.0.1:{http}"
        wait_ready(
            f"{url}/readyz",
            service,
            240,
            lambda: str({p.name: p.read_text()[-1500:] for p in tmp.glob("*.log")}),
        )
        wait_deployed(tmp / "service.log", service, 240)
        yield Cluster(url, gcs, tmp, agents, started[:2], ports, image)
    finally:
        for proc in reversed(started):  # the service disconnects first, then the worker, then the head
            stop(proc)


def test_replicas_on_both_nodes_serve_requests(two_node_service: Cluster) -> None:
    nodes, replicas = set(), set()
    for i in range(40):
        body = requests.post(f"{two_node_service.url}/v1/models/dates-bahdanau/translate",
                             json={"text": f"{i % 28 + 1} mars 2001"}, timeout=60).json()  # fmt: skip
        assert body["translations"][0]["text"] == f"2001-03-{i % 28 + 1:02d}"
        nodes.add(body["metrics"]["node"])
        replicas.add(body["metrics"]["replica"])
    assert len(replicas) == 2 and len(nodes) == 2, (replicas, nodes)


def test_a_second_service_joining_the_cluster_is_refused_and_the_first_serves_on(
    two_node_service: Cluster, tiny_repository: Path
) -> None:
    """A second ``python -m service`` on the same cluster (other ports) replaced the first's app —
    its port went dark while its process still said "serving" — and a stop of either deleted the
    other's. Now it is refused, naming the app, and leaves the first alone. Its driver has no
    RAY_AUTH_MODE, only a token in reach, as ``ray start --head`` had: it joins by the head's rule
    (before, ray.init with an explicit address sent no token and failed after 20 s)."""
    env = {k: v for k, v in {**os.environ, **RAY_ENV}.items() if k != "RAY_AUTH_MODE"}
    env |= {"ATTN_REPOSITORY": str(tiny_repository), "ATTN_RAY_ADDRESS": f"127.0.0.1:{two_node_service.gcs}",
            "ATTN_MODELS": '["dates-bahdanau"]', "ATTN_HTTP_PORT": str(free_port()),
            "ATTN_GRPC_PORT": str(free_port()), "ATTN_METRICS_PORT": str(free_port())}  # fmt: skip
    second = subprocess.run(
        [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=180
    )
    assert second.returncode == 2, second.stderr[-3000:]
    assert "already serves an application named 'attention'" in second.stderr, second.stderr[-3000:]
    for i in range(6):  # the first still serves, on both nodes' replicas
        body = requests.post(f"{two_node_service.url}/v1/models/dates-bahdanau/translate",
                             json={"text": f"{i + 1} mars 2001"}, timeout=60).json()  # fmt: skip
        assert body["translations"][0]["text"] == f"2001-03-{i + 1:02d}"


def test_every_node_answers_the_health_check_the_kuberay_manifests_probe(two_node_service: Cluster) -> None:
    """deploy/kuberay's liveness (and the head's readiness) probes GET the dashboard agent's
    /api/healthz (test_images): on a node started with ``ray start``, as KubeRay starts its pods,
    it answers 200 with the raylet's and, on the head, the GCS's health."""
    head, worker = (
        requests.get(f"http://127.0.0.1:{port}/api/healthz", timeout=10) for port in two_node_service.agents
    )
    assert head.status_code == 200 and worker.status_code == 200, (head.text, worker.text)
    assert head.text == "raylet: success\ngcs: success", head.text
    assert worker.text == "raylet: success\ngcs: success (no local gcs)", worker.text


def test_a_worker_pod_stopped_hands_its_replica_over_without_a_failed_request(
    two_node_service: Cluster,
) -> None:
    """A Kubernetes pod deletion sends SIGTERM to the pod's ``ray start --block``. Ray marks its
    node draining (``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S``); Ray Serve starts a replacement
    replica on another node and stops the draining one gracefully once it runs — the in-replica
    drain answers what that replica holds —, and the node's processes end once it is idle. Here a
    third node takes the replacement. Under concurrent keep-alive clients no request fails, and
    the node stops well before its drain timeout. Last in the module: it takes the worker away."""
    cluster = two_node_service
    agent = free_port()
    third = ray_node([f"--address=127.0.0.1:{cluster.gcs}"], cluster.tmp / "third.log", cluster.ports + 400,
                     cluster.image, agent)  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{agent}/api/healthz", third, 60, (cluster.tmp / "third.log").read_text)
        url = f"{cluster.url}/v1/models/dates-bahdanau/translate"
        outcomes: list[tuple[float, int | str, str]] = []  # (when, 200 or what failed, node or why)
        done = threading.Event()

        def client(i: int) -> None:
            day = i % 28 + 1
            with requests.Session() as session:  # keep-alive, as most clients
                while not done.is_set():
                    try:
                        answer = session.post(url, json={"text": f"{day} mars 2001"}, timeout=30)
                    except requests.RequestException as e:
                        outcomes.append((time.monotonic(), type(e).__name__, str(e)[:200]))
                        continue
                    if answer.status_code != 200:
                        outcomes.append((time.monotonic(), answer.status_code, answer.text[:200]))
                        continue
                    body = answer.json()
                    right = body["translations"][0]["text"] == f"2001-03-{day:02d}"
                    outcomes.append((time.monotonic(), 200 if right else "wrong", body["metrics"]["node"]))

        worker = cluster.nodes[1]
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client, i) for i in range(6)]
            try:
                time.sleep(3)
                sent = time.monotonic()
                worker.send_signal(signal.SIGTERM)  # what the kubelet sends a deleted pod
                worker.wait(timeout=90)
                stopped = time.monotonic() - sent
                time.sleep(3)
            finally:
                done.set()
            for future in futures:
                future.result()
        failed = [o for o in outcomes if o[1] != 200]
        before = {node for t, status, node in outcomes if status == 200 and t < sent}
        after = {node for t, status, node in outcomes if status == 200 and t > sent + stopped}
        print(
            f"stopped after {stopped:.1f} s; {len(outcomes)} requests; nodes before {before}, after {after}"
        )
        assert not failed, failed[:10]
        assert len(before) == 2 and len(after) == 2 and len(before & after) == 1, (before, after)
        # the replica moved: the node did not wait out its drain timeout (60 s) to stop
        log = (cluster.tmp / "worker.log").read_text(errors="replace")
        assert "Local node finished draining" in log, log[-3000:]
    finally:
        stop(third)
