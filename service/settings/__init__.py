"""The service's one settings object, read once at start (environment prefix ``ATTN_``); what one
request and one client may do is its section ``limits`` (:mod:`service.settings.limits`).

Every knob has a default that runs the demo on a laptop; a bad value fails at start with a
message naming the setting. Only this module reads the environment. Nested values use ``__``:
``ATTN_LIMITS__MAX_BEAM_SIZE=8``; per-model batching is JSON:
``ATTN_MODEL_OVERRIDES='{"fashion-vit": {"max_batch_size": 64}}'``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.settings.capacity import max_ongoing_requests, max_queued_requests
from service.settings.consistency import (
    DIRECT_PORTS,
    batching_conflict,
    direct_port_clash,
    placement_conflict,
)
from service.settings.fields import a_cluster, an_address, an_origin, token_is_usable
from service.settings.limits import Limits
from service.settings.ray_environment import ray_environment

__all__ = ["DEFAULT_GPU_SHARE", "DIRECT_PORTS", "GPU_MAX_BATCH_SIZE", "Autoscaling", "Batching", "Limits",
           "ModelOverride", "Settings", "max_ongoing_requests", "max_queued_requests"]  # fmt: skip

GPU_MAX_BATCH_SIZE = 128
#: a replica's share of a GPU when CUDA is asked for and no share is set: four serving replicas,
#: or the three demo models' deployments (ray-proxy / ray-direct), on one GPU
DEFAULT_GPU_SHARE = 0.25


def _placeable(share: float) -> float:
    """Ray places a fraction of one GPU or whole GPUs, never 1.5 (``num_gpus``)."""
    if share > 1 and not share.is_integer():
        raise ValueError("a GPU share is a fraction of one GPU (0 < share ≤ 1) or a whole number of GPUs")
    return share


#: what Ray reserves of a GPU per replica; replicas whose shares add up to ≤ 1 share a GPU
GpuShare = Annotated[float, Field(gt=0, le=8), AfterValidator(_placeable)]


class Batching(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown name (a typo) stops the start
    max_batch_size: int = Field(32, ge=1, le=4096)
    #: how long a batch that is not full waits for more; 0 (the default): an idle model starts a
    #: lone request at once, a busy one takes what accumulated while it computed
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=10)
    #: translation models with a scheduler: positions the running batch may hold, rows × (longest
    #: source + longest target limit) as rows are padded to the widest; None: max_batch_size ×
    #: (the model's max source + max target tokens)
    token_budget: int | None = Field(None, ge=1, le=10_000_000)


class ModelOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown name (a typo) stops the start
    max_batch_size: int | None = Field(None, ge=1, le=4096)
    batch_wait_timeout_s: float | None = Field(None, ge=0, le=10)
    token_budget: int | None = Field(None, ge=1, le=10_000_000)
    num_replicas: int | None = Field(None, ge=1, le=1024)
    #: ray-proxy / ray-direct: the GPU share of each replica of this model's deployment (a small
    #: model can take less of a GPU than a large one); in-replica replicas hold every model, so
    #: only the global num_gpus_per_replica applies there
    num_gpus_per_replica: GpuShare | None = None


class Autoscaling(BaseModel):
    """Ray Serve autoscaling: of each model deployment (Ray-ingress frontends, on the requests Ray
    routes) or of the serving replicas (in-replica, on the requests each replica holds:
    ``service/hosting/autoscaling.py``)."""

    model_config = ConfigDict(extra="forbid")  # an unknown name (a typo) stops the start
    min_replicas: int = Field(1, ge=1, le=1024)
    max_replicas: int = Field(4, ge=1, le=1024)
    #: ongoing requests per replica Ray aims for; a couple of full batches keeps replicas busy
    target_ongoing_requests: float = Field(64, gt=0)
    #: more demand must last this long before a replica is added
    upscale_delay_s: float = Field(10.0, ge=0)
    #: less demand must last this long before a replica goes
    downscale_delay_s: float = Field(60.0, ge=0)
    #: how far back a replica's reported load is averaged. Above 10 s: Ray Serve 2.60 warns that a
    #: window no longer than its (deprecated) 10 s metrics interval will be refused in a future
    #: release, although replicas here report every second
    #: (at least 1 s: Ray records each replica's load every fifth of it)
    look_back_period_s: float = Field(15.0, ge=1, le=3600)

    @model_validator(mode="after")
    def _bounds(self) -> Self:  # here, so that the refusal names ATTN_AUTOSCALING
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATTN_", env_nested_delimiter="__", extra="forbid")

    repository: Path = Path("model_repository")
    #: models to serve (default: every valid model in the repository, highest version)
    models: list[str] | None = None
    host: Annotated[str, AfterValidator(an_address)] = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(9000, ge=1, le=65535)
    #: largest gRPC message either way: full attention tensors exceed gRPC's 4 MiB default
    grpc_max_message_bytes: int = Field(64 * 1024 * 1024, ge=4 * 1024 * 1024, le=2**31 - 1)
    #: Ray's metrics export port: the service's and Ray Serve's series are scraped here
    metrics_port: int = Field(8080, ge=1, le=65535)
    #: how Ray's processes hand their metrics to Ray's metrics agent. False: Ray's OpenCensus
    #: path, where a histogram reaches the agent as bucket counts; True: Ray 2.60's default
    #: OpenTelemetry path, whose agent replays every histogram observation one by one in Python
    #: (≈ 4 % of two cores at 32 clients, in a burst every 10 s). Same series either way
    #: (OpenTelemetry adds ``otel_scope_*`` labels). Unset: OpenCensus for in-replica,
    #: OpenTelemetry for the Ray-ingress frontends — there Ray Serve's proxy records its event-loop
    #: series with other tags than the replicas do, and Ray's OpenCensus export then fails every
    #: scrape with a 500 (so false is refused with them). Set in every Ray process's environment
    #: (``ray_environment``)
    ray_open_telemetry: bool | None = None
    #: seconds between passes of Ray Serve's control loop (``RAY_SERVE_CONTROL_LOOP_INTERVAL_S``,
    #: Ray's default 0.1; Ray's performance guide raises it for a busy controller). Every pass asks
    #: Ray's GCS for every node's resources: at 0.1 s the controller and the GCS took 46 of the 88 ms
    #: of CPU a second an idle service's processes use here, at 0.5 s 20 of 62
    #: (``make bench-idle``). Under load the two were level within noise (two replicas, four
    #: interleaved rounds: images and beam-4 translations at 64 clients); a dead replica is
    #: replaced, an autoscaling decision made and a deploy step taken up to one interval later
    #: (start-up: 6.9 against 6.7 s; recovery after a replica's kill unchanged: 5.5 / 7.5 against
    #: 6.0 / 8.0 s). Set in every Ray process's environment (``ray_environment``)
    serve_control_loop_s: float = Field(0.5, ge=0.05, le=10)  # below 0.05 s the controller spins
    #: seconds between the exports of every Ray process's metrics to Ray's agent, which answers
    #: scrapes (``RAY_metrics_report_interval_ms``; Ray's default 10, floor 1). At 10 s deploy/'s
    #: Prometheus (a scrape every 5 s) saw series up to 10 s old; at 5 s an idle service takes
    #: 8.9-9.8 % of a core against 8.7-9.1 %. Set in every Ray process (``ray_environment``)
    metrics_export_s: float = Field(5.0, ge=1, le=60)
    #: None: start a private local Ray (``make serve``); "auto" or "host:port": join that cluster
    #: (containers: deploy/entrypoint.sh starts a head; workers join it and take replicas)
    ray_address: Annotated[str | None, AfterValidator(a_cluster)] = None
    num_cpus: int | None = Field(None, ge=1)
    #: who answers HTTP and gRPC (benchmarks/results/ compares them):
    #: "in-replica" — every serving replica holds all models and listens on http_port/grpc_port
    #: itself (SO_REUSEPORT: replicas on a node share the port, the kernel spreads connections);
    #: one hop, no proxy actor. "ray-proxy" — Ray Serve's HTTP/gRPC proxy → ingress deployment →
    #: one deployment per model (per-model replicas and autoscaling; two hops per request).
    #: "ray-direct" — as ray-proxy, but each ingress replica also serves HTTP/gRPC itself on a
    #: port of its own from http_port+1 / grpc_port+1 up (one port per replica; the proxy stays
    #: on http_port). Ray's HAProxy ingress is not offered: it binds all interfaces.
    frontend: Literal["in-replica", "ray-proxy", "ray-direct"] = "in-replica"
    #: where Ray Serve runs HTTP/gRPC proxies (ray-proxy frontend): every node or the head only
    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"
    #: spread replicas: at most this many of one deployment per node
    max_replicas_per_node: int | None = Field(None, ge=1, le=1024)
    num_replicas: int = Field(1, ge=1, le=1024)
    #: when set, replicas autoscale between its bounds instead of staying at num_replicas
    autoscaling: Autoscaling | None = None
    #: logical CPUs Ray reserves per model replica (fractional: the demo's 3 models share 2 cores)
    replica_num_cpus: float = Field(0.5, ge=0, le=64)
    #: ONNX Runtime's execution providers in order of preference; CUDA falls back to the CPU
    #: (logged) where the onnxruntime build has no CUDA provider or CUDA cannot start
    providers: list[Literal["CUDAExecutionProvider", "CPUExecutionProvider"]] = ["CPUExecutionProvider"]
    #: the share of a GPU Ray reserves for each replica when CUDA is asked for — the in-replica
    #: frontend's serving replicas, or each model deployment's replicas (Ray frontends). Shares
    #: add up per GPU: 0.25 lets four replicas share one. None: DEFAULT_GPU_SHARE. Without CUDA
    #: in providers no GPU is reserved, whatever this says
    num_gpus_per_replica: GpuShare | None = None
    #: ORT intra-op threads per session; on a 2-core machine 1 beat 2 (one replica per core)
    intra_op_threads: int = Field(1, ge=1, le=256)
    #: how long a thread of a serving process may keep Python's interpreter lock while another
    #: waits for it (``sys.setswitchinterval``; CPython's default 5 ms). A model's batch thread,
    #: back from ONNX Runtime, needs the lock to hand its answers over and start the next batch;
    #: with the event loop busy decoding requests it waited up to the whole interval. 0.5 ms:
    #: interleaved A/Bs on the demo image model, +3 to +14 % images/s at 32 clients and +9 to +13 %
    #: at 64, up to 4 % less CPU per image; translation through a decode process and the tiny
    #: path unchanged within noise
    gil_switch_interval_ms: float = Field(0.5, ge=0.05, le=100)  # below 50 µs threads thrash the lock
    #: translation models decoded by the scheduler run their decode loop in a process of their own
    #: (one per model and replica), so its steps never wait for the serving event loop's
    #: interpreter lock; false keeps it on a thread of the serving process
    decode_process: bool = True
    batching: Batching = Batching()
    model_overrides: dict[str, ModelOverride] = {}
    limits: Limits = Limits()
    #: streamed translations: tokens chosen within this many ms of the last token event are sent
    #: together in the next one (the first token is sent at once, the answer as soon as it is
    #: ready). One display frame (16 ms) is invisible to a reader and lets a busy replica write a
    #: few chunks per answer instead of one per token; 0 sends every decoder step's tokens
    stream_interval_ms: float = Field(16.0, ge=0, le=1000)
    #: histogram buckets (seconds) for latency metrics
    latency_buckets_s: list[float] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                      0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]  # fmt: skip
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Ray Serve's per-request access log lines (method, route, status, latency — never content)
    access_log: bool = False
    #: in-replica frontend: requests per keep-alive connection before the replica closes it, so
    #: clients reconnect and new or restarted replicas get their share (nginx's keepalive_requests)
    keepalive_requests: int = Field(100, ge=0)
    #: in-replica frontend: how long a client connection may live before the replica asks its
    #: client to reconnect — an HTTP keep-alive connection with ``Connection: close`` on its first
    #: answer after this age, a gRPC connection with a GOAWAY (gRPC's MAX_CONNECTION_AGE, ±10 %
    #: jitter; calls and streams in flight keep it until they end). Replicas share
    #: their ports per connection, so without it a gRPC channel (one connection for its whole
    #: life) never reaches a replica that joins or restarts, nor does an HTTP client too slow to
    #: reach ``keepalive_requests``. nginx's keepalive_time, Envoy's max_connection_duration.
    #: 0: no limit
    connection_max_age_s: float = Field(5.0, ge=0, le=2_147_483)  # gRPC takes it in int32 ms
    #: inference answers at least this long are compressed (gzip or deflate) for a client whose
    #: ``Accept-Encoding`` takes it, as Triton's HTTP endpoint does; a top-5 classification is
    #: shorter, attention maps as arrays are longer. 0: never compressed. Compressed request
    #: bodies (``Content-Encoding``) are taken whatever this says
    compress_min_bytes: int = Field(1024, ge=0)
    #: on stop (Ctrl-C, SIGTERM, a replica scaled down or replaced): how long requests in flight
    #: may finish before their connections are closed. Short for a laptop; in production set it
    #: to your longest request (e.g. 30) and give the orchestrator's grace period a few s more
    drain_s: float = Field(2.0, ge=0, le=600)
    #: in-replica: on stop, how long a replica first answers readiness 503 (and gRPC health
    #: NOT_SERVING) while it still serves, before it closes its listeners and drains: load
    #: balancers that probe readiness (a Kubernetes Service) stop sending it new connections
    #: first, where a closed port would refuse them. deploy/kuberay sets it above the probe's
    #: period × failures; 0 locally
    unready_s: float = Field(0.0, ge=0, le=60)
    #: a Ray node started with ``ray start --block`` and told to stop (SIGTERM: a pod deleted, a
    #: container stopped) drains this long at most: Ray Serve starts its replicas' replacements
    #: on other nodes and stops them gracefully once those run, or ``drain_s`` + 2 before the end
    #: where no node has room (``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S``, set by the entrypoint
    #: and the images; 0: no drain). None: 60 s, or ``unready_s`` + ``drain_s`` + 31
    #: (:attr:`node_drain_timeout_s`)
    node_drain_s: float | None = Field(None, ge=0, le=3600)
    #: in-replica frontend: how often each replica looks for a newer version directory of the
    #: models it serves and swaps it in without a failed request (0: only on redeploy)
    repository_poll_s: float = Field(10.0, ge=0)
    #: when set, every HTTP route but health and every gRPC method but ServerLive/ServerReady and
    #: grpc.health.v1's needs ``Authorization: Bearer <token>`` (metrics are Ray's port, outside
    #: the app). At least 16 printable ASCII characters, no spaces: what an HTTP header carries
    api_token: Annotated[SecretStr | None, AfterValidator(token_is_usable)] = None
    #: web pages of other origins whose browsers' POSTs are taken (``https://app.example.com``):
    #: every other site's are refused 403 (``service/api/cross_origin.py``)
    trusted_origins: list[Annotated[str, AfterValidator(an_origin)]] = []

    @property
    def serve_logging(self) -> dict[str, object]:
        """Ray Serve's logging config for the proxies, the ingress and every model deployment."""
        return {"log_level": self.log_level, "enable_access_log": self.access_log}

    @property
    def open_telemetry(self) -> bool:
        """Ray's metrics path (``ray_open_telemetry``, or the frontend's default when unset)."""
        return self.frontend != "in-replica" if self.ray_open_telemetry is None else self.ray_open_telemetry

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.repository.is_dir():
            raise ValueError(f"repository: {self.repository} is not a directory (run `make models` first)")
        if self.ray_open_telemetry is False and self.frontend != "in-replica":
            raise ValueError(
                f"ray_open_telemetry: false with the {self.frontend} frontend: Ray's OpenCensus export fails "
                "every metrics scrape (500) once Ray Serve's proxy reports; leave it unset"
            )
        if len({self.http_port, self.grpc_port, self.metrics_port}) < 3:
            raise ValueError("http_port, grpc_port and metrics_port must differ")
        if self.frontend == "ray-direct" and (clash := direct_port_clash(self)):
            raise ValueError(clash)
        if conflict := placement_conflict(self) or batching_conflict(self):
            raise ValueError(conflict)
        buckets = self.latency_buckets_s  # Ray's histograms refuse a bound ≤ 0 in every replica
        if not buckets or not all(0 < b < math.inf for b in buckets) or buckets != sorted(set(buckets)):
            raise ValueError(
                "latency_buckets_s must be a non-empty list of positive, finite, strictly ascending seconds"
            )
        prefix = self.model_config.get("env_prefix", "")
        fields = type(self).model_fields
        unknown = sorted(
            key
            for key in os.environ
            if key.upper().startswith(prefix) and key[len(prefix) :].split("__")[0].lower() not in fields
        )
        if unknown:
            raise ValueError(f"unknown settings in the environment (a typo?): {', '.join(unknown)}")
        return self

    def batching_for(self, model: str) -> Batching:
        """The model's override, else the global setting; on a GPU an unset global batch size
        becomes ``GPU_MAX_BATCH_SIZE`` — a GPU needs larger batches to be busy."""
        override = self.model_overrides.get(model, ModelOverride())
        default = self.batching.max_batch_size
        if self.use_gpu and "max_batch_size" not in self.batching.model_fields_set:
            default = GPU_MAX_BATCH_SIZE
        return Batching(
            max_batch_size=override.max_batch_size or default,
            token_budget=override.token_budget or self.batching.token_budget,
            batch_wait_timeout_s=(
                override.batch_wait_timeout_s
                if override.batch_wait_timeout_s is not None
                else self.batching.batch_wait_timeout_s
            ),
        )

    def replicas_for(self, model: str) -> int:
        override = self.model_overrides.get(model)
        return override.num_replicas if override and override.num_replicas else self.num_replicas

    def scaling_for(self, model: str | None) -> dict[str, object]:
        """Ray Serve's replica options for a model deployment (``None``: the serving replicas
        of the in-replica frontend, which hold every model)."""
        scaling: dict[str, object] = {
            "num_replicas": self.replicas_for(model) if model else self.num_replicas
        }
        if self.autoscaling is not None:
            config: dict[str, object] = self.autoscaling.model_dump()
            if model is None:  # the serving replicas: on what they hold, not on what Ray routes
                config["policy"] = {"policy_function": "service.hosting.autoscaling:held_requests_policy"}
            scaling = {"autoscaling_config": config}
        if self.max_replicas_per_node is not None:
            scaling["max_replicas_per_node"] = self.max_replicas_per_node
        return scaling

    def shutdown_options(self) -> dict[str, float]:
        """Ray Serve's stop options for every deployment: a stopping replica waits for its Ray-routed
        requests in steps of 0.5 s (the first step whole: Ray sleeps before it counts), then stops
        its servers — the in-replica stop takes at most ``unready_s`` + ``drain_s`` + 0.5 s —, and
        is killed ``unready_s`` + ``drain_s`` + 2 s after it was asked to stop (+ 1 left no margin)."""
        timeout = self.unready_s + self.drain_s + 2
        return {"graceful_shutdown_wait_loop_s": 0.5, "graceful_shutdown_timeout_s": timeout}

    def gpu_share(self, model: str | None = None) -> float:
        """The GPU share Ray reserves per replica of a model's deployment (``None``: the in-replica
        frontend's serving replicas); 0 when CUDA is not asked for."""
        if not self.use_gpu:
            return 0.0
        override = self.model_overrides.get(model) if model else None
        if override is not None and override.num_gpus_per_replica is not None:
            return override.num_gpus_per_replica
        return self.num_gpus_per_replica or DEFAULT_GPU_SHARE

    def actor_options(self, model: str | None = None) -> dict[str, object]:
        """Ray's actor options for a replica of a model's deployment (``None``: the serving
        replicas of the in-replica frontend): its CPUs, and on CUDA its share of a GPU — so Ray
        places replicas on GPUs by share, several to a GPU."""
        actor: dict[str, object] = {"num_cpus": self.replica_num_cpus}
        if self.use_gpu:
            actor["num_gpus"] = self.gpu_share(model)
        return actor

    def ray_environment(self) -> dict[str, str]:
        """Environment variables every Ray process must see before it starts
        (``settings/ray_environment.py``)."""
        return ray_environment(self)

    @property
    def node_drain_timeout_s(self) -> float:
        """How long a Ray node told to stop waits for its replicas to move (deploy/kuberay's pods
        are given 15 s more before Kubernetes kills them): ``node_drain_s``, else 60 s or
        ``drain_s`` + 31."""
        default = max(60.0, self.unready_s + self.drain_s + 31)
        return self.node_drain_s if self.node_drain_s is not None else default

    @property
    def use_gpu(self) -> bool:
        """CUDA is asked for: replicas reserve a GPU share and batch larger by default."""
        return "CUDAExecutionProvider" in self.providers
