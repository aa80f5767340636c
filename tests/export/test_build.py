"""End to end on a few hundred examples: train → checkpoint → export → evaluate → repository."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export import build, checkpoint, recipes
from export.cli import main
from service.inference.manifest import Manifest, file_sha256
from service.inference.translation import Translator

pytestmark = pytest.mark.slow


def test_tiny_repository_has_valid_manifests(tiny_repository: Path) -> None:
    names = sorted(p.name for p in tiny_repository.iterdir())
    assert names == ["dates-bahdanau", "dates-transformer", "fashion-vit", "fashion-vit-int8"]
    for name in names:
        manifest = Manifest.load(tiny_repository / name / "1")
        assert manifest.eval["test_examples"] == 64
        assert max(manifest.export.parity_max_abs_diff.values()) <= manifest.export.parity_tolerance
        assert len(manifest.export.verified_shapes) >= 3
        assert all(isinstance(t.shape[0], str) for g in manifest.graphs.values() for t in g.inputs)
    # the axes each family's graphs have: the RNN's see no target length (it was listed)
    shapes = {n: Manifest.load(tiny_repository / n / "1").export.verified_shapes for n in names}
    axes = {n: {k for shape in s for k in shape} for n, s in shapes.items()}
    assert axes["dates-bahdanau"] == {"batch", "src_len"} and axes["fashion-vit"] == {"batch"}
    assert axes["dates-transformer"] == {"batch", "src_len", "past_len"}


def test_int8_variant_records_drift_next_to_fp32(tiny_repository: Path) -> None:
    manifest = Manifest.load(tiny_repository / "fashion-vit-int8" / "1")
    assert manifest.export.quantization is not None
    details = manifest.eval_details
    assert {"fp32_accuracy", "attention_correlation", "attention_argmax_agreement"} <= details.keys()
    assert 0.5 < float(details["attention_correlation"]) <= 1.0
    assert str(details["parity_of"]).startswith("fashion-vit version 1: export.parity_max_abs_diff")


def test_exported_translator_decodes_with_attention(tiny_repository: Path) -> None:
    for name in ("dates-bahdanau", "dates-transformer"):
        directory = tiny_repository / name / "1"
        manifest = Manifest.load(directory)
        [result] = Translator(directory, manifest, ["CPUExecutionProvider"]).translate(
            ["5 mars 2024"], beam_size=2
        )
        assert result.source_tokens[-1] == "</s>" and len(result.source_tokens) == len("5 mars 2024") + 1
        assert result.attention.shape[0] == len(result.target_tokens)
        assert result.attention.shape[-1] == len(result.source_tokens)
        np.testing.assert_allclose(result.attention.sum(-1), 1.0, atol=1e-5)


def test_checkpoint_round_trip_needs_no_pickle(tiny_repository: Path) -> None:
    ckpt_dir = tiny_repository.parent / "checkpoints" / "dates-bahdanau"
    data = (ckpt_dir / checkpoint.WEIGHTS).read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])  # safetensors: a JSON header, then raw tensors
    assert header["__metadata__"]["family"] == "rnn-additive"
    manifest = Manifest.load(tiny_repository / "dates-bahdanau" / "1")
    assert manifest.checkpoint_sha256 == file_sha256(ckpt_dir / checkpoint.WEIGHTS)
    assert set(manifest.checksums) == set(manifest.files())  # every file it names, hashed


def test_cli_refuses_to_overwrite_without_force(
    tiny_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tiny_repository.parent / "checkpoints" / "dates-bahdanau"
    before = (tiny_repository / "dates-bahdanau" / "1" / "manifest.json").read_text()
    code = main(["export", "dates-bahdanau", "--checkpoint", str(ckpt), "--repository", str(tiny_repository)])
    assert code == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (tiny_repository / "dates-bahdanau" / "1" / "manifest.json").read_text() == before


def test_cli_refuses_a_model_below_its_floor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint trained on 64 examples for one epoch cannot meet the real recipe's 99 %
    floor: export must refuse it and leave nothing behind."""
    weak = recipes.get("dates-bahdanau").scaled(n_train=64, n_test=16, epochs=1)
    build.train(weak, tmp_path / "weak")
    repository = tmp_path / "repo"
    code = main(
        ["export", "dates-bahdanau", "--checkpoint", str(tmp_path / "weak"), "--repository", str(repository)]
    )
    assert code == 3
    assert "below the recipe's floors" in capsys.readouterr().err
    assert not (repository / "dates-bahdanau").exists()  # no version, no staging, no empty model directory


def test_cli_lists_and_rejects_unknown_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in recipes.DEFAULT)
    assert main(["build", "no-such-recipe"]) == 2
    assert "unknown recipe" in capsys.readouterr().err
