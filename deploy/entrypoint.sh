#!/bin/sh
# Container entrypoint.
#   attention-serve [serve] [OPTION...]   a Ray head on this container (GCS 6379, metrics
#                                         ATTN_METRICS_PORT, default 8080), then
#                                         `python -m service OPTION...` (--repository, --host, --port)
#   attention-serve worker                a Ray worker joining $RAY_HEAD (default serve:6379): more replicas
#   attention-serve COMMAND [ARG...]      runs COMMAND (a shell, `ray status`)
set -eu
# Ray 2.60 clusters authenticate with a token, read from ~/.ray/auth_token; docker-compose shares
# that directory with the workers through the ray-auth volume.
export RAY_AUTH_MODE=token

# Compose starts a worker with the head's container, not once the service is ready: Ray Serve
# never moves a running replica, so replicas deployed before the workers joined would all stay on
# the head. The head's token exists before its GCS listens.
wait_for_head() {
  python - "$1" <<'PY'
import socket, sys, time
host, _, port = sys.argv[1].rpartition(":")
deadline = time.monotonic() + 300
while True:
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        break
    except OSError as exc:
        if time.monotonic() > deadline:
            sys.exit(f"no Ray head answers at {sys.argv[1]} after 300 s: {exc}")
        time.sleep(1)
PY
}

# Ray and Ray Serve read some switches from the environment of each Ray process as it starts (the
# metrics export, the ray-direct frontend's ports, the autoscaling report interval:
# Settings.ray_environment), and
# `python -m service` sets them only for the processes it starts. The head's and the workers'
# start here, before it, so they get the same values here, from the same settings; a bad setting
# stops the container now, naming it.
ray_environment() {
  python -m service --ray-environment "$@"
}

start_head() {
  # `ray start --head` only reads a token: from an empty ~/.ray it fails with AuthenticationError.
  # --generate keeps one that exists (a restarted head keeps its workers' token)
  [ -s "$HOME/.ray/auth_token" ] || ray get-auth-token --generate >/dev/null
  exports=$(ray_environment "$@")  # an assignment: set -e stops here if it fails
  eval "$exports"
  ray start --head --port=6379 --metrics-export-port="${ATTN_METRICS_PORT:-8080}" \
    --include-dashboard=false --disable-usage-stats --num-cpus="${ATTN_NUM_CPUS:-$(nproc)}"
  export ATTN_RAY_ADDRESS=auto
  exec python -m service "$@"
}

case "${1:-serve}" in
  worker)
    exports=$(ray_environment)
    eval "$exports"
    wait_for_head "${RAY_HEAD:-serve:6379}"
    # the port Prometheus scrapes on every node, as on the head
    exec ray start --address="${RAY_HEAD:-serve:6379}" --metrics-export-port="${ATTN_METRICS_PORT:-8080}" \
      --block --disable-usage-stats
    ;;
  serve)
    shift $(($# > 0))
    start_head "$@"
    ;;
  -*)  # options for the service: `docker run attention-serve --repository /data/models`
    start_head "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
