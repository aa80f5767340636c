"""Writing versions into the model repository: staged, validated, then moved into place.

A version directory appears whole or not at all: files are written to a staging directory beside
it, the manifest is validated by the same loader the service uses, and only then is the staging
directory renamed. An existing version is never replaced without ``force``, and a failed first
export of a name leaves no empty ``<name>/`` behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.inference.manifest import Manifest, list_versions
from service.inference.pinned_files import running


class RefuseOverwrite(FileExistsError):
    pass


def version_dir(repository: Path, name: str, version: int) -> Path:
    list_versions(repository, name)  # validates the name: it must stay inside the repository
    return repository / name / str(version)


def check_target(repository: Path, name: str, version: int, force: bool) -> Path:
    for folder in (repository, repository / name):  # a file in the way: said before any work
        if folder.exists() and not folder.is_dir():
            raise RefuseOverwrite(f"{folder} is a file, not a directory of model versions")
    target = version_dir(repository, name, version)
    if target.exists() and not force:
        raise RefuseOverwrite(f"{target} already exists; pass --force to replace it")
    return target


#: a staging directory of a writer that is gone, untouched this long, is removed by the next writer
ABANDONED_AFTER_S = 3600.0


def remove_abandoned_stagings(folder: Path, older_than_s: float = ABANDONED_AFTER_S) -> list[Path]:
    """Remove what writers killed mid-export left in ``folder`` (a model's directory): staging
    directories whose process is not running here and that nothing wrote into for
    ``older_than_s`` — both, since a writer in another container on a shared volume has a process
    id this machine cannot see. The service never reads them; they only hold disk. Returns them."""
    removed = []
    for staging in folder.glob(".staging-*-*") if folder.is_dir() else []:
        pid = staging.name.rsplit("-", 1)[1]
        with contextlib.suppress(OSError):
            if pid.isdigit() and not running(int(pid)) and time.time() - _last_write(staging) > older_than_s:
                shutil.rmtree(staging)
                removed.append(staging)
    return removed


def _last_write(folder: Path) -> float:
    """When anything in ``folder`` was last written: its files' times too, not only the folder's
    (which moves only when an entry is added or removed)."""
    latest = folder.stat().st_mtime
    for root, _, files in os.walk(folder):
        for name in [".", *files]:
            with contextlib.suppress(OSError):
                latest = max(latest, os.stat(os.path.join(root, name)).st_mtime)
    return latest


@contextmanager
def staged_version(repository: Path, name: str, version: int, force: bool) -> Iterator[Path]:
    """Yield an empty staging directory; on success validate it and move it to its version."""
    target = check_target(repository, name, version, force)
    staging = target.parent / f".staging-{version}-{os.getpid()}"
    model_existed = target.parent.exists()
    remove_abandoned_stagings(target.parent)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(target.parent / f".replaced-{version}-{os.getpid()}", ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        Manifest.load(staging, location=(name, str(version)))  # the service's own check
        replaced = target.parent / f".replaced-{version}-{os.getpid()}"
        if target.exists():  # --force: the old version moves aside whole, then goes
            target.rename(replaced)
        staging.rename(target)
        shutil.rmtree(replaced, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not model_existed and not target.exists():
            # a failed first export leaves no trace: an empty <name>/ reads as a model with no
            # version to whoever lists the repository
            with contextlib.suppress(OSError):  # not empty: another writer put a version in it
                target.parent.rmdir()
