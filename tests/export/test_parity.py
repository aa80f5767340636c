"""The maps a client gets from the running service equal PyTorch's on the same inputs (≤ 1e-4),
and ``make eval`` (export/eval_report.py) scores every model into its manifest and a report."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from export import checkpoint, eval_report
from export.parity import target_ids, torch_alignment
from service.inference.attention import rollout
from service.inference.manifest import Manifest
from service.inference.translation import Translator
from service.inference.vision import preprocess
from tests.conftest import Service, fashion_available
from tests.service.test_app import canvas_png

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4
TEXTS = ["3 mars 2011", "Saturday, January 22, 1994", "1. Dezember 1987", "el 7 de julio de 2020"]


def _model(service: Service, name: str) -> torch.nn.Module:
    return checkpoint.load(service.repository.parent / "checkpoints" / name).model


@pytest.mark.parametrize("name", ["dates-bahdanau", "dates-transformer"])
def test_served_alignments_equal_pytorch(service: Service, name: str) -> None:
    """One request with texts of different lengths (so the batch is padded): every attention
    value of every translation, every layer and head for the Transformer, as PyTorch computes it
    teacher-forced on the tokens the service generated."""
    body = service.post(
        f"/v1/models/{name}/translate",
        json={"text": TEXTS, "return_attention": True, "attention_layers": "all"},
    ).json()
    directory = service.repository / name / "1"
    manifest = Manifest.load(directory)
    assert manifest.translation is not None
    translator, model = Translator(directory, manifest, ["CPUExecutionProvider"]), _model(service, name)
    for text, out in zip(TEXTS, body["translations"], strict=True):
        source_ids, source_tokens = translator.tokenize(text)
        assert out["source_tokens"] == source_tokens
        ids = [translator.target_tokenizer.token_to_id(t) for t in out["target_tokens"]]
        offline = torch_alignment(model, source_ids, ids, manifest.translation.target_tokenizer.bos_id)
        served = np.array(out["attention"]["values"])  # (T, S)
        if offline.ndim == 2:  # RNN: (T, S)
            np.testing.assert_allclose(served, offline, atol=TOLERANCE)
        else:  # Transformer: (T, layers, heads, S); the default map is the last layer's head mean
            np.testing.assert_allclose(served, offline[:, -1].mean(axis=1), atol=TOLERANCE)
            layers = np.array(out["attention"]["layers"])  # (layers, heads, T, S)
            np.testing.assert_allclose(layers, offline.transpose(1, 2, 0, 3), atol=TOLERANCE)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_served_image_maps_equal_pytorch(service: Service, fusion: str) -> None:
    """The raw attentions of every layer and head, and the rollout the service draws from them."""
    png, _ = canvas_png(3)
    body = service.post(
        "/v1/models/fashion-vit/classify",
        json={
            "image": base64.b64encode(png).decode(),
            "return_attention": True,
            "head_fusion": fusion,
            "attention_layers": "all",
        },
    ).json()
    manifest = Manifest.load(service.repository / "fashion-vit" / "1")
    assert manifest.image is not None
    pixels, _ = preprocess(Image.open(io.BytesIO(png)), manifest.image)
    with torch.no_grad():
        _, attentions = _model(service, "fashion-vit")(torch.from_numpy(pixels[None]))
    offline = attentions[0].numpy()  # (layers, heads, T, T)
    np.testing.assert_allclose(np.array(body["attention"]["layers"]), offline, atol=TOLERANCE)
    grid = np.array(body["attention"]["values"])
    np.testing.assert_allclose(grid, rollout(offline, fusion).reshape(grid.shape), atol=TOLERANCE)  # type: ignore[arg-type]


def test_target_ids_refuse_tokens_outside_the_vocabulary(tiny_repository: Path) -> None:
    directory = tiny_repository / "dates-bahdanau" / "1"
    translator = Translator(directory, Manifest.load(directory), ["CPUExecutionProvider"])
    [result] = translator.translate(["3 mars 2011"])
    assert (
        translator.target_tokenizer.decode(target_ids(translator, result), skip_special_tokens=True)
        == result.text
    )
    result.target_tokens.append("not-a-token")
    with pytest.raises(ValueError, match="vocabulary"):
        target_ids(translator, result)


@pytest.fixture(scope="module")
def evaluated(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``make eval`` on a copy of the tiny repository (the session's service serves the original)."""
    if not fashion_available():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    root = tmp_path_factory.mktemp("eval")
    repository = root / "model_repository"
    shutil.copytree(tiny_repository, repository)
    sizes = eval_report.Sizes(dates=64, canvases=64, parity=16, held_out=64)
    report = eval_report.run(repository, tiny_repository.parent / "checkpoints", root / "reports", sizes)
    return repository, report


