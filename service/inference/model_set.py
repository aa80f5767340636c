"""The models one process serves — a :class:`ModelWorker` per model — loaded, swapped version by
version, and kept up to date by polling the repository.

Loading happens off the event loop while the current versions keep answering; the swap is one
synchronous step (``on_change``), so a request sees either the old set or the new one. After a
swap, what is loaded is frozen out of the cyclic garbage collector's sight (:func:`freeze_heap`); the
process's interpreter-lock switch interval is the settings' (``gil_switch_interval_ms``). Requests
already inside a replaced worker finish on it (each version has its own queue, which drains and
ends); every answer names the version that produced it. A version that fails to load is listed
as rejected and the previous one keeps serving. Ray-free: the hosting layer says which versions
to serve and what to do with the set.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

from service.inference.manifest import NAME_PATTERN, list_versions
from service.inference.repository import ModelEntry, load_entry
from service.inference.worker import ModelWorker
from service.inference.worker_metrics import WorkerMetrics
from service.settings import Settings

log = logging.getLogger("ray.serve")

#: told the new set after every swap: workers by model name, and what was refused (key → reason)
OnChange = Callable[[dict[str, ModelWorker], dict[str, str]], None]
Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(directory: Path) -> Fingerprint:
    """Name, size and modification time of each file in a version directory: what changes when a
    copy completes or a version is rewritten (empty when it cannot be read)."""
    try:
        return tuple(sorted((p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in directory.iterdir()))
    except OSError:
        return ()


def take_turns(settings: Settings) -> None:
    """The serving process's threads (the event loop, each model's batch or decode thread) take
    turns with the interpreter lock every ``gil_switch_interval_ms`` (Python's default: 5 ms).
    Set by every process that serves models, and by the benchmarks that hold a worker as one."""
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)


class NoModelLoaded(RuntimeError):
    """Not one of the models a set was asked to serve loaded (each failure is logged, and listed
    in its ``rejected``)."""


class ModelSet:
    def __init__(
        self,
        settings: Settings,
        replica: str,
        node: str,
        metrics_for: Callable[[str], WorkerMetrics],
        on_change: OnChange,
        discover: bool = False,
    ) -> None:
        """``discover``: a model directory that appears in the repository joins the set at the next
        poll, as a new version does (a process serving the whole repository; not one serving a
        chosen list, nor a Ray deployment of one model)."""
        self.settings, self.replica, self.node = settings, replica, node
        self.discover = discover
        take_turns(settings)
        self.metrics_for, self.on_change = metrics_for, on_change
        self.workers: dict[str, ModelWorker] = {}
        self.rejected: dict[str, str] = {}
        self.configured_rejected: dict[str, str] = {}  # refused before this process started
        #: (name, version) → (what its directory looked like, why it failed): listed as rejected
        #: ("<name>/<version>"), and not loaded again until its files change
        self._failed: dict[tuple[str, int], tuple[Fingerprint, str]] = {}
        self._names: set[str] = set()  # every model this process was asked to serve
        #: one change of the set at a time: a deploy's and a poll's, each loading off the event
        #: loop, each swapped in the workers it saw at its start, and the second put back (and
        #: served) workers the first had closed
        self._changing = asyncio.Lock()

    @property
    def entries(self) -> dict[str, ModelEntry]:
        return {name: worker.entry for name, worker in self.workers.items()}

    async def serve(self, wanted: dict[str, int]) -> None:
        """Serve version ``wanted[name]`` of each model, and only those models: load what is new,
        then swap. A version that is gone or does not load gives way to the newest one left that
        does: a replica Ray starts anew (a crash, autoscaling) gets the deploy's versions, which
        the polls may have moved past and retention deleted since."""
        async with self._changing:
            self._names = set(wanted)
            await self._serve({name: self._fallbacks(name, version) for name, version in wanted.items()})

    def _fallbacks(self, name: str, version: int) -> list[int]:
        """``version``, then the other versions held, newest first (``version`` alone while the
        model's directory cannot be listed)."""
        try:
            held = list_versions(self.settings.repository, name)
        except Exception:
            log.exception("listing the versions of %s failed", name)
            return [version]
        if not held:
            return [version]
        return [*([version] if version in held else []), *(v for v in reversed(held) if v != version)]

    async def _serve(self, candidates: dict[str, list[int]]) -> None:
        """For each model, the first of its candidate versions that loads (the current worker
        when a candidate is the version it serves); then one swap. A model whose every candidate
        fails keeps its current version, if it has one."""
        workers = {n: w for n, w in self.workers.items() if n in candidates}
        for name, versions in candidates.items():
            for version in versions:
                if name in workers and workers[name].entry.version == version:
                    break
                if await self._load(workers, name, version):
                    break
        if not workers:
            self.rejected = self.configured_rejected | self._failures()
            raise NoModelLoaded(f"no model could be loaded: {self._failures()}")
        replaced = [w for w in self.workers.values() if all(w is not v for v in workers.values())]
        self.workers = workers
        for name, version in [k for k in self._failed if not self._still_rejected(*k)]:
            del self._failed[name, version]
        configured = {
            k: why for k, why in self.configured_rejected.items() if self._still_rejected(*_parse(k))
        }
        self.rejected = configured | self._failures()
        self.on_change(dict(workers), dict(self.rejected))
        for worker in replaced:  # the old version drains its queue, then its thread ends
            worker.close()
        freeze_heap()

    async def _load(self, workers: dict[str, ModelWorker], name: str, version: int) -> bool:
        """Load one version off the event loop (its manifest check hashes every file: seconds for a
        large graph) into ``workers``; a failure is remembered with its reason."""
        key = (name, version)
        # what its files were before the load: a copy that completes during a failed load then
        # differs from it, and the version is tried again (taken after, it never was)
        before = fingerprint(self.settings.repository / name / str(version))
        try:
            workers[name] = await asyncio.to_thread(self._worker, name, version)
        except Exception as exc:
            reason = f"failed to load: {type(exc).__name__}: {str(exc)[:300]}"
            if key not in self._failed or self._failed[key][1] != reason:  # log a failure once
                log.error("not serving %s v%s: %s", name, version, reason)
            self._failed[key] = (before, reason)
            return False
        self._failed.pop(key, None)
        log.info("serving %s v%s", name, version)
        return True

    def _worker(self, name: str, version: int) -> ModelWorker:
        entry = load_entry(self.settings.repository, name, version)
        return ModelWorker(entry, self.settings, self.replica, self.node, self.metrics_for(name))

    def _failures(self) -> dict[str, str]:
        return {f"{name}/{version}": why for (name, version), (_, why) in self._failed.items()}

    def _still_rejected(self, name: str, version: int | None) -> bool:
        """A refusal of a version (None: of every version) is no longer news once that model
        serves that version or a newer one."""
        served = self.workers.get(name)
        return served is None or (version is not None and version > served.entry.version)

    async def poll(self) -> None:
        """Every ``repository_poll_s``, forever: serve the newest version directory of each
        model that loads (as TensorFlow Serving does; a newer one that fails is listed as
        rejected and the next newest is tried, as at start). A version that failed is tried again
        once its files change: export writes a version atomically and the manifest's checksums
        refuse a half-copied one, which loads once the copy is complete."""
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            await self.poll_once()

    async def poll_once(self) -> None:
        async with self._changing:
            await self._poll_once()

    async def _poll_once(self) -> None:
        candidates: dict[str, list[int]] = {}
        # refused at discovery: a fixed version loads (names that are no model name never will)
        refused = {n for k in self.configured_rejected if re.match(NAME_PATTERN, n := _parse(k)[0])}
        for name in sorted(self._names | refused | self._new_names()):
            try:  # one unreadable model directory must not hold up the others
                current = self.workers[name].entry.version if name in self.workers else 0
                newer = [v for v in reversed(list_versions(self.settings.repository, name)) if v > current]
            except Exception:
                log.exception("polling the repository for %s failed", name)
                continue
            for key in [k for k in self._failed if k[0] == name and k[1] not in newer]:
                del self._failed[key]  # its directory is gone (or an older one serves)
            # a set serving nothing (a Ray deployment of one model that failed to load, maybe for
            # a passing reason: memory, a slow mount) tries again each poll, files changed or not
            fresh = [v for v in newer if not self.workers or not self._unchanged_failure(name, v)]
            if fresh:
                candidates[name] = fresh + ([current] if current else [])
        if not candidates:
            return
        try:
            await self._serve({**{n: [w.entry.version] for n, w in self.workers.items()}, **candidates})
        except NoModelLoaded:  # a set serving nothing yet (a Ray deployment of one model that
            pass  # failed to load): each failure was logged, and is listed as rejected
        except Exception:  # a repository that cannot be read now may be readable next time
            log.exception("polling the repository failed")
        self._names |= self.workers.keys()  # a new model that loaded is polled from now on

    def _new_names(self) -> set[str]:
        """Model directories of the repository this set does not serve yet (``discover``)."""
        if not self.discover:
            return set()
        try:
            names = {p.name for p in self.settings.repository.iterdir() if p.is_dir()}
        except OSError:
            log.exception("listing the repository %s failed", self.settings.repository)
            return set()
        return {n for n in names if re.match(NAME_PATTERN, n)} - self._names

    def _unchanged_failure(self, name: str, version: int) -> bool:
        failed = self._failed.get((name, version))
        return failed is not None and failed[0] == fingerprint(self.settings.repository / name / str(version))

    def refresh_metrics(self) -> None:
        for worker in self.workers.values():
            worker.refresh_metrics()

    def check_health(self) -> None:
        """For the replica's health check: refresh the gauges; raise naming every model whose
        worker is unhealthy (a raise makes Ray Serve replace the replica)."""
        self.refresh_metrics()
        problems = [f"{name}: {p}" for name, w in self.workers.items() if (p := w.problem()) is not None]
        if problems:
            raise RuntimeError("; ".join(problems))


def _parse(key: str) -> tuple[str, int | None]:
    """A refusal's key as ``discover`` writes it: "<name>/<version>", or "<name>" alone."""
    name, _, version = key.partition("/")
    return name, int(version) if version else None


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
