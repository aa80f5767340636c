"""``ModelSet``: the models a process serves, swapped version by version — here, what a swap does
to the heap (``freeze_heap``): loaded objects leave the collector's scans, replaced ones do not
stay forever."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import signal
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest

from service.inference import decode_process, model_set
from service.inference.decode_process import DecodeProcess
from service.inference.jobs import TranslateJob
from service.inference.model_set import ModelSet, NoModelLoaded
from service.inference.worker import ModelWorker
from service.inference.worker_metrics import NoMetrics
from service.settings import Settings
from tests.service.inference.decode_stand_ins import broken


def test_a_swap_freezes_what_is_loaded_and_frees_what_it_replaced(
    tiny_repository: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    for version in (1, 2, 3):
        version_of(tiny_repository, repository, version)
    served: list[dict[str, object]] = []
    models = ModelSet(
        Settings(repository=repository), "replica", "node", lambda _: NoMetrics(),
        lambda workers, _: served.append(dict(workers)),
    )  # fmt: skip
    try:
        asyncio.run(models.serve({"dates-bahdanau": 1}))
        assert gc.get_freeze_count() > 10_000  # the session, tokenizers, libraries: out of the scans
        first = weakref.ref(models.workers["dates-bahdanau"])
        served.clear()
        asyncio.run(models.serve({"dates-bahdanau": 2}))  # v1 drains: still alive, frozen with v2
        asyncio.run(models.serve({"dates-bahdanau": 3}))  # unfrozen and collected here
        assert models.workers["dates-bahdanau"].entry.version == 3
        served.clear()
        assert first() is None, "a replaced version stayed frozen after the next swap"
    finally:
        gc.unfreeze()


def test_the_serving_process_takes_the_settings_switch_interval(tiny_repository: Path) -> None:
    before = sys.getswitchinterval()
    try:
        ModelSet(Settings(repository=tiny_repository, gil_switch_interval_ms=0.25), "r", "n",
                 lambda _: NoMetrics(), lambda *_: None)  # fmt: skip
        assert sys.getswitchinterval() == pytest.approx(0.00025)
        ModelSet(Settings(repository=tiny_repository), "r", "n", lambda _: NoMetrics(), lambda *_: None)
        assert sys.getswitchinterval() == pytest.approx(0.0005)  # the default
    finally:
        sys.setswitchinterval(before)


def version_of(tiny_repository: Path, repository: Path, version: int, model: str = "dates-bahdanau") -> Path:
    directory = repository / model / str(version)
    shutil.copytree(tiny_repository / model / "1", directory)
    manifest = directory / "manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"version": version}))
    return directory


def corrupt(directory: Path) -> None:
    with (directory / "encoder.onnx").open("ab") as f:
        f.write(b"half a copy")


class Loads:
    """Which versions the set tried to load, and on which threads."""

    def __init__(self, models: ModelSet, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tried: list[tuple[str, int]] = []
        self.threads: set[str] = set()
        real = models._worker

        def worker(name: str, version: int) -> ModelWorker:
            self.tried.append((name, version))
            self.threads.add(threading.current_thread().name)
            return real(name, version)

        monkeypatch.setattr(models, "_worker", worker)


def test_a_replica_started_after_its_deploy_s_version_was_deleted_serves_the_newest_left(
    tiny_repository: Path, tmp_path: Path
) -> None:
    """Deployed at v1, the polls moved every replica on and retention deleted v1. Ray starts a
    replica anew (a crash, autoscaling) with the deploy's versions: it serves the newest version
    that loads (v3; v4 is corrupt), where it served nothing (its constructor raised again and
    again). A version the deploy names that is there is still the one served (a pin)."""
    repository = tmp_path / "repository"
    for version in (2, 3):
        version_of(tiny_repository, repository, version)
    corrupt(version_of(tiny_repository, repository, 4))
    models = ModelSet(
        Settings(repository=repository), "replica", "node", lambda _: NoMetrics(), lambda *_: None
    )
    try:
        asyncio.run(models.serve({"dates-bahdanau": 1}))
        assert models.workers["dates-bahdanau"].entry.version == 3
        assert set(models.rejected) == {"dates-bahdanau/4"}, models.rejected
        asyncio.run(models.serve({"dates-bahdanau": 2}))
        assert models.workers["dates-bahdanau"].entry.version == 2
    finally:
        gc.unfreeze()


def test_the_poll_serves_the_newest_version_that_loads_and_retries_a_failure_once_fixed(
    tiny_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corrupt v3 beside a good v2: the poll serves v2 (as discovery at start would) and lists
    v3 as rejected, does not hash v3 again while its files stay the same, and serves it once its
    copy is complete. Loading (which hashes every file) runs off the event loop."""
    repository = tmp_path / "repository"
    version_of(tiny_repository, repository, 1)
    models = ModelSet(
        Settings(repository=repository), "replica", "node", lambda _: NoMetrics(), lambda *_: None
    )
    loads = Loads(models, monkeypatch)

    async def go() -> None:
        await models.serve({"dates-bahdanau": 1})
        version_of(tiny_repository, repository, 2)
        corrupt(version_of(tiny_repository, repository, 3))
        await models.poll_once()
        assert models.workers["dates-bahdanau"].entry.version == 2
        assert (
            list(models.rejected) == ["dates-bahdanau/3"] and "sha256" in models.rejected["dates-bahdanau/3"]
        )
        loads.tried.clear()
        await models.poll_once()
        assert loads.tried == [], "an unchanged failed version is not loaded (hashed) again"
        shutil.rmtree(repository / "dates-bahdanau" / "3")
        version_of(tiny_repository, repository, 3)  # the copy, complete this time
        await models.poll_once()
        assert models.workers["dates-bahdanau"].entry.version == 3 and models.rejected == {}

    try:
        asyncio.run(go())
    finally:
        gc.unfreeze()
    assert "MainThread" not in loads.threads, "load_entry hashes files: never on the event loop"


