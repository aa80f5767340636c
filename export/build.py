"""Recipe → checkpoint → verified ONNX → evaluated manifest in the model repository.

``train`` writes a checkpoint directory; ``export`` turns a checkpoint into a repository version,
refusing to overwrite without ``force``, refusing a checkpoint that another recipe trained and a
model whose held-out metrics miss the recipe's floors, and optionally adding an int8 and/or a
float16 variant (``<name>-int8``, ``<name>-fp16``: ``export/variants.py``) with its held-out
metrics and attention drift next to the fp32 numbers.
"""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from export import checkpoint, evaluate
from export.checkpoint import Checkpoint
from export.data import bible, fashion
from export.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from export.graphs import Shape, plans_for
from export.models.transformer import Transformer
from export.onnx_export import ExportedGraph, export_graph, export_info
from export.parity import cached_decode_parity
from export.recipes import Recipe
from export.repository import check_target, staged_version
from export.train import bible as bible_train
from export.train import dates as dates_train
from export.train import fashion as fashion_train
from export.train import translation as translation_train
from export.train.translation import ParallelData
from export.variants import staged_variant, variant_name
from service.inference.manifest import ImageSpec, Manifest, TokenizerSpec, TranslationSpec, file_sha256

log = logging.getLogger(__name__)


class FloorNotMet(RuntimeError):
    """The trained model misses its recipe's quality floor; nothing was written."""


def train(recipe: Recipe, directory: Path) -> Checkpoint:
    start = time.perf_counter()
    if recipe.task == "translation":
        data = parallel_data(recipe)
        model = translation_train.train(
            recipe.family, recipe.model, recipe.train, data, f"train {recipe.name}"
        )
        ckpt = Checkpoint(recipe.name, recipe.family, model, data.source_tokenizer, data.target_tokenizer)
        examples = len(data.sources)
    else:
        fdata = fashion_train.prepare(recipe.data["canvas"], recipe.data["n_train"])
        model = fashion_train.train(recipe.model, recipe.train, fdata, f"train {recipe.name}")
        ckpt = Checkpoint(recipe.name, recipe.family, model)
        examples = len(fdata.train_labels)
    ckpt.train_info = {
        "seconds": round(time.perf_counter() - start, 1),
        "examples": examples,
        "epochs": recipe.train.epochs,
    }
    checkpoint.save(ckpt, directory)
    return ckpt


def parallel_data(recipe: Recipe) -> ParallelData:
    """The training side of a translation recipe's corpus (``recipe.data["corpus"]``)."""
    data, corpus = recipe.data, recipe.data["corpus"]
    if corpus == "dates":
        return dates_train.prepare(data["n_train"], data["seed"])
    if corpus == "bible":
        return bible_train.prepare(data["max_words"], data["vocab_size"], data["n_train"], data["seed"])
    raise ValueError(f"{recipe.name}: unknown corpus {corpus!r}")


def export(
    ckpt_dir: Path,
    recipe: Recipe,
    repository: Path,
    version: int = 1,
    force: bool = False,
    quantize: str | None = None,
    precision: str | None = None,
) -> Path:
    """Export the checkpoint in ``ckpt_dir`` as ``repository/<recipe.name>/<version>``, and the
    variants asked for: ``quantize="int8"`` writes ``<name>-int8``, ``precision="fp16"``
    ``<name>-fp16``, at the same version."""
    name = recipe.name
    kinds = check_targets(repository, name, version, force, quantize, precision)  # before any work
    ckpt = _load_for(recipe, ckpt_dir)
    # the variants are made from the staged fp32 graphs and moved to their versions after fp32's,
    # once all are made: a variant that fails (its verdict, a conversion) leaves no version of any
    # of them, and one whose move fails leaves the fp32 version (`build --skip-existing` adds it)
    with contextlib.ExitStack() as variants, staged_version(repository, name, version, force) as staging:
        plans = plans_for(ckpt.model)
        graphs = {plan.key: export_graph(plan, staging) for plan in plans}
        manifest = _manifest(recipe, ckpt, ckpt_dir, version, graphs, plans[0].shapes, staging)
        if isinstance(ckpt.model, Transformer):
            # the step graph is verified one step at a time; this verifies whole decodes
            decode = cached_decode_parity(staging, manifest, ckpt.model)
            export = manifest.export.model_copy(
                update={"parity_max_abs_diff": manifest.export.parity_max_abs_diff | decode}
            )
            manifest = manifest.model_copy(update={"export": export})
        metrics, details = evaluate.evaluate_recipe_details(recipe, staging, manifest)
        manifest = manifest.model_copy(update={"eval": metrics, "eval_details": details})
        _check_floors(recipe, manifest.eval)
        manifest.write(staging)
        for kind in kinds:
            variants.enter_context(staged_variant(staging, recipe, repository, kind, force, version))
    return repository / name / str(version)


def check_data(recipe: Recipe) -> None:
    """Raise :class:`~export.data.DatasetMissing`, with the command that installs it, when the
    data ``recipe`` trains or evaluates on is not on this machine: checked for every recipe of a
    build before the first one trains (it was found when its turn came, after the others)."""
    if recipe.task == "image-classification":
        fashion.find_dataset()
    elif recipe.data.get("corpus") == "bible":
        bible.find_database()


