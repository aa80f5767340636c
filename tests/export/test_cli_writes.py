"""What the CLI checks before it trains, and how it stops: a directory it cannot write and a
version that exists are refused before minutes of training (they were found after it, as a
traceback or an error line); Ctrl-C is one line and rc 130, however the code it landed in wrapped
it; a staging directory a killed writer left behind is removed by the next writer."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from export import build, cli, repository
from export.cli import INTERRUPTED, main
from export.data import DatasetMissing, fashion
from export.repository import ABANDONED_AFTER_S, remove_abandoned_stagings, staged_version
from service.inference.manifest import Manifest, ManifestError
from tests.export.test_cli import run_error, tokenized_checkpoint

#: a path no process can create, root included
UNWRITABLE = Path("/proc/attention-serve-test/out")


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def trained(*_: object) -> None:
        raise AssertionError("trained before refusing")  # minutes of the real recipe

    monkeypatch.setattr(build, "train", trained)


@pytest.mark.usefixtures("no_training")
def test_directories_that_cannot_be_written_are_refused_before_any_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = run_error(capsys, "train", "dates-bahdanau", "--checkpoints", str(UNWRITABLE))
    assert f"--checkpoints {UNWRITABLE}/dates-bahdanau: cannot write in /proc" in err
    for argv in (["build", "dates-bahdanau"], ["export", "dates-bahdanau"]):
        err = run_error(capsys, *argv, "--repository", str(UNWRITABLE), "--checkpoints", str(tmp_path))
        assert f"--repository {UNWRITABLE}: cannot write in /proc" in err
    err = run_error(capsys, "build", "dates-bahdanau", "--checkpoints", str(UNWRITABLE),
                    "--repository", str(tmp_path / "repo"))  # fmt: skip
    assert "--checkpoints" in err and "cannot write" in err
    ckpt = tokenized_checkpoint(tmp_path / "hf-like")
    err = run_error(capsys, "import-hf", str(ckpt), "--name", "x", "--repository", str(UNWRITABLE))
    assert "cannot write in /proc" in err
    assert not list(tmp_path.glob("repo/**/*.onnx"))


@pytest.mark.usefixtures("no_training")
def test_build_refuses_an_existing_version_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "repo" / "dates-bahdanau" / "1").mkdir(parents=True)
    err = run_error(capsys, "build", "dates-bahdanau", "--repository", str(tmp_path / "repo"),
                    "--checkpoints", str(tmp_path / "fresh"))  # fmt: skip
    assert "dates-bahdanau/1 already exists; pass --force" in err
    (tmp_path / "repo" / "fashion-vit-int8" / "1").mkdir(parents=True)  # a variant's version too
    err = run_error(capsys, "build", "fashion-vit", "--quantize", "int8", "--repository", str(tmp_path / "repo"),
                    "--checkpoints", str(tmp_path / "fresh"))  # fmt: skip
    assert "fashion-vit-int8/1 already exists" in err


def interrupt() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1)  # the handler runs at the next bytecode: raised from here


@pytest.mark.parametrize("wrapped", [False, True])
def test_ctrl_c_is_one_line_and_rc_130_and_leaves_no_version(
    wrapped: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during an export: a KeyboardInterrupt traceback before, or — where torch.onnx.export
    caught it — its own TorchExportError ('submit a PR to PyTorch')."""

    def exporting(*_: object) -> None:
        try:
            interrupt()
        except KeyboardInterrupt as exc:
            if wrapped:
                raise RuntimeError("Failed to export the model with torch.export") from exc
            raise

    monkeypatch.setattr(build, "export_graph", exporting)
    ckpt = tokenized_checkpoint(tmp_path / "dates-bahdanau")
    repository = tmp_path / "repo"
    code = main(["export", "dates-bahdanau", "--checkpoint", str(ckpt), "--repository", str(repository)])
    assert code == INTERRUPTED
    err = capsys.readouterr().err
    assert err.startswith("interrupted: ") and "Traceback" not in err and err.count("\n") == 1
    assert not (repository / "dates-bahdanau").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_killed_writer_s_staging_is_removed_by_the_next_writer(tmp_path: Path) -> None:
    folder = tmp_path / "dates-bahdanau"
    gone, young, alive = (folder / f".staging-1-{pid}" for pid in (2**22 + 1, 2**22 + 2, os.getppid()))
    for staging in (gone, young, alive):
        staging.mkdir(parents=True)
        (staging / "model.onnx").write_bytes(b"half written")
    old = time.time() - ABANDONED_AFTER_S - 60
    for staging in (gone, alive):
        for path in (staging / "model.onnx", staging):
            os.utime(path, (old, old))
    with pytest.raises(ManifestError), staged_version(tmp_path, "dates-bahdanau", 2, force=False):
        assert not gone.exists()  # its writer is not running and it is old: removed
        assert young.exists() and alive.exists()  # written lately, or its writer runs: kept
    assert remove_abandoned_stagings(tmp_path / "nothing-here") == []


def test_skip_existing_needs_no_write_and_every_recipe_is_checked_before_the_first_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_training: None
) -> None:
    """``make models`` (build --skip-existing) on a complete repository writes nothing, so a
    read-only one is fine (the write check ran first and refused it); and the second recipe's
    existing version is refused before the first recipe trains, not after."""
    repository = tmp_path / "repo"
    (repository / "dates-bahdanau" / "1").mkdir(parents=True)

    def unwritable(directory: Path, what: str) -> None:
        raise cli.Unwritable(f"{what} {directory}: read-only")

    monkeypatch.setattr(cli, "writable", unwritable)
    argv = ["build", "dates-bahdanau", "--repository", str(repository), "--checkpoints", str(tmp_path)]
    assert main([*argv, "--skip-existing"]) == 0
    assert "exists, skipping" in capsys.readouterr().out
    monkeypatch.undo()
    monkeypatch.setattr(build, "train", lambda *_: pytest.fail("trained before refusing"))
    err = run_error(capsys, "build", "fashion-vit", "dates-bahdanau", "--repository", str(repository),
                    "--checkpoints", str(tmp_path / "fresh"))  # fmt: skip
    assert "dates-bahdanau/1 already exists" in err


