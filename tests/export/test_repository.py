"""Staged writes: a failed export leaves the repository as it found it."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.repository import staged_version


def fail_staging(repository: Path, name: str, version: int = 1) -> None:
    with pytest.raises(RuntimeError), staged_version(repository, name, version, force=False) as staging:
        (staging / "model.onnx").write_bytes(b"half written")
        raise RuntimeError("export failed")


def test_a_failed_first_export_leaves_no_model_directory(tmp_path: Path) -> None:
    fail_staging(tmp_path, "dates-bahdanau")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_keeps_the_model_directory_it_found(tmp_path: Path) -> None:
    (tmp_path / "dates-bahdanau" / "1").mkdir(parents=True)
    fail_staging(tmp_path, "dates-bahdanau", version=2)
    (tmp_path / "empty").mkdir()  # made by someone else: not ours to remove
    fail_staging(tmp_path, "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dates-bahdanau", "empty"]
    assert [p.name for p in (tmp_path / "dates-bahdanau").iterdir()] == ["1"]
    assert list((tmp_path / "empty").iterdir()) == []
