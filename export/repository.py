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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.inference.manifest import Manifest, list_versions


class RefuseOverwrite(FileExistsError):
    pass


def version_dir(repository: Path, name: str, version: int) -> Path:
    list_versions(repository, name)  # validates the name: it must stay inside the repository
    return repository / name / str(version)


def next_version(repository: Path, name: str) -> int:
    versions = list_versions(repository, name)
    return versions[-1] + 1 if versions else 1


def check_target(repository: Path, name: str, version: int, force: bool) -> Path:
    for folder in (repository, repository / name):  # a file in the way: said before any work
        if folder.exists() and not folder.is_dir():
            raise RefuseOverwrite(f"{folder} is a file, not a directory of model versions")
    target = version_dir(repository, name, version)
    if target.exists() and not force:
        raise RefuseOverwrite(f"{target} already exists; pass --force to replace it")
    return target


@contextmanager
def staged_version(repository: Path, name: str, version: int, force: bool) -> Iterator[Path]:
    """Yield an empty staging directory; on success validate it and move it to its version."""
    target = check_target(repository, name, version, force)
    staging = target.parent / f".staging-{version}-{os.getpid()}"
    model_existed = target.parent.exists()
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        Manifest.load(staging, location=(name, str(version)))  # the service's own check
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not model_existed and not target.exists():
            # a failed first export leaves no trace: an empty <name>/ reads as a model with no
            # version to whoever lists the repository
            with contextlib.suppress(OSError):  # not empty: another writer put a version in it
                target.parent.rmdir()