@pytest.mark.slow
def test_skip_existing_writes_the_missing_variants_of_an_existing_version(
    tiny_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    """``build --skip-existing --quantize int8`` on a repository holding the fp32 version and no
    int8 one said "exists, skipping", exited 0 and wrote nothing."""
    repository = tmp_path / "repo"
    shutil.copytree(tiny_repository / "dates-bahdanau", repository / "dates-bahdanau")
    argv = ["build", "dates-bahdanau", "--repository", str(repository), "--skip-existing"]
    assert main([*argv, "--checkpoints", str(tmp_path / "none"), "--quantize", "int8"]) == 0
    assert "exists, skipping; writing its int8 variants from it" in capsys.readouterr().out
    manifest = Manifest.load(repository / "dates-bahdanau-int8" / "1")
    assert manifest.export.quantization is not None and manifest.eval["test_examples"] > 0
    assert main([*argv, "--checkpoints", str(tmp_path / "none"), "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.strip().endswith("exists, skipping")  # nothing missing now


def test_a_missing_dataset_is_found_before_the_first_recipe_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_training: None
) -> None:
    """``build dates-bahdanau fashion-vit`` without Fashion-MNIST trained and wrote the dates
    model first, then stopped at the ViT's turn."""

    def missing(*_: object) -> None:
        raise DatasetMissing("Fashion-MNIST not found in /nowhere; run: apt-get install …")

    monkeypatch.setattr(fashion, "find_dataset", missing)
    err = run_error(capsys, "build", "dates-bahdanau", "fashion-vit", "--repository", str(tmp_path / "r"),
                    "--checkpoints", str(tmp_path / "c"))  # fmt: skip
    assert "Fashion-MNIST not found" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


def test_a_second_ctrl_c_lets_the_first_one_s_clean_up_finish(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second Ctrl-C while the staging folder was being removed cut the removal short and
    left ``.staging-…`` in the repository (the service then listed the model as refused)."""
    monkeypatch.setattr(build, "export_graph", lambda *_: interrupt())
    real_rmtree, removals = repository.shutil.rmtree, []

    def rmtree_interrupted(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).name.startswith(".staging") and Path(path).exists():  # the clean-up after the first
            removals.append(path)
            interrupt()  # Ctrl-C again, during the clean-up
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(repository.shutil, "rmtree", rmtree_interrupted)
    ckpt = tokenized_checkpoint(tmp_path / "dates-bahdanau")
    code = main(
        ["export", "dates-bahdanau", "--checkpoint", str(ckpt), "--repository", str(tmp_path / "repo")]
    )
    assert code == INTERRUPTED and removals
    assert "interrupted: " in capsys.readouterr().err
    assert not (tmp_path / "repo" / "dates-bahdanau").exists(), list((tmp_path / "repo").rglob("*"))


def test_a_staging_folder_with_recent_files_is_not_abandoned(tmp_path: Path) -> None:
    """A folder's time moves only when entries are added or removed: a writer rewriting one file
    for over an hour looked abandoned."""
    staging = tmp_path / "m" / f".staging-1-{2**22 + 3}"
    staging.mkdir(parents=True)
    (staging / "model.onnx").write_bytes(b"still being written")
    old = time.time() - ABANDONED_AFTER_S - 60
    os.utime(staging, (old, old))
    assert remove_abandoned_stagings(tmp_path / "m") == [] and staging.exists()
    os.utime(staging / "model.onnx", (old, old))
    assert remove_abandoned_stagings(tmp_path / "m") == [staging]


def test_a_forced_replacement_moves_the_old_version_aside_whole(tmp_path: Path) -> None:
    """--force removed the old version before the new one was renamed in: a Ctrl-C between left
    half of it, or none. Now the old one is renamed aside, the new one in, and the old removed."""
    old = tmp_path / "m" / "1"
    old.mkdir(parents=True)
    (old / "old.onnx").write_bytes(b"old")
    with pytest.raises(ManifestError), staged_version(tmp_path, "m", 1, force=True) as staging:
        (staging / "new.onnx").write_bytes(b"new")  # no manifest: refused, the old one stays
    assert (old / "old.onnx").exists()
    (old / "old.json").write_text("{}")
    real_rmtree = repository.shutil.rmtree

    def cut_short(path: Any, *args: Any, **kwargs: Any) -> None:
        """Ctrl-C part-way through removing the old version: one file gone, then interrupted."""
        if Path(path).exists() and not Path(path).name.startswith(".staging"):
            next(Path(path).iterdir()).unlink()
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(repository.Manifest, "load", lambda *_, **__: None)
        patch.setattr(repository.shutil, "rmtree", cut_short)
        with pytest.raises(KeyboardInterrupt), staged_version(tmp_path, "m", 1, force=True) as staging:
            (staging / "new.onnx").write_bytes(b"new")
    # the version served is the new one, whole (the old code left half of the old one, no new)
    assert [p.name for p in old.iterdir()] == ["new.onnx"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(repository.Manifest, "load", lambda *_, **__: None)
        with staged_version(tmp_path, "m", 1, force=True) as staging:  # the next writer tidies up
            (staging / "newer.onnx").write_bytes(b"newer")
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["1"]  # the half-removed old one went too
    assert [p.name for p in old.iterdir()] == ["newer.onnx"]
