"""Discovering models: only inside the repository, never by unpickling anything."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from service.inference.manifest import ManifestError
from service.inference.repository import discover, load_entry
from service.inference.runners import make_runner
from service.settings import Limits


def test_loading_every_model_never_unpickles(tiny_repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole load path — manifests, tokenizers, ONNX sessions, a warm-up inference — with
    every unpickling entry point made to fail."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("something on the load path unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    found = discover(tiny_repository)
    assert set(found.models) >= {"dates-bahdanau", "dates-transformer", "fashion-vit"}
    for entry in found.models.values():
        make_runner(entry, ["CPUExecutionProvider"], 1, Limits()).warmup()


def test_names_never_leave_the_repository(tiny_repository: Path) -> None:
    for name in ("..", "../dates-bahdanau", "/etc", "dates-bahdanau/../x", ".hidden"):
        with pytest.raises(ManifestError, match="not a valid model name"):
            load_entry(tiny_repository, name, 1)


def test_a_corrupt_version_is_refused_and_the_previous_one_served(
    tiny_repository: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(tiny_repository / "dates-bahdanau", repository / "dates-bahdanau")
    v2 = repository / "dates-bahdanau" / "2"
    shutil.copytree(repository / "dates-bahdanau" / "1", v2)
    manifest = (v2 / "manifest.json").read_text().replace('"version": 1', '"version": 2')
    (v2 / "manifest.json").write_text(manifest)
    (v2 / "encoder.onnx").write_bytes((v2 / "encoder.onnx").read_bytes()[:100])  # truncated
    found = discover(repository)
    assert found.models["dates-bahdanau"].version == 1
    assert "sha256" in found.rejected["dates-bahdanau/2"]


def test_directories_that_are_not_models_are_named_not_skipped(tiny_repository: Path, tmp_path: Path) -> None:
    """A model directory with an upper-case name or versions like ``v1`` used to be skipped in
    silence (a repository of only those was "empty"); hidden directories stay unremarked."""
    repository = tmp_path / "repository"
    shutil.copytree(tiny_repository / "dates-bahdanau", repository / "dates-bahdanau")
    shutil.copytree(tiny_repository / "dates-bahdanau" / "1", repository / "Dates-Upper" / "1")
    shutil.copytree(tiny_repository / "dates-bahdanau" / "1", repository / "dates-v" / "v1")
    (repository / ".git").mkdir()
    found = discover(repository)
    assert list(found.models) == ["dates-bahdanau"]
    assert set(found.rejected) == {"Dates-Upper", "dates-v"}
    assert (
        "not a model name" in found.rejected["Dates-Upper"]
        and "no version directory" in found.rejected["dates-v"]
    )
