"""Bad settings fail at start with a message naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import DEFAULT_GPU_SHARE, Settings


def test_defaults_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTN_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("ATTN_BATCHING__MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("ATTN_MODEL_OVERRIDES", '{"m": {"max_batch_size": 8, "num_replicas": 2}}')
    monkeypatch.setenv("ATTN_FRONTEND", "ray-proxy")  # a model's own replicas: a deployment per model
    s = Settings()
    assert s.host == "127.0.0.1" and s.http_port == 8000
    assert s.batching_for("other").max_batch_size == 64
    assert s.batching_for("m").max_batch_size == 8 and s.replicas_for("m") == 2
    assert not s.use_gpu
    assert s.keepalive_requests == 100 and s.connection_max_age_s == 5.0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ATTN_HTTP_PORT": "0"}, "http_port"),
        ({"ATTN_BATCHING__MAX_BATCH_SIZE": "0"}, "max_batch_size"),
        ({"ATTN_PROVIDERS": '["TPUExecutionProvider"]'}, "providers"),
        ({"ATTN_METRICS_PORT": "8000"}, "must differ"),
        ({"ATTN_REPOSITORY": "/no/such/dir"}, "repository"),
        ({"ATTN_LATENCY_BUCKETS_S": "[1, 0.5]"}, "ascending"),
        # Ray's histograms refuse these in every replica, after Ray is up: refused here, at start
        ({"ATTN_LATENCY_BUCKETS_S": "[0, 0.5, 1]"}, "positive"),
        ({"ATTN_LATENCY_BUCKETS_S": "[0.5, 0.5, 1]"}, "strictly ascending"),
        ({"ATTN_LATENCY_BUCKETS_S": "[]"}, "non-empty"),
        (
            {"ATTN_NO_SUCH_SETTING": "1"},
            r"\(a typo\?\): ATTN_NO_SUCH_SETTING ",
        ),  # as the environment spells it
        ({"ATTN_LIMITS__MAX_BEAMSIZE": "3"}, "max_beamsize"),  # nested names are checked too
        ({"ATTN_BATCHING__MAX_BATCHSIZE": "3"}, "max_batchsize"),
        ({"ATTN_MODEL_OVERRIDES": '{"m": {"max_batchsize": 64}}'}, "max_batchsize"),
        ({"ATTN_AUTOSCALING": '{"max_replica": 4}'}, "max_replica"),
        ({"ATTN_FRONTEND": "haproxy"}, "frontend"),
        ({"ATTN_CONNECTION_MAX_AGE_S": "-1"}, "connection_max_age_s"),
        (
            {"ATTN_FRONTEND": "ray-direct", "ATTN_HTTP_PORT": "18100", "ATTN_GRPC_PORT": "18105"},
            r"ATTN_HTTP_PORT\+1 … \+10 \(18101–18110\), which holds ATTN_GRPC_PORT",
        ),
        (
            {"ATTN_FRONTEND": "ray-direct", "ATTN_GRPC_PORT": "9000", "ATTN_METRICS_PORT": "9010"},
            "which holds ATTN_METRICS_PORT",
        ),
        (
            {"ATTN_AUTOSCALING": '{"min_replicas": 5, "max_replicas": 4}'},
            r"min_replicas \(5\) must not exceed",
        ),
        # accepted, each failed later: gRPC's int32 milliseconds (no replica became ready), Ray's
        # int32 queue length (at serve.run), a port range past 65535 (nothing served on it), a
        # wait every lone request waited out (504), autoscaling ignoring a replica count
        ({"ATTN_CONNECTION_MAX_AGE_S": "inf"}, "connection_max_age_s"),
        ({"ATTN_CONNECTION_MAX_AGE_S": "3000000"}, "connection_max_age_s"),
        ({"ATTN_LIMITS__MAX_QUEUED_REQUESTS": str(2**31)}, "max_queued_requests"),
        ({"ATTN_LIMITS__STREAM_WRITE_TIMEOUT_S": "1e-9"}, "stream_write_timeout_s"),
        ({"ATTN_FRONTEND": "ray-direct", "ATTN_HTTP_PORT": "65530"}, r"past port 65535; set ATTN_HTTP_PORT"),
        (
            {"ATTN_BATCHING__BATCH_WAIT_TIMEOUT_S": "5", "ATTN_LIMITS__REQUEST_TIMEOUT_S": "5"},
            r"batching.batch_wait_timeout_s \(5.0 s\) must be shorter than limits.request_timeout_s",
        ),
        (
            {
                "ATTN_MODEL_OVERRIDES": '{"m": {"batch_wait_timeout_s": 2}}',
                "ATTN_LIMITS__REQUEST_TIMEOUT_S": "1",
            },
            r"model_overrides.m.batch_wait_timeout_s",
        ),
        (
            {
                "ATTN_FRONTEND": "ray-proxy",
                "ATTN_AUTOSCALING": "{}",
                "ATTN_MODEL_OVERRIDES": '{"m": {"num_replicas": 3}}',
            },
            r"m.num_replicas with ATTN_AUTOSCALING",
        ),
        # below each floor: Ray's load records every 0.2 × the window, a spinning controller,
        # gRPC's preface timeout rounded to 0 ms, threads handing the lock over every microsecond
        ({"ATTN_AUTOSCALING": '{"look_back_period_s": 0.01}'}, "look_back_period_s"),
        ({"ATTN_SERVE_CONTROL_LOOP_S": "0.001"}, "serve_control_loop_s"),
        ({"ATTN_LIMITS__REQUEST_READ_TIMEOUT_S": "0.0001"}, "request_read_timeout_s"),
        ({"ATTN_GIL_SWITCH_INTERVAL_MS": "0.0001"}, "gil_switch_interval_ms"),
        ({"ATTN_HOST": ""}, "host"),  # every interface, unsaid
        ({"ATTN_RAY_ADDRESS": "local"}, "names no cluster"),  # Ray started a private one, unsaid
        ({"ATTN_RAY_ADDRESS": " "}, "names no cluster"),
    ],
)
def test_bad_settings_name_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict, message: str
) -> None:
    monkeypatch.setenv("ATTN_REPOSITORY", str(tmp_path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_autoscaling_bounds_out_of_order_are_refused_naming_their_variable(tmp_path: Path) -> None:
    """The start names each refused setting by its variable: a check across the whole settings
    object has none to name (it printed "settings: …")."""
    from service.__main__ import settings_errors

    with pytest.raises(ValidationError) as refused:
        Settings(repository=tmp_path, autoscaling={"min_replicas": 3, "max_replicas": 1})  # type: ignore[arg-type]
    assert settings_errors(refused.value).strip() == (
        "ATTN_AUTOSCALING: Value error, min_replicas (3) must not exceed max_replicas (1)"
    )


def test_frontends_set_rays_switches_before_ray_starts(tmp_path: Path) -> None:
    # in-replica: no Ray proxy at all; histograms reach Ray's metrics agent as bucket counts
    assert Settings(repository=tmp_path).ray_environment() == {
        "RAY_enable_open_telemetry": "0", "RAY_metrics_report_interval_ms": "5000",
        "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "60",
    }  # fmt: skip
    # a node told to stop (`ray start --block`) waits for its replicas' graceful stop and more
    longer = Settings(repository=tmp_path, drain_s=100).ray_environment()
    assert longer["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] == "131"
    short = Settings(repository=tmp_path, node_drain_s=10).ray_environment()  # compose's workers
    assert short["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] == "10"
    slower = Settings(repository=tmp_path, frontend="ray-proxy", serve_control_loop_s=2, metrics_export_s=2.5)
    assert slower.ray_environment()["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "2.0"
    assert slower.ray_environment()["RAY_metrics_report_interval_ms"] == "2500"
    for frontend in ("in-replica", "ray-proxy", "ray-direct"):
        otel = Settings(repository=tmp_path, frontend=frontend, ray_open_telemetry=True)
        assert otel.ray_environment()["RAY_enable_open_telemetry"] == "1"
    # unset, the Ray-ingress frontends take OpenTelemetry: Ray's OpenCensus export failed every
    # scrape (500) once its proxy reported; false is refused with them
    for frontend in ("ray-proxy", "ray-direct"):
        assert (
            Settings(repository=tmp_path, frontend=frontend).ray_environment()["RAY_enable_open_telemetry"]
            == "1"
        )
        with pytest.raises(ValidationError, match="OpenCensus export fails every metrics scrape"):
            Settings(repository=tmp_path, frontend=frontend, ray_open_telemetry=False)
    assert (
        Settings(repository=tmp_path, ray_open_telemetry=False).ray_environment()["RAY_enable_open_telemetry"]
        == "0"
    )
    direct = Settings(repository=tmp_path, frontend="ray-direct", http_port=8000, grpc_port=9000)
    env = direct.ray_environment()
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1" and env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"
    # the ingress replicas listen just above Ray's proxy, which keeps http_port / grpc_port
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "8001"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"] == "9001"
    scaled = Settings(repository=tmp_path, frontend="ray-proxy", autoscaling={"max_replicas": 3})
    assert scaled.scaling_for("m") == {"autoscaling_config": scaled.autoscaling.model_dump()}


def test_in_replica_autoscaling_scales_on_what_replicas_hold(tmp_path: Path) -> None:
    scaled = Settings(repository=tmp_path, autoscaling={"max_replicas": 3})
    config = scaled.scaling_for(None)["autoscaling_config"]
    assert config["policy"] == {"policy_function": "service.hosting.autoscaling:held_requests_policy"}  # type: ignore[index]
    assert scaled.ray_environment()["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] == "1"
    assert scaled.ray_environment()["RAY_enable_open_telemetry"] == "0"  # beside it, as always


def test_cuda_reserves_a_share_of_a_gpu_per_replica(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking for CUDA is enough: each replica then reserves DEFAULT_GPU_SHARE of a GPU unless
    ATTN_NUM_GPUS_PER_REPLICA says otherwise; without CUDA no GPU is reserved, whatever the share."""
    monkeypatch.setenv("ATTN_PROVIDERS", '["CUDAExecutionProvider", "CPUExecutionProvider"]')
    cuda = Settings(repository=tmp_path)
    assert cuda.use_gpu and cuda.gpu_share() == DEFAULT_GPU_SHARE == 0.25
    monkeypatch.setenv("ATTN_NUM_GPUS_PER_REPLICA", "0.5")
    monkeypatch.setenv("ATTN_MODEL_OVERRIDES", '{"big": {"num_gpus_per_replica": 1}}')
    shared = Settings(repository=tmp_path, frontend="ray-proxy")
    assert shared.gpu_share() == shared.gpu_share("small") == 0.5 and shared.gpu_share("big") == 1
    monkeypatch.setenv("ATTN_PROVIDERS", '["CPUExecutionProvider"]')
    cpu = Settings(repository=tmp_path, frontend="ray-proxy")
    assert not cpu.use_gpu and cpu.gpu_share() == cpu.gpu_share("big") == 0
    assert "num_gpus" not in cpu.actor_options()


