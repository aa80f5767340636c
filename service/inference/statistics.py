"""What one model version did since it was loaded, as Triton's statistics extension counts it.

A :class:`Statistics` per worker (``service/inference/worker.py``) is fed by its requests (on the
event loop) and by its executions — a batch of images, or a decoder step of a translation
scheduler — on the thread that runs them; :meth:`Statistics.snapshot` is what the API layer
answers ``GET /v2/models/{name}/stats`` and gRPC ``ModelStatistics`` with
(``service/api/kserve.py``). Cumulative counts and nanoseconds only, no lock: each field has one
writer thread, and a reader sees each field whole.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    """How many, and their cumulative time in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


@dataclass
class Snapshot:
    """One model version's statistics at one moment (picklable: Ray's ingress asks a model
    deployment for it)."""

    name: str
    version: int
    #: when the last request was answered or failed, ms since the epoch (0: never)
    last_inference_ms: int
    #: images or texts answered (a request of 3 texts counts 3)
    inference_count: int
    #: batches (images, whole-prefix translation) or decoder steps (translation schedulers) run
    execution_count: int
    success: Duration  # requests answered, arrival at the model → answer
    fail: Duration  # requests the model refused or failed (overload, an inference error)
    queue: Duration  # of the answered: waiting for a batch or a place in the running batch
    compute_input: Duration  # of the answered: preprocessing (tokenising, image decoding)
    compute_infer: Duration  # of the answered: the batch's or the steps' compute
    compute_output: Duration  # of the answered: the rest (postprocessing, answering)
    #: per batch size (rows of a decoder step): executions and their compute time
    batches: dict[int, Duration] = field(default_factory=dict)


class Statistics:
    def __init__(self) -> None:
        self.last_inference_ms = 0
        self.inference_count = 0
        self.execution_count = 0
        self.success, self.fail = Duration(), Duration()
        self.queue, self.compute_input = Duration(), Duration()
        self.compute_infer, self.compute_output = Duration(), Duration()
        self.batches: dict[int, Duration] = {}

    def answered(self, items: int, total_s: float, input_s: float, queue_s: float, infer_s: float) -> None:
        """A request answered after ``total_s`` at the model: ``input_s`` of preprocessing,
        ``queue_s`` waiting, ``infer_s`` of compute, the rest postprocessing."""
        self.inference_count += items
        self.success.add(total_s)
        self.compute_input.add(input_s)
        self.queue.add(queue_s)
        self.compute_infer.add(infer_s)
        self.compute_output.add(max(0.0, total_s - input_s - queue_s - infer_s))
        self.last_inference_ms = time.time_ns() // 1_000_000

    def failed(self, total_s: float) -> None:
        self.fail.add(total_s)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def executed(self, size: int, seconds: float) -> None:
        """A batch of ``size`` rows computed in ``seconds`` (on the thread that ran it)."""
        self.execution_count += 1
        batch = self.batches.get(size)
        if batch is None:
            batch = self.batches[size] = Duration()
        batch.add(seconds)

    def snapshot(self, name: str, version: int) -> Snapshot:
        def copy(d: Duration) -> Duration:
            return Duration(d.count, d.ns)

        return Snapshot(
            name=name,
            version=version,
            last_inference_ms=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            success=copy(self.success),
            fail=copy(self.fail),
            queue=copy(self.queue),
            compute_input=copy(self.compute_input),
            compute_infer=copy(self.compute_infer),
            compute_output=copy(self.compute_output),
            # list(): one C-level copy of the items, while the execution thread may add a size
            batches={size: copy(d) for size, d in sorted(list(self.batches.items()))},
        )
