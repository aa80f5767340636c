"""The CLI's failures that are the caller's to fix: each is one ``error: …`` line and rc 2, found
before any export work, with nothing left in the repository. Tiny random-weight checkpoints, no
training (the end-to-end CLI runs are in test_build.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models

from export import build, checkpoint
from export.checkpoint import Checkpoint
from export.cli import main
from export.models import build_model


def tiny_checkpoint(directory: Path, recipe: str, family: str) -> Path:
    """A checkpoint as ``export train`` writes it, recording ``recipe`` and ``family``."""
    torch.manual_seed(0)
    model = build_model(
        family, {"src_vocab": 30, "tgt_vocab": 15, "emb_dim": 8, "enc_hidden": 8, "window": 2}
    )
    return checkpoint.save(Checkpoint(recipe, family, model), directory)


def run_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI, expect rc 2 and one ``error:`` line; → that line."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "recipe",
    [
        "dates-luong-dot",  # another family: the manifest would credit Bahdanau's attention to Luong's
        "dates-transformer",  # another family and contract: died after exporting, on cfg.dec_layers
        "bible-fr-en-bahdanau",  # the same family, trained on another corpus with other tokenizers
    ],
)
def test_export_refuses_a_checkpoint_of_another_recipe(
    recipe: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "dates-bahdanau", "rnn-additive")
    repository = tmp_path / "repo"
    err = run_error(capsys, "export", recipe, "--checkpoint", str(ckpt), "--repository", str(repository))
    assert "'dates-bahdanau' (rnn-additive)" in err and f"not '{recipe}'" in err
    assert not repository.exists() or not any(repository.iterdir())


def test_export_without_a_checkpoint_says_how_to_train_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoints, repository = tmp_path / "none", tmp_path / "repo"
    err = run_error(
        capsys, "export", "dates-bahdanau", "--checkpoints", str(checkpoints), "--repository", str(repository)
    )
    assert f"no checkpoint at {checkpoints / 'dates-bahdanau'}" in err
    assert f"python -m export train dates-bahdanau --checkpoints {checkpoints}" in err
    assert not repository.exists()


def test_export_refuses_a_file_that_is_not_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / checkpoint.WEIGHTS).write_bytes(b"not safetensors")
    err = run_error(
        capsys, "export", "dates-bahdanau", "--checkpoint", str(ckpt), "--repository", str(tmp_path)
    )
    assert "is not a checkpoint export can load" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "dates-bahdanau", "--version", "0"],
        ["export", "dates-bahdanau", "--version", "-1"],
        ["import-hf", "somewhere", "--name", "x", "--version", "0"],
    ],
)
def test_versions_below_one_are_refused_before_any_work(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--version 0`` exported for 20 s, then failed validating the manifest."""
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--repository", str(tmp_path)])
    assert exit_.value.code == 2
    assert "--version: must be at least 1" in capsys.readouterr().err


def test_train_refuses_to_replace_a_checkpoint_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Versions exported from a checkpoint record its sha256; replacing it silently orphans them."""

    def no_training(*_: object) -> None:
        raise AssertionError("trained over an existing checkpoint")  # minutes of the real recipe

    monkeypatch.setattr(build, "train", no_training)
    ckpt = tiny_checkpoint(tmp_path / "dates-bahdanau", "dates-bahdanau", "rnn-additive")
    before = (ckpt / checkpoint.WEIGHTS).read_bytes()
    err = run_error(capsys, "train", "dates-bahdanau", "--checkpoints", str(tmp_path))
    assert "already holds a checkpoint; pass --force" in err
    assert (ckpt / checkpoint.WEIGHTS).read_bytes() == before


def test_unknown_recipe_and_missing_repository_are_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "unknown recipe 'nope'" in run_error(capsys, "export", "nope")
    assert "no model repository at" in run_error(capsys, "eval", "--repository", str(tmp_path / "none"))


def tokenized_checkpoint(directory: Path) -> Path:
    """``tiny_checkpoint`` with both tokenizers, as a trained translation checkpoint has them."""
    tokenizer = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
    torch.manual_seed(0)
    model = build_model(
        "rnn-additive", {"src_vocab": 30, "tgt_vocab": 15, "emb_dim": 8, "enc_hidden": 8, "window": 2}
    )
    ckpt = Checkpoint("dates-bahdanau", "rnn-additive", model, tokenizer, tokenizer, {"epochs": 1})
    return checkpoint.save(ckpt, directory)


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d: (d / checkpoint.SOURCE_TOKENIZER).unlink(), "needs source_tokenizer.json"),
        (lambda d: (d / checkpoint.TARGET_TOKENIZER).write_text("{not json"), "is not a tokenizer file"),
        (lambda d: (d / "train.json").write_text('{"epochs": '), "train.json is not valid JSON"),
        (lambda d: (d / "train.json").write_bytes(b"\xff\xfe"), "train.json is not valid JSON"),
    ],
    ids=["tokenizer missing", "tokenizer corrupt", "train.json cut", "train.json not UTF-8"],
)
def test_a_damaged_checkpoint_is_one_error_line_before_any_export(
    damage: Any,
    named: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each of these raised a traceback (a missing tokenizer only after the whole export)."""

    def exported(*_: object) -> None:
        raise AssertionError("export work started on a damaged checkpoint")

    monkeypatch.setattr(build, "export_graph", exported)
    ckpt = tokenized_checkpoint(tmp_path / "dates-bahdanau")
    damage(ckpt)
    repository = tmp_path / "repo"
    err = run_error(
        capsys, "export", "dates-bahdanau", "--checkpoint", str(ckpt), "--repository", str(repository)
    )
    assert named in err
    assert not (repository / "dates-bahdanau").exists()


@pytest.mark.parametrize("command", ["export", "import-hf"])
def test_a_repository_that_is_a_file_is_an_error_line(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--repository`` naming a file raised NotADirectoryError from the staging step."""
    ckpt = tokenized_checkpoint(tmp_path / "dates-bahdanau")
    (tmp_path / "repo").write_text("not a folder")
    source = (
        ["dates-bahdanau", "--checkpoint", str(ckpt)] if command == "export" else [str(ckpt), "--name", "x"]
    )
    err = run_error(capsys, command, *source, "--repository", str(tmp_path / "repo"))
    assert "is a file, not a directory" in err


def test_help_shows_defaults_that_say_something(capsys: pytest.CaptureFixture[str]) -> None:
    """``eval --no-int8`` said "(default: True)", read as "skipped by default"; required or unset
    options said "(default: None)"; the directories' defaults are shown."""
    for command in ("build", "train", "export", "eval", "import-hf"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and "(default: True)" not in text, command
        assert "(default: False)" not in text and text.count("(default: CHECKPOINTS/RECIPE)") <= 1, command
        if command != "train":
            assert "(default: model_repository)" in text, command
