"""Where a model's worker records what it did (``service/inference/worker.py``): the protocol the
hosting layer implements with Ray's metrics API (``service/hosting/metrics.py``), and the recorder
that records nothing, for tests and offline use."""

from __future__ import annotations

from typing import Protocol


class WorkerMetrics(Protocol):
    """Where a worker records what it did; the hosting layer gives one that exports them (Ray's
    metrics API, ``service/hosting/metrics.py``), tests and offline use need none."""

    def loaded(self, version: int, task: str, family: str, provider: str) -> None: ...
    def refresh(self) -> None: ...
    def unloaded(self) -> None: ...
    def batch(self, size: int, compute_s: float) -> None: ...
    def waited(self, seconds: float) -> None: ...
    def generated(self, tokens: int) -> None: ...
    def decoded(self, first_token_s: float, per_token_s: float | None) -> None: ...
    def stepped(self, rows: int, tokens: int, steps: int = 1) -> None: ...
    def predicted_wait(self, seconds: float) -> None: ...


class NoMetrics:
    def loaded(self, version: int, task: str, family: str, provider: str) -> None:
        pass

    def refresh(self) -> None:
        pass

    def unloaded(self) -> None:
        pass

    def batch(self, size: int, compute_s: float) -> None:
        pass

    def waited(self, seconds: float) -> None:
        pass

    def generated(self, tokens: int) -> None:
        pass

    def decoded(self, first_token_s: float, per_token_s: float | None) -> None:
        pass

    def stepped(self, rows: int, tokens: int, steps: int = 1) -> None:
        pass

    def predicted_wait(self, seconds: float) -> None:
        pass
