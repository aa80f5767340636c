"""KV-cached decoder graphs (``transformer-kv-layers``): whole decodes equal PyTorch's whole-prefix
decoding, the check can fail, and repositories exported before — the packed-cache
``transformer-kv`` contract, served by the scheduler, and the whole-prefix ``transformer``
contract, served by the static batcher — are still served with the same answers."""

from __future__ import annotations

import asyncio
import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export import checkpoint
from export.graphs import SEQ_SHAPES, GraphPlan, transformer_plans, transformer_prefix_plans
from export.models.transformer import Transformer
from export.onnx_export import ExportVerificationError, export_graph
from export.parity import cached_decode_parity
from service.inference.jobs import TranslateJob
from service.inference.manifest import Manifest
from service.inference.repository import ModelEntry
from service.inference.translation import Translator
from service.inference.worker import ModelWorker
from service.settings import Settings

pytestmark = pytest.mark.slow
CPU = ["CPUExecutionProvider"]
TEXTS = ["3 mars 2011", "Saturday, January 22, 1994", "1. Dezember 1987", "el 7 de julio de 2020", "9/9/86"]


@pytest.fixture(scope="module")
def kv_version(tiny_repository: Path) -> Path:
    return tiny_repository / "dates-transformer" / "1"


@pytest.fixture(scope="module")
def model(tiny_repository: Path) -> Transformer:
    loaded = checkpoint.load(tiny_repository.parent / "checkpoints" / "dates-transformer").model
    assert isinstance(loaded, Transformer)
    return loaded.eval()


def older_version(kv_version: Path, directory: Path, plans: list[GraphPlan], decoder: str) -> Path:
    """The same checkpoint as a repository written before: other graphs, another decoder contract."""
    shutil.copytree(kv_version, directory)
    manifest = Manifest.load(kv_version)
    graphs = {plan.key: export_graph(plan, directory).spec for plan in plans}
    assert manifest.translation is not None
    translation = manifest.translation.model_copy(update={"decoder": decoder})
    manifest.model_copy(update={"graphs": graphs, "translation": translation}).write(directory)
    return directory


@pytest.fixture(scope="module")
def prefix_version(kv_version: Path, model: Transformer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Written before the KV cache: whole-prefix graphs."""
    directory = tmp_path_factory.mktemp("prefix") / "dates-transformer" / "1"
    return older_version(kv_version, directory, transformer_prefix_plans(model), "transformer")


@pytest.fixture(scope="module")
def packed_version(kv_version: Path, model: Transformer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Written before per-layer caches: every layer's cache in one tensor per kind."""
    directory = tmp_path_factory.mktemp("packed") / "dates-transformer" / "1"
    return older_version(kv_version, directory, transformer_plans(model, packed=True), "transformer-kv")


def test_the_export_verified_whole_decodes(kv_version: Path) -> None:
    manifest = Manifest.load(kv_version)
    assert manifest.translation is not None and manifest.translation.decoder == "transformer-kv-layers"
    parity = manifest.export.parity_max_abs_diff
    assert parity["decode.score"] <= 1e-4 and parity["decode.attention"] <= 1e-4
    layers = manifest.translation.num_layers
    step = manifest.graphs["decoder_step"]
    names = {t.name for t in step.inputs}
    assert {"past_mask", "positions"} | {f"past_keys.{i}" for i in range(layers)} <= names
    assert {f"present_values.{i}" for i in range(layers)} <= {t.name for t in step.outputs}
    encoder_outputs = {t.name for t in manifest.graphs["encoder"].outputs}
    assert {
        f"cross_keys.{i}" for i in range(layers)
    } <= encoder_outputs and "cross_keys" not in encoder_outputs


def test_cached_decode_parity_refuses_graphs_of_another_model(kv_version: Path, model: Transformer) -> None:
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.generator.weight.add_(0.5 * torch.randn_like(other.generator.weight))
    with pytest.raises(ExportVerificationError):
        cached_decode_parity(kv_version, Manifest.load(kv_version), other, shapes=SEQ_SHAPES[:1], beams=(1,))


@pytest.mark.parametrize("older", ["prefix_version", "packed_version"])
def test_older_repositories_translate_the_same(
    kv_version: Path, older: str, request: pytest.FixtureRequest
) -> None:
    old_version: Path = request.getfixturevalue(older)
    new = Translator(kv_version, Manifest.load(kv_version), CPU)
    old = Translator(old_version, Manifest.load(old_version), CPU)
    for beam in (1, 3):
        for a, b in zip(
            new.translate(TEXTS, beam_size=beam), old.translate(TEXTS, beam_size=beam), strict=True
        ):
            assert a.target_tokens == b.target_tokens
            assert a.score == pytest.approx(b.score, abs=1e-4)
            np.testing.assert_allclose(a.attention, b.attention, atol=1e-4)


def test_workers_schedule_cached_models_and_batch_older_ones(
    kv_version: Path, packed_version: Path, prefix_version: Path
) -> None:
    """The KV-cached versions (per-layer and packed caches) run on the scheduler, the whole-prefix
    one on the static batcher, under the same concurrent requests, with equal answers."""
    settings = Settings(repository=kv_version.parent.parent)

    async def answers(version: Path) -> tuple[ModelWorker, list]:
        entry = ModelEntry("dates-transformer", 1, version, Manifest.load(version))
        worker = ModelWorker(entry, settings, "r", "n")
        jobs = [TranslateJob(texts=TEXTS[: i % 4 + 1], beam_size=1 + 2 * (i % 2)) for i in range(12)]
        return worker, list(await asyncio.gather(*(worker.predict(j) for j in jobs)))

    new_worker, new = asyncio.run(answers(kv_version))
    packed_worker, packed = asyncio.run(answers(packed_version))
    old_worker, old = asyncio.run(answers(prefix_version))
    assert new_worker.scheduler is not None and packed_worker.scheduler is not None
    assert old_worker.scheduler is None
    assert max(a.metrics.batch_size for a in new) > 1 and new[0].metrics.time_to_first_token_ms is not None
    for a, b, c in zip(new, packed, old, strict=True):
        tokens = [t.target_tokens for t in a.result.translations]
        assert tokens == [t.target_tokens for t in b.result.translations]
        assert tokens == [t.target_tokens for t in c.result.translations]


def test_cached_decode_parity_decodes_both_sides_to_the_manifests_limit(
    kv_version: Path, model: Transformer
) -> None:
    """A model whose ``max_target_tokens`` is below the check's own ``max_len`` (16): the service's
    decode stops at the manifest's limit, so PyTorch's must too — it went on, and the export of
    correct graphs was refused as decoding other tokens."""
    manifest = Manifest.load(kv_version)
    assert manifest.translation is not None
    short = manifest.translation.model_copy(update={"max_target_tokens": 4})
    worst = cached_decode_parity(
        kv_version,
        manifest.model_copy(update={"translation": short}),
        model,
        shapes=SEQ_SHAPES[:1],
        beams=(1, 3),
    )
    assert worst["decode.score"] <= 1e-4 and worst["decode.attention"] <= 1e-4
