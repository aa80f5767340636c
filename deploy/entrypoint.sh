#!/bin/sh
# Container entrypoint.
#   attention-serve            a Ray head on this container (GCS 6379, metrics 8080), then the service
#   attention-serve worker     a Ray worker joining $RAY_HEAD (default serve:6379): more replicas
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

case "${1:-serve}" in
  worker)
    wait_for_head "${RAY_HEAD:-serve:6379}"
    exec ray start --address="${RAY_HEAD:-serve:6379}" --metrics-export-port=8080 --block --disable-usage-stats
    ;;
  serve)
    # `ray start --head` only reads a token: from an empty ~/.ray it fails with AuthenticationError.
    # --generate keeps one that exists (a restarted head keeps its workers' token)
    [ -s "$HOME/.ray/auth_token" ] || ray get-auth-token --generate >/dev/null
    ray start --head --port=6379 --metrics-export-port="${ATTN_METRICS_PORT:-8080}" \
      --include-dashboard=false --disable-usage-stats --num-cpus="${ATTN_NUM_CPUS:-$(nproc)}"
    export ATTN_RAY_ADDRESS=auto
    exec python -m service
    ;;
  *)
    exec "$@"
    ;;
esac
