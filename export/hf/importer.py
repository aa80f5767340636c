"""A local Hugging Face checkpoint directory → a verified version in the model repository.

The same pipeline as our own models (``export/build.py``): refuse to overwrite without ``force``,
export every graph with ``export_graph`` (``onnx.checker``, dynamic axes asserted symbolic, ONNX
Runtime vs PyTorch at several batch sizes and lengths within ``TOLERANCE``), write the manifest
and validate it with the service's own loader before the version appears. The PyTorch side of the
parity check is the checkpoint's own transformers modules. There is no held-out data for an
imported model, so ``eval`` stays empty; the description and ``export`` record the provenance.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from export.hf import marian, vision
from export.hf.errors import UnsupportedCheckpoint
from export.onnx_export import export_graph, export_info
from export.repository import check_target, staged_version
from service.inference.manifest import Manifest, file_sha256

log = logging.getLogger(__name__)
FAMILIES = {**vision.ARCHITECTURES, **marian.ARCHITECTURES}
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def architecture(checkpoint: Path) -> str:
    path = checkpoint / "config.json"
    if not path.is_file():
        raise UnsupportedCheckpoint(f"{checkpoint}: no config.json (not a Hugging Face checkpoint)")
    names = json.loads(path.read_text()).get("architectures") or []
    supported = [n for n in names if n in FAMILIES]
    if not supported:
        raise UnsupportedCheckpoint(
            f"{checkpoint}: architectures {names} not supported; supported: {sorted(FAMILIES)}"
        )
    return str(supported[0])


def weights_file(checkpoint: Path) -> Path:
    """The safetensors weights (or their shard index): nothing is unpickled."""
    for name in _WEIGHTS:
        if (checkpoint / name).is_file():
            return checkpoint / name
    raise UnsupportedCheckpoint(f"{checkpoint}: no {' or '.join(_WEIGHTS)} (only safetensors are imported)")


def import_checkpoint(
    checkpoint: Path, name: str, repository: Path, version: int = 1, force: bool = False
) -> Path:
    """Export the checkpoint in ``checkpoint`` as ``repository/<name>/<version>``."""
    check_target(repository, name, version, force)  # fail before any work
    arch = architecture(checkpoint)
    weights = weights_file(checkpoint)
    family = FAMILIES[arch]
    with staged_version(repository, name, version, force) as staging:
        if family == "hf-marian":
            translator = marian.load(checkpoint)
            plans = marian.plans(translator, marian.banned_tokens(translator.generation_config))
            spec = marian.translation_spec(translator, checkpoint, staging)  # tokenizers: fail early
            forward_diff = marian.verify_against_transformers(translator, plans)
            graphs = {plan.key: export_graph(plan, staging) for plan in plans}
            notes = [f"stages vs MarianMTModel.forward max |diff| {forward_diff:.1e}"]
            fields: dict[str, Any] = {"task": "translation", "translation": spec}
        else:
            model = vision.load(checkpoint, arch)
            plans = vision.plans(model)
            graphs = {plan.key: export_graph(plan, staging) for plan in plans}
            image, notes = vision.image_spec(model, checkpoint, family)
            fields = {"task": "image-classification", "image": image}
        description = f"Hugging Face {arch} imported from {checkpoint.resolve().name}"
        manifest = Manifest(
            name=name,
            version=version,
            family=family,
            description="; ".join([description, *notes]),
            graphs={k: g.spec for k, g in graphs.items()},
            export=export_info(graphs, plans[0].shapes, extra_tools=("transformers",)),
            created_at=datetime.now(UTC),
            checkpoint_sha256=file_sha256(weights),
            **fields,
        )
        manifest.write(staging)
    return repository / name / str(version)
