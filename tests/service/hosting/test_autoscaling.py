"""The in-replica autoscaling policy as Ray Serve runs it: wrapped by Ray's own delay, bounds and
scaling-factor logic (``_apply_autoscaling_config``, what the controller calls), driven by a
simulated control loop with Ray's real ``AutoscalingContext`` and ``AutoscalingConfig``."""

from __future__ import annotations

import time
import types
from pathlib import Path
from typing import Any

import pytest
from ray.serve import autoscaling_policy
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from service.hosting.autoscaling import METRIC, held_requests_policy
from service.settings import Settings

# Ray Serve warns (FutureWarning: "will raise an exception in a future release") of a config it
# will refuse: the service's own configs must not be one
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")
TICK_S = 0.1  # Ray's control loop period


class Controller:
    """Ray's controller around the policy: a decision per tick, replicas follow the decision."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp: Path, replicas: int, **autoscaling: Any) -> None:
        settings = Settings(repository=tmp, autoscaling={"max_replicas": 4, **autoscaling})
        scaling: Any = settings.scaling_for(None)["autoscaling_config"]  # as the service deploys it
        self.config = AutoscalingConfig(**{k: v for k, v in scaling.items() if k != "policy"})
        self.policy = _apply_autoscaling_config(held_requests_policy)
        self.replicas, self.state, self.now = replicas, {}, 1000.0
        # Ray's delay logic reads time.time(): its module's clock only, not the process's
        clock = types.ModuleType("time")
        clock.time = lambda: self.now  # type: ignore[attr-defined]
        clock.monotonic = time.monotonic  # type: ignore[attr-defined]
        monkeypatch.setattr(autoscaling_policy, "time", clock)

    def run(self, seconds: float, held: float) -> list[int]:
        """Tick for ``seconds`` with ``held`` requests spread over the replicas; the replica count
        after each tick."""
        counts = []
        for _ in range(round(seconds / TICK_S)):
            self.now += TICK_S
            each = {f"r{i}": held / self.replicas for i in range(self.replicas)}
            ctx = AutoscalingContext(
                deployment_id=None, deployment_name="replica", app_name="attention",  # type: ignore[arg-type]
                current_num_replicas=self.replicas, target_num_replicas=self.replicas,
                running_replicas=[], total_num_requests=held, total_queued_requests=0,
                aggregated_metrics={METRIC: each}, raw_metrics={},  # type: ignore[dict-item]
                capacity_adjusted_min_replicas=self.config.min_replicas,
                capacity_adjusted_max_replicas=self.config.max_replicas, policy_state=self.state,
                last_scale_up_time=None, last_scale_down_time=None, current_time=self.now,
                config=self.config,
            )  # fmt: skip
            wanted, self.state = self.policy(ctx)
            self.replicas = max(self.config.min_replicas, min(self.config.max_replicas, wanted))
            counts.append(self.replicas)
        return counts


def test_idle_replicas_scale_down_after_the_delay(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two idle replicas become one once ``downscale_delay_s`` has passed — and not before. (The
    policy once kept a delay clock of its own on top of Ray's: while waiting it answered "no
    change", which restarted Ray's clock, and the replicas never scaled down.)"""
    ray = Controller(
        monkeypatch, tmp_path, 2, downscale_delay_s=8, upscale_delay_s=1, target_ongoing_requests=2
    )
    counts = ray.run(20, held=0)
    assert counts[-1] == 1
    assert counts.index(1) * TICK_S == pytest.approx(8, abs=0.3)


def test_load_scales_up_after_the_upscale_delay_to_cover_what_is_held(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ray = Controller(
        monkeypatch, tmp_path, 1, downscale_delay_s=8, upscale_delay_s=1, target_ongoing_requests=10
    )
    counts = ray.run(3, held=25)  # 25 held at 10 each: 3 wanted
    assert counts[0] == 1 and counts[-1] == 3
    assert counts.index(3) * TICK_S == pytest.approx(1, abs=0.3)
    assert ray.run(5, held=30)[-1] == 3  # at the target: stays


def test_demand_coming_back_restarts_the_downscale_clock(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ray = Controller(
        monkeypatch, tmp_path, 3, downscale_delay_s=8, upscale_delay_s=1, target_ongoing_requests=10
    )
    assert ray.run(6, held=0)[-1] == 3  # quiet for less than the delay
    assert ray.run(1, held=30)[-1] == 3  # busy again at the target
    counts = ray.run(10, held=0)
    assert counts[int(7.5 / TICK_S)] == 3 and counts[-1] == 1  # a full delay from the new quiet
    assert ray.run(20, held=0)[-1] == 1  # never below min_replicas


def test_no_replica_yet_keeps_rays_target() -> None:
    class Ctx:
        current_num_replicas, target_num_replicas, policy_state = 0, 2, None

    assert held_requests_policy(Ctx())[0] == 2