@pytest.mark.parametrize(
    ("share", "valid"),
    [("0.25", True), ("1", True), ("2", True), ("0", False), ("-0.5", False), ("1.5", False), ("9", False)],
)
def test_gpu_shares_are_what_ray_can_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, share: str, valid: bool
) -> None:
    """A fraction of one GPU or whole GPUs (Ray places no 1.5), for the global share and a
    model's alike; the message names the setting."""
    for env in ({"ATTN_NUM_GPUS_PER_REPLICA": share},
                {"ATTN_MODEL_OVERRIDES": f'{{"m": {{"num_gpus_per_replica": {share}}}}}'}):  # fmt: skip
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            if valid:
                Settings(repository=tmp_path, providers=["CUDAExecutionProvider"], frontend="ray-proxy")
            else:
                with pytest.raises(ValidationError, match="num_gpus_per_replica"):
                    Settings(repository=tmp_path, providers=["CUDAExecutionProvider"], frontend="ray-proxy")


def test_placing_one_model_needs_a_deployment_per_model(tmp_path: Path) -> None:
    """A model's own replica count or GPU share means nothing where every replica holds every
    model (the in-replica default): refused with the settings to use, no longer ignored."""
    overrides = {"fashion-vit": {"max_batch_size": 64, "num_replicas": 3, "num_gpus_per_replica": 0.5}}
    with pytest.raises(
        ValidationError, match=r"fashion-vit\.num_gpus_per_replica, fashion-vit\.num_replicas"
    ):
        Settings(repository=tmp_path, model_overrides=overrides)
    Settings(repository=tmp_path, model_overrides={"fashion-vit": {"max_batch_size": 64}})
    assert (
        Settings(repository=tmp_path, model_overrides=overrides, frontend="ray-direct").replicas_for(
            "fashion-vit"
        )
        == 3
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        (
            {"ATTN_REPOSITORY": "/nonexistent"},
            "settings: Value error, repository: /nonexistent is not a directory",
        ),
        ({"ATTN_GRPC_PORT": "8000"}, "must differ"),
        (
            {"ATTN_BATCHING__MAX_BATCH_SIZE": "abc"},
            "ATTN_BATCHING__MAX_BATCH_SIZE: Input should be a valid integer",
        ),
        ({"ATTN_BOGUS_SETTING": "1"}, "(a typo?): ATTN_BOGUS_SETTING"),
    ],
)
def test_a_refused_start_names_the_setting_and_never_prints_the_token(
    env: dict[str, str],
    named: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """pydantic's text repeats the input — for a check across settings, all of it: the token
    (the last field) was printed whole to stderr, where container logs collect it."""
    from service.__main__ import main

    token = "S3cr3t-T0k3n-98765"
    for key, value in {"ATTN_API_TOKEN": token, "ATTN_REPOSITORY": str(tmp_path), **env}.items():
        monkeypatch.setenv(key, value)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert named in err and token not in err and "T0k3n" not in err, err
    monkeypatch.setenv("ATTN_API_TOKEN", "short-secret")
    assert main([]) == 2
    assert "ATTN_API_TOKEN: " in (err := capsys.readouterr().err) and "short-secret" not in err
    assert "at least 16 characters, not 12" in err and "items" not in err, err
    monkeypatch.setenv("ATTN_API_TOKEN", "sécret-with-an-accent-and-length")  # no header can carry it
    assert main([]) == 2
    assert "printable ASCII" in (err := capsys.readouterr().err) and "accent" not in err, err


def test_a_host_that_is_not_this_machine_s_is_named_as_such(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It was reported as a taken port ("is another service running?")."""
    import os

    from service.__main__ import main

    monkeypatch.setattr(os, "environ", os.environ.copy())  # main() sets Ray's variables
    monkeypatch.setenv("ATTN_HOST", "nosuchhost.invalid")
    monkeypatch.setenv("ATTN_REPOSITORY", str(Path(__file__).parent))  # any directory: refused earlier
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "is ATTN_HOST an address of this machine?" in err and "taken" not in err


def test_an_address_ray_cannot_read_is_one_error_line(tmp_path: Path) -> None:
    """Ray refuses "foo" with a ValueError before it starts anything: one line naming the
    variable, not a traceback."""
    import signal

    from service.__main__ import start_ray

    handler = signal.getsignal(signal.SIGTERM)  # ray.init sets its own before it reads the address
    try:
        why = start_ray(Settings(repository=tmp_path, ray_address="foo"))
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert why is not None and why.startswith("ATTN_RAY_ADDRESS=foo: ")


def test_an_image_models_queue_holds_a_whole_request_of_the_most_images(tmp_path: Path) -> None:
    """Each image of a KServe v2 request is one of the model's requests: a model working on 16
    at once with a queue of 1 refused a request of 64 images on an idle model. Its queue grows to
    hold one whole (Ray's router counts calls made together as queued until each has a replica);
    a translation (one request per KServe v2 call, whatever its texts) keeps the limit."""
    from service.hosting.ray_ingress import model_options
    from service.settings import max_ongoing_requests, max_queued_requests

    small = Settings(repository=tmp_path, limits={"max_queued_requests": 1},  # type: ignore[arg-type]
                     batching={"max_batch_size": 1})  # type: ignore[arg-type]  # fmt: skip
    assert max_ongoing_requests(small, "vit") == 16
    assert max_queued_requests(small, "image-classification") == 64
    assert max_queued_requests(small, "translation") == 1
    assert model_options("vit", small, "image-classification")["max_queued_requests"] == 64
    default = Settings(repository=tmp_path)  # 128 at once already hold 64 images: the limit stays
    assert max_queued_requests(default, "image-classification") == 128
