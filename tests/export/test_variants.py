"""Variants end to end on the tiny models: a float16 round trip per family (RNN, Transformer with
its KV cache, ViT) declares float16 for every float tensor its graphs have, passes its verdict
against fp32 and records its held-out metrics and attention drift beside fp32's, like int8; an
existing variant is never replaced without ``--force``, and nothing is exported before that is
known."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from export import build, fp16, recipes
from export.cli import main
from export.onnx_export import ExportVerificationError, graph_spec
from export.repository import RefuseOverwrite
from export.variants import base_name, variant_name, write_variant
from service.inference.manifest import Manifest
from tests.conftest import TINY


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY))
def test_fp16_round_trip(name: str, tiny_repository: Path, fp16_repository: Path) -> None:
    base = Manifest.load(tiny_repository / name / "1")
    directory = fp16_repository / f"{name}-fp16" / "1"
    manifest = Manifest.load(directory)
    for key, spec in manifest.graphs.items():
        assert spec == graph_spec(onnx.load(str(directory / spec.file)), spec.file)  # as written
        floats = {t.dtype for t in (*spec.inputs, *spec.outputs) if t.dtype.startswith("float")}
        assert floats == {"float16"}
        fp32 = base.graphs[key]
        assert [(t.name, t.shape) for t in (*spec.inputs, *spec.outputs)] == [
            (t.name, t.shape) for t in (*fp32.inputs, *fp32.outputs)
        ]
    export = manifest.export
    assert export.quantization is not None and export.quantization.startswith("float16")
    outputs = {f"{key}.{t.name}" for key, g in manifest.graphs.items() for t in g.outputs}
    assert export.variant_max_diff is not None and set(export.variant_max_diff) == outputs
    assert export.variant_tolerance == fp16.TOLERANCE
    assert max(export.variant_max_diff.values()) <= fp16.TOLERANCE
    details = manifest.eval_details
    assert {f"fp32_{k}" for k in base.eval} <= details.keys()
    # the parity figures it carries are its fp32 graphs', and it says so
    assert export.parity_max_abs_diff == base.export.parity_max_abs_diff
    assert str(details["parity_of"]).startswith(f"{name} version 1: export.parity_max_abs_diff")
    assert 0.99 < float(details["attention_correlation"]) <= 1.0
    assert 0.9 < float(details["attention_argmax_agreement"]) <= 1.0
    assert manifest.eval["test_examples"] == 64
    key = next(k for k in ("accuracy", "exact_match") if k in manifest.eval)
    assert abs(manifest.eval[key] - base.eval[key]) <= 2 / 64  # a prediction or two may flip


@pytest.mark.slow
def test_an_int8_manifest_leaves_the_verdict_fields_out(tiny_repository: Path) -> None:
    """int8 variants have no tolerance to meet: their manifests keep the fields out, so a service
    from before the fields existed (strict schema) still loads them."""
    path = tiny_repository / "fashion-vit-int8" / "1" / "manifest.json"
    exported = json.loads(path.read_text())["export"]
    assert "variant_max_diff" not in exported and "variant_tolerance" not in exported
    assert Manifest.load(tiny_repository / "fashion-vit-int8" / "1").export.variant_max_diff is None


@pytest.mark.slow
def test_a_variant_that_fails_leaves_no_version_of_any_model(
    tiny_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fp32 version used to be final before its variants were made: a float16 verdict that
    failed left it (and the int8 variant) written, and a retry then needed --force."""
    monkeypatch.setattr(fp16, "TOLERANCE", 0.0)  # no float16 graph meets it
    name = "dates-bahdanau"
    recipe = recipes.get(name).scaled(n_train=TINY[name][0], n_test=64, epochs=TINY[name][1])
    checkpoints = tiny_repository.parent / "checkpoints" / name
    repository = tmp_path / "repository"
    with pytest.raises(ExportVerificationError, match="float16 graphs differ from fp32"):
        build.export(checkpoints, recipe, repository, quantize="int8", precision="fp16")
    assert not repository.exists() or list(repository.iterdir()) == []


@pytest.mark.slow
def test_a_variant_is_not_replaced_without_force(tiny_repository: Path, fp16_repository: Path) -> None:
    path = fp16_repository / "dates-bahdanau-fp16" / "1" / "manifest.json"
    before = path.read_text()
    fp32_dir, recipe = tiny_repository / "dates-bahdanau" / "1", recipes.get("dates-bahdanau")
    with pytest.raises(RefuseOverwrite, match="pass --force"):
        write_variant(fp32_dir, recipe, fp16_repository, "fp16", force=False)
    assert path.read_text() == before


def test_cli_refuses_before_any_work_when_the_variant_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "dates-bahdanau-fp16" / "1").mkdir(parents=True)
    missing = str(tmp_path / "no-checkpoint")  # never read: the refusal comes first
    args = ["--checkpoint", missing, "--repository", str(tmp_path), "--precision", "fp16"]
    code = main(["export", "dates-bahdanau", *args])
    assert code == 2
    assert "dates-bahdanau-fp16/1 already exists; pass --force" in capsys.readouterr().err
    assert not (tmp_path / "dates-bahdanau").exists()


def test_variant_names() -> None:
    assert variant_name("fashion-vit", "fp16") == "fashion-vit-fp16"
    for name in ("fashion-vit-int8", "fashion-vit-fp16", "fashion-vit"):
        assert base_name(name) == "fashion-vit"
    with pytest.raises(KeyError):
        variant_name("fashion-vit", "fp8")
