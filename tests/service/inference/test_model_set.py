"""``ModelSet``: the models a process serves, swapped version by version — here, what a swap does
to the heap (``freeze_heap``): loaded objects leave the collector's scans, replaced ones do not
stay forever."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import weakref
from pathlib import Path

from service.inference.model_set import ModelSet
from service.inference.worker import NoMetrics
from service.settings import Settings


def test_a_swap_freezes_what_is_loaded_and_frees_what_it_replaced(
    tiny_repository: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    for version in (1, 2, 3):
        directory = repository / "dates-bahdanau" / str(version)
        shutil.copytree(tiny_repository / "dates-bahdanau" / "1", directory)
        manifest = directory / "manifest.json"
        manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"version": version}))
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
