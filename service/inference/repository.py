"""Discovering servable models in the repository.

Each model name resolves only to a directory *inside* the repository (names are validated by the
manifest's pattern). For each name the highest version whose manifest validates is served; a
corrupt or incompatible version is reported with its reason and skipped, so one bad directory
never takes the other models down.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from service.inference.manifest import NAME_PATTERN, Manifest, ManifestError, list_versions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: int
    directory: Path
    manifest: Manifest


@dataclass
class Discovery:
    models: dict[str, ModelEntry]
    rejected: dict[str, str]  # "<name>/<version>" → reason


def discover(repository: Path, only: list[str] | None = None) -> Discovery:
    models: dict[str, ModelEntry] = {}
    rejected: dict[str, str] = {}
    directories = sorted(p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = []
    for name in directories:
        if only is not None and name not in only:
            continue
        if re.match(NAME_PATTERN, name):
            names.append(name)
        else:  # said, not skipped in silence (`Dates-Bahdanau` was, and "the repository is empty")
            rejected[name] = "not a model name: lowercase letters, digits, '.', '_' or '-', 64 at most"
    for name in names:
        versions = list_versions(repository, name)
        if not versions:
            rejected[name] = "no version directory (a positive integer: 1, 2, …)"
        for version in reversed(versions):
            try:
                models[name] = load_entry(repository, name, version)
            except ManifestError as exc:
                rejected[f"{name}/{version}"] = str(exc)
                log.error("refusing %s/%s: %s", name, version, exc)
                continue
            break
    missing = sorted(set(only or []) - models.keys())
    for name in missing:
        rejected.setdefault(name, "no valid version in the repository")
    return Discovery(models, rejected)


def load_entry(repository: Path, name: str, version: int) -> ModelEntry:
    """One version of one model, its manifest validated (raises :class:`ManifestError`)."""
    if not re.match(NAME_PATTERN, name):
        raise ManifestError(f"{name!r} is not a valid model name")
    directory = repository / name / str(int(version))
    return ModelEntry(name, int(version), directory, Manifest.load(directory))
