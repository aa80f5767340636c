"""The in-replica autoscaling policy, without Ray: enough replicas for what the replicas hold at
the target each, up at once, down only after the delay."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.hosting.autoscaling import METRIC, held_requests_policy


@dataclass
class Config:
    target: float = 10
    downscale_delay_s: float = 30

    def get_target_ongoing_requests(self) -> float:
        return self.target


@dataclass
class Context:
    held: list[float]
    current_num_replicas: int
    current_time: float
    policy_state: dict[str, Any] = field(default_factory=dict)
    target_num_replicas: int = 1
    config: Config = field(default_factory=Config)

    @property
    def aggregated_metrics(self) -> dict[str, dict[str, float]]:
        return {METRIC: {f"r{i}": h for i, h in enumerate(self.held)}}


def test_scales_up_at_once_to_cover_the_held_requests() -> None:
    assert held_requests_policy(Context([30, 25], 2, 0.0))[0] == 6
    assert held_requests_policy(Context([0, 0], 2, 0.0))[0] == 2  # quiet: stays until the delay


def test_scales_down_only_after_the_delay_and_not_below_one() -> None:
    wanted, state = held_requests_policy(Context([1, 0, 0], 3, 100.0))
    assert wanted == 3 and state["below_since"] == 100.0
    wanted, state = held_requests_policy(Context([1, 0, 0], 3, 120.0, state))
    assert wanted == 3
    wanted, state = held_requests_policy(Context([1, 0, 0], 3, 131.0, state))
    assert wanted == 1 and "below_since" not in state
    wanted, state = held_requests_policy(Context([0, 0, 0], 3, 1.0))
    wanted, state = held_requests_policy(Context([25, 0, 0], 3, 2.0, state))
    assert wanted == 3 and "below_since" not in state  # demand came back: the clock restarts


def test_no_replica_yet_keeps_rays_target() -> None:
    assert held_requests_policy(Context([], 0, 0.0, target_num_replicas=2))[0] == 2