def test_eval_scores_go_into_the_manifests(evaluated: tuple[Path, Path]) -> None:
    repository, _ = evaluated
    for name in ("dates-bahdanau", "dates-transformer"):
        scores = Manifest.load(repository / name / "1").eval
        assert 0 <= scores["alignment_error_rate"] <= 1 and 0 < scores["alignment_mass"] <= 1
        assert scores["service_vs_pytorch_max_abs_diff"] <= TOLERANCE
        assert "exact_match" in scores  # the build's numbers stay
    transformer = Manifest.load(repository / "dates-transformer" / "1").eval
    assert {"alignment_error_rate_layer0", "alignment_error_rate_layer1"} <= transformer.keys()
    for name in ("fashion-vit", "fashion-vit-int8"):
        scores = Manifest.load(repository / name / "1").eval
        for fused in ("rollout_mean", "rollout_max", "rollout_min", "last_layer_cls"):
            assert 0 <= scores[f"pointing_game_{fused}"] <= 1
    vit = Manifest.load(repository / "fashion-vit" / "1").eval
    assert vit["service_vs_pytorch_max_abs_diff"] <= TOLERANCE
    # the int8 variant is compared with fp32 for drift, not with PyTorch
    assert "service_vs_pytorch_max_abs_diff" not in Manifest.load(repository / "fashion-vit-int8" / "1").eval


def test_eval_report_has_every_table_and_verdict(evaluated: tuple[Path, Path]) -> None:
    _, report = evaluated
    text = report.read_text()
    for heading in ("## Translation", "## Vision", "## Quantised", "## Service vs PyTorch"):
        assert heading in text
    assert "| `dates-bahdanau` | Bahdanau (additive) |" in text
    assert text.count("Goal:") == 4  # best AER, pointing game for each ViT (fp32, int8), PyTorch parity
    assert "≤ 1e-04 for every model — **met**" in text
    data = json.loads(report.with_suffix(".json").read_text())
    names = {m["name"] for m in data["models"]}
    assert names == {"dates-bahdanau", "dates-transformer", "fashion-vit", "fashion-vit-int8"}
    int8 = {m["name"]: m["int8"] for m in data["models"]}
    assert 0.9 < int8["dates-bahdanau"]["attention_correlation"] <= 1
    assert 0 <= int8["fashion-vit"]["attention_argmax_agreement"] <= 1
    assert int8["fashion-vit-int8"] == {}  # already int8: not quantised again


def test_eval_refuses_to_compare_with_a_different_checkpoint(tiny_repository: Path, tmp_path: Path) -> None:
    """PyTorch parity is only meaningful against the weights the version was exported from."""
    wrong = tmp_path / "checkpoints" / "dates-bahdanau"
    shutil.copytree(tiny_repository.parent / "checkpoints" / "dates-transformer", wrong)
    directory = tiny_repository / "dates-bahdanau" / "1"
    manifest = Manifest.load(directory)
    recipe = eval_report.recipe_for(manifest)
    assert recipe is not None
    numbers, note = eval_report.parity_metrics(
        directory, manifest, recipe, tmp_path / "checkpoints", eval_report.Sizes()
    )
    assert numbers == {} and note is not None and "not the checkpoint" in note
    numbers, note = eval_report.parity_metrics(
        directory, manifest, recipe, tmp_path / "none", eval_report.Sizes()
    )
    assert numbers == {} and note is not None and "no checkpoint" in note
