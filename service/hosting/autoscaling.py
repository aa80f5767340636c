"""Autoscaling of the in-replica frontend's serving replicas.

Ray Serve's default policy scales on the requests Ray routes, and in the in-replica frontend Ray
routes none: clients reach the replicas' own ports. So each replica reports what it really holds
— requests waiting in its models' queues plus those in the batches computing
(``ServingReplica.record_autoscaling_stats``, Ray's custom autoscaling metrics) — and
:func:`held_requests_policy` asks for enough replicas to keep that at ``target_ongoing_requests``
each. Ray wraps a custom policy with its own ``upscale_delay_s`` / ``downscale_delay_s`` (a change
happens once the policy has asked for it that long) and ``min_replicas`` / ``max_replicas``
bounds, so the policy answers what it wants now and keeps no clock of its own: one that also
waited out the delay answered "no change" while waiting, which restarted Ray's clock, and the
replicas never scaled down. New replicas join the shared port as soon as they are warm and the
recycled keep-alive connections give them their share.
"""

from __future__ import annotations

import math
from typing import Any

#: the custom metric each serving replica reports
METRIC = "requests_held"


def held_requests_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Ray Serve's ``AutoscalingContext`` → (replicas wanted now, policy state)."""
    state = dict(ctx.policy_state or {})
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, state
    held = (ctx.aggregated_metrics or {}).get(METRIC, {})
    return max(1, math.ceil(sum(held.values()) / ctx.config.get_target_ongoing_requests())), state