def test_a_set_serving_nothing_tries_its_versions_again_at_every_poll(
    tiny_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ray deployment of one model whose load failed for a passing reason (memory, a slow mount)
    serves nothing: unlike a set that serves something, it loads its unchanged versions again at
    each poll, and serves the first that loads."""
    repository = tmp_path / "repository"
    version_of(tiny_repository, repository, 1)
    models = ModelSet(
        Settings(repository=repository), "replica", "node", lambda _: NoMetrics(), lambda *_: None
    )
    real, failing = models._worker, [True]

    def passing_failure(name: str, version: int) -> ModelWorker:
        if failing[0]:
            raise MemoryError("out of memory, for now")
        return real(name, version)

    monkeypatch.setattr(models, "_worker", passing_failure)
    loads = Loads(models, monkeypatch)

    async def go() -> None:
        with pytest.raises(NoModelLoaded):
            await models.serve({"dates-bahdanau": 1})
        assert "MemoryError" in models.rejected["dates-bahdanau/1"] and not models.workers
        await models.poll_once()
        assert loads.tried == [("dates-bahdanau", 1), ("dates-bahdanau", 1)]  # files unchanged
        failing[0] = False
        await models.poll_once()
        assert models.workers["dates-bahdanau"].entry.version == 1 and models.rejected == {}

    try:
        asyncio.run(go())
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("discover", [True, False])
def test_a_new_model_directory_joins_at_the_poll_when_the_whole_repository_is_served(
    tiny_repository: Path, tmp_path: Path, discover: bool
) -> None:
    """A process serving the whole repository takes a model published after it started (and
    lists a broken one as rejected, its others serving on); one serving a chosen list does not."""
    repository = tmp_path / "repository"
    version_of(tiny_repository, repository, 1)
    served: list[dict[str, ModelWorker]] = []
    models = ModelSet(Settings(repository=repository), "replica", "node", lambda _: NoMetrics(),
                      lambda workers, _: served.append(workers), discover=discover)  # fmt: skip

    async def go() -> None:
        await models.serve({"dates-bahdanau": 1})
        shutil.copytree(tiny_repository / "fashion-vit", repository / "fashion-vit")
        corrupt(version_of(tiny_repository, repository, 1, model="dates-transformer"))
        await models.poll_once()

    try:
        asyncio.run(go())
    finally:
        gc.unfreeze()
    if not discover:
        assert list(models.workers) == ["dates-bahdanau"] and models.rejected == {}
        return
    assert sorted(models.workers) == ["dates-bahdanau", "fashion-vit"]
    assert sorted(served[-1]) == ["dates-bahdanau", "fashion-vit"], "the hosting layer was told"
    assert list(models.rejected) == ["dates-transformer/1"]


def test_a_model_that_failed_to_load_stays_listed_and_loads_when_a_good_version_comes(
    tiny_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Load failures at start stayed in ``rejected`` only until the next swap of another model,
    and a fixed version of the failed model was never looked for; one model whose directory
    cannot be listed held up the poll of every other."""
    repository = tmp_path / "repository"
    version_of(tiny_repository, repository, 1)
    corrupt(version_of(tiny_repository, repository, 1, "dates-transformer"))
    models = ModelSet(
        Settings(repository=repository), "replica", "node", lambda _: NoMetrics(), lambda *_: None
    )
    real_list = model_set.list_versions

    def list_versions(repo: Path, name: str) -> list[int]:
        if name == "fashion-vit":
            raise PermissionError(f"{repo / name}: unreadable")
        return real_list(repo, name)

    monkeypatch.setattr(model_set, "list_versions", list_versions)

    async def go() -> None:
        models.configured_rejected = {"fashion-vit/1": "refused at discovery"}
        await models.serve({"dates-bahdanau": 1, "dates-transformer": 1})
        assert set(models.workers) == {"dates-bahdanau"}
        assert set(models.rejected) == {"dates-transformer/1", "fashion-vit/1"}
        version_of(tiny_repository, repository, 2)  # another model's swap keeps the refusals listed
        await models.poll_once()
        assert models.workers["dates-bahdanau"].entry.version == 2
        assert set(models.rejected) == {"dates-transformer/1", "fashion-vit/1"}
        version_of(tiny_repository, repository, 2, "dates-transformer")
        await models.poll_once()
        assert models.workers["dates-transformer"].entry.version == 2
        assert set(models.rejected) == {"fashion-vit/1"}

    try:
        asyncio.run(go())
    finally:
        gc.unfreeze()


def test_a_deploy_and_a_poll_at_once_leave_no_closed_worker_serving(
    tiny_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll loading a new fashion-vit (slowly) while a deploy pins dates-bahdanau back to v1:
    each swapped in the workers it saw at its start, so the poll, ending last, put back the
    dates-bahdanau v2 the deploy had closed — a model answering every request with 503 and
    healthy to its checks. One change at a time: the deploy's set is served, nothing closed."""
    repository = tmp_path / "repository"
    for model in ("dates-bahdanau", "fashion-vit"):
        version_of(tiny_repository, repository, 1, model)
    models = ModelSet(
        Settings(repository=repository), "replica", "node", lambda _: NoMetrics(), lambda *_: None
    )
    closed: list[ModelWorker] = []
    real_close, real_worker = ModelWorker.close, models._worker

    def close(worker: ModelWorker) -> None:
        closed.append(worker)
        real_close(worker)

    def worker(name: str, version: int) -> ModelWorker:
        if (name, version) == ("fashion-vit", 2):
            time.sleep(3)  # a large graph hashed and loaded
        return real_worker(name, version)

    monkeypatch.setattr(ModelWorker, "close", close)
    monkeypatch.setattr(models, "_worker", worker)

    async def go() -> None:
        await models.serve({"dates-bahdanau": 1, "fashion-vit": 1})
        version_of(tiny_repository, repository, 2)
        await models.poll_once()
        version_of(tiny_repository, repository, 2, "fashion-vit")
        poll = asyncio.create_task(models.poll_once())
        await asyncio.sleep(0.2)
        await models.serve({"dates-bahdanau": 1, "fashion-vit": 1})  # a deploy pinning v1
        await poll

    try:
        asyncio.run(go())
    finally:
        gc.unfreeze()
    served = {name: w.entry.version for name, w in models.workers.items()}
    assert served == {"dates-bahdanau": 1, "fashion-vit": 1}, served
    assert not [w for w in models.workers.values() if any(w is c for c in closed)], "a closed worker serves"


def test_a_version_whose_copy_completes_during_its_failed_load_is_tried_again(
    tiny_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failed version's files were looked at after its load: a copy that completed meanwhile
    was taken for the failure's, and the version stayed rejected for good. Now the files as they
    were before the load are kept, and the next poll loads the completed copy."""
    repository = tmp_path / "repository"
    version_of(tiny_repository, repository, 1)
    models = ModelSet(
        Settings(repository=repository), "replica", "node", lambda _: NoMetrics(), lambda *_: None
    )
    real_worker = models._worker

    def worker(name: str, version: int) -> ModelWorker:
        try:
            return real_worker(name, version)
        except Exception:
            if version == 2:  # the copy completes while the failed load is still on its way out
                good = tiny_repository / name / "1" / "encoder.onnx"
                shutil.copyfile(good, repository / name / "2" / "encoder.onnx")
            raise

    monkeypatch.setattr(models, "_worker", worker)

    async def go() -> None:
        await models.serve({"dates-bahdanau": 1})
        corrupt(version_of(tiny_repository, repository, 2))
        await models.poll_once()
        assert list(models.rejected) == ["dates-bahdanau/2"]
        await models.poll_once()
        assert models.workers["dates-bahdanau"].entry.version == 2 and models.rejected == {}

    try:
        asyncio.run(go())
    finally:
        gc.unfreeze()


@pytest.mark.slow
def test_a_decode_process_restarts_from_the_served_versions_files_after_they_were_deleted(
    tiny_repository: Path, tmp_path: Path
) -> None:
    """The served version's directory removed (a newer one was meant to replace it), then its
    decode process crashes: it starts again on the files the replica holds open, ONNX Runtime's
    graphs and the tokenizers alike, and answers as before."""
    repository = tmp_path / "repository"
    directory = version_of(tiny_repository, repository, 1, "dates-transformer")
    models = ModelSet(
        Settings(repository=repository), "replica", "node", lambda _: NoMetrics(), lambda *_: None
    )
    asyncio.run(models.serve({"dates-transformer": 1}))
    worker = models.workers["dates-transformer"]
    scheduler = worker.scheduler
    assert isinstance(scheduler, DecodeProcess) and scheduler.pid is not None
    job = TranslateJob(texts=["5 mars 2024", "Tuesday, July 4, 1995"])
    before = asyncio.run(worker.predict(job))
    shutil.rmtree(directory)
    first = scheduler.pid
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not (scheduler.pid != first and scheduler.running):
        assert scheduler.down_since is None, scheduler.start_error
        assert time.monotonic() < deadline, "the decode process did not start again"
        time.sleep(0.05)
    after = asyncio.run(worker.predict(job))
    texts = [[t.text for t in a.result.translations] for a in (before, after)]  # type: ignore[union-attr]
    assert texts[0] == texts[1] and all(texts[0])
    models.check_health()
    worker.close()


def test_the_health_check_names_a_model_whose_decode_process_cannot_restart(
    tiny_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What Ray's health check calls (``check_health`` of either hosting adapter): healthy while
    the decode process serves; once it died and its restarts keep failing for ``DOWN_S``, a raise
    naming the model — Ray then replaces the replica."""
    monkeypatch.setattr(decode_process, "DOWN_S", 0.3)
    repository = tmp_path / "repository"
    version_of(tiny_repository, repository, 1, "dates-transformer")
    version_of(tiny_repository, repository, 1, "fashion-vit")
    models = ModelSet(
        Settings(repository=repository), "replica", "node", lambda _: NoMetrics(), lambda *_: None
    )
    asyncio.run(models.serve({"dates-transformer": 1, "fashion-vit": 1}))
    scheduler = models.workers["dates-transformer"].scheduler
    assert isinstance(scheduler, DecodeProcess) and scheduler.pid is not None
    models.check_health()  # healthy
    scheduler.factory = broken
    os.kill(scheduler.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        try:
            models.check_health()
        except RuntimeError as exc:
            assert str(exc).startswith("dates-transformer: its decode process has failed to restart for")
            assert "no model here" in str(exc) and "fashion-vit" not in str(exc)
            break
        assert time.monotonic() < deadline, "the health check never failed"
        time.sleep(0.05)
    for worker in models.workers.values():
        worker.close()