def check_targets(
    repository: Path, name: str, version: int, force: bool, quantize: str | None, precision: str | None
) -> list[str]:
    """Refuse a version that exists (without ``force``) or a file in the way, for ``name`` and
    each variant asked for; the variants' kinds."""
    kinds = [kind for kind in (quantize, precision) if kind]
    for target_name in (name, *(variant_name(name, kind) for kind in kinds)):
        check_target(repository, target_name, version, force)
    return kinds


def _load_for(recipe: Recipe, ckpt_dir: Path) -> Checkpoint:
    """The checkpoint in ``ckpt_dir``, if ``recipe`` trained it. Another recipe's weights under this
    recipe's name would be served and scored as this recipe's model: its family and description,
    its data's metrics, and ``make eval`` crediting its attention to this one — even when the
    family is the same (``bible-fr-en-bahdanau`` is ``rnn-additive`` like ``dates-bahdanau``, on
    another corpus with other tokenizers). A renamed recipe is retrained, not relabelled."""
    try:
        ckpt = checkpoint.load(ckpt_dir)
    except checkpoint.CheckpointMissing as exc:
        if ckpt_dir.name == recipe.name:
            hint = f"run `python -m export train {recipe.name} --checkpoints {ckpt_dir.parent}` first"
        else:
            hint = f"`python -m export train {recipe.name} --checkpoints DIR` writes one to DIR/{recipe.name}"
        raise checkpoint.CheckpointMissing(f"{exc}: {hint}") from None
    if (ckpt.recipe, ckpt.family) != (recipe.name, recipe.family):
        raise checkpoint.CheckpointMismatch(
            f"{ckpt_dir} holds recipe {ckpt.recipe!r} ({ckpt.family}), not {recipe.name!r} "
            f"({recipe.family}): export it as {ckpt.recipe!r}, or train {recipe.name!r}"
        )
    if recipe.family != "vit" and (ckpt.source_tokenizer is None or ckpt.target_tokenizer is None):
        raise checkpoint.CheckpointError(
            f"{ckpt_dir}: a translation checkpoint needs {checkpoint.SOURCE_TOKENIZER} and "
            f"{checkpoint.TARGET_TOKENIZER} beside its weights"
        )
    return ckpt


def _manifest(
    recipe: Recipe,
    ckpt: Checkpoint,
    ckpt_dir: Path,
    version: int,
    graphs: dict[str, ExportedGraph],
    shapes: list[Shape],
    staging: Path,
) -> Manifest:
    common: dict[str, Any] = {
        "name": recipe.name,
        "version": version,
        "task": recipe.task,
        "family": recipe.family,
        "description": recipe.description,
        "graphs": {k: g.spec for k, g in graphs.items()},
        "export": export_info(graphs, shapes),
        "created_at": datetime.now(UTC),
        "checkpoint_sha256": file_sha256(ckpt_dir / checkpoint.WEIGHTS),
    }
    cfg: Any = ckpt.model.cfg
    if recipe.task == "image-classification":
        image = ImageSpec(
            height=cfg.image_size,
            width=cfg.image_size,
            channels=cfg.channels,
            mean=[fashion.MEAN] * cfg.channels,
            std=[fashion.STD] * cfg.channels,
            labels=list(fashion.LABELS),
            patch_size=cfg.patch_size,
            num_layers=cfg.depth,
            num_heads=cfg.heads,
        )
        return Manifest(**common, image=image)
    assert ckpt.source_tokenizer is not None and ckpt.target_tokenizer is not None
    rnn = recipe.family.startswith("rnn")
    spec = TranslationSpec(
        source_language=recipe.languages[0],
        target_language=recipe.languages[1],
        source_tokenizer=_save_tokenizer(ckpt.source_tokenizer, staging / checkpoint.SOURCE_TOKENIZER),
        target_tokenizer=_save_tokenizer(ckpt.target_tokenizer, staging / checkpoint.TARGET_TOKENIZER),
        decoder="rnn" if rnn else "transformer-kv-layers",
        state_size=cfg.state_size if rnn else None,
        max_source_tokens=recipe.max_source_tokens,
        max_target_tokens=recipe.max_target_tokens,
        num_layers=1 if rnn else cfg.dec_layers,
        num_heads=1 if rnn else cfg.heads,
    )
    return Manifest(**common, translation=spec)


def _save_tokenizer(tokenizer: Tokenizer, path: Path) -> TokenizerSpec:
    tokenizer.save(str(path))
    return TokenizerSpec(
        file=path.name,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        vocab_size=tokenizer.get_vocab_size(),
    )


def _check_floors(recipe: Recipe, metrics: dict[str, float]) -> None:
    missed = {
        k: (metrics.get(k), floor) for k, floor in recipe.floors.items() if not metrics.get(k, -1) >= floor
    }
    if missed:
        raise FloorNotMet(f"{recipe.name}: held-out metrics below the recipe's floors (got, floor): {missed}")
