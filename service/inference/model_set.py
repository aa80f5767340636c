"""The models one process serves — a :class:`ModelWorker` per model — loaded, swapped version by
version, and kept up to date by polling the repository.

Loading happens off the event loop while the current versions keep answering; the swap is one
synchronous step (``on_change``), so a request sees either the old set or the new one. After a
swap, what is loaded is frozen out of the cyclic garbage collector's sight (:func:`freeze_heap`). Requests
already inside a replaced worker finish on it (each version has its own queue, which drains and
ends); every answer names the version that produced it. A version that fails to load is listed
as rejected and the previous one keeps serving. Ray-free: the hosting layer says which versions
to serve and what to do with the set.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable

from service.inference.manifest import list_versions
from service.inference.repository import ModelEntry, load_entry
from service.inference.worker import ModelWorker, WorkerMetrics
from service.settings import Settings

log = logging.getLogger("ray.serve")

#: told the new set after every swap: workers by model name, and what was refused (key → reason)
OnChange = Callable[[dict[str, ModelWorker], dict[str, str]], None]


class ModelSet:
    def __init__(
        self,
        settings: Settings,
        replica: str,
        node: str,
        metrics_for: Callable[[str], WorkerMetrics],
        on_change: OnChange,
    ) -> None:
        self.settings, self.replica, self.node = settings, replica, node
        self.metrics_for, self.on_change = metrics_for, on_change
        self.workers: dict[str, ModelWorker] = {}
        self.rejected: dict[str, str] = {}
        self.configured_rejected: dict[str, str] = {}  # refused before this process started

    @property
    def entries(self) -> dict[str, ModelEntry]:
        return {name: worker.entry for name, worker in self.workers.items()}

    async def serve(self, wanted: dict[str, int]) -> None:
        """Serve version ``wanted[name]`` of each model: load what is new, then swap."""
        workers = {n: w for n, w in self.workers.items() if n in wanted}
        failed: dict[str, str] = {}
        for name, version in wanted.items():
            if name in workers and workers[name].entry.version == version:
                continue
            try:
                entry = load_entry(self.settings.repository, name, version)
                workers[name] = await asyncio.to_thread(
                    ModelWorker, entry, self.settings, self.replica, self.node, self.metrics_for(name)
                )
                log.info("serving %s v%s", name, version)
            except Exception as exc:
                reason = f"failed to load: {type(exc).__name__}: {str(exc)[:300]}"
                if self.rejected.get(f"{name}/{version}") != reason:  # log a failure once
                    log.error("not serving %s v%s: %s", name, version, reason)
                failed[f"{name}/{version}"] = reason
        if not workers:
            raise RuntimeError(f"no model could be loaded: {failed}")
        replaced = [w for w in self.workers.values() if all(w is not v for v in workers.values())]
        self.workers, self.rejected = workers, {**self.configured_rejected, **failed}
        self.on_change(dict(workers), dict(self.rejected))
        for worker in replaced:  # the old version drains its queue, then its loop ends
            worker.close()
        freeze_heap()

    async def poll(self) -> None:
        """Every ``repository_poll_s``, forever: serve the newest version directory of each
        served model (as TensorFlow Serving does). Export writes a version atomically and the
        manifest's checksums refuse a half-copied one, which is tried again at the next poll."""
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                newest = {name: max(list_versions(self.settings.repository, name), default=0)
                          for name in self.workers}  # fmt: skip
                wanted = {n: max(v, self.workers[n].entry.version) for n, v in newest.items()}
                if any(self.workers[n].entry.version != v for n, v in wanted.items()):
                    await self.serve(wanted)
            except Exception:  # a repository that cannot be read now may be readable next time
                log.exception("polling the repository failed")

    def refresh_metrics(self) -> None:
        for worker in self.workers.values():
            worker.metrics.refresh()


def freeze_heap() -> None:
    """Move every object alive now — the models' sessions and tokenizers, the libraries' own
    objects — out of the cyclic garbage collector's sight (``gc.freeze``), after collecting what
    the last swap left (``gc.unfreeze`` first, so a replaced version's cycles are not kept for
    good). A full collection otherwise scans them all: ≈ 130 k objects, ≈ 0.1 s in a serving
    process with the demo models, a stall that fills queues under load
    (``benchmarks/results/*-decoding.md``, open loop). Requests' own objects stay collectable."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
