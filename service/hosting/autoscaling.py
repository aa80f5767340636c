"""Autoscaling of the in-replica frontend's serving replicas.

Ray Serve's default policy scales on the requests Ray routes, and in the in-replica frontend Ray
routes none: clients reach the replicas' own ports. So each replica reports what it really holds
— requests waiting in its models' queues plus those in the batches computing
(``ServingReplica.record_autoscaling_stats``, Ray's custom autoscaling metrics) — and
:func:`held_requests_policy` asks for enough replicas to keep that at ``target_ongoing_requests``
each: up at once, down only after ``downscale_delay_s`` of less demand. Ray bounds the answer by
``min_replicas`` / ``max_replicas``. New replicas join the shared port as soon as they are warm
and the recycled keep-alive connections give them their share.
"""

from __future__ import annotations

import math
import time
from typing import Any

#: the custom metric each serving replica reports
METRIC = "requests_held"


def held_requests_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Ray Serve's ``AutoscalingContext`` → (replicas wanted, policy state)."""
    state = dict(ctx.policy_state or {})
    current = ctx.current_num_replicas
    if current == 0:
        return ctx.target_num_replicas, state
    held = (ctx.aggregated_metrics or {}).get(METRIC, {})
    wanted = max(1, math.ceil(sum(held.values()) / ctx.config.get_target_ongoing_requests()))
    if wanted >= current:
        state.pop("below_since", None)
        return wanted, state
    now = ctx.current_time or time.time()
    below_since = state.setdefault("below_since", now)
    if now - below_since >= ctx.config.downscale_delay_s:
        state.pop("below_since")
        return wanted, state
    return current, state
