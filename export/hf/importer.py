"""A local Hugging Face checkpoint directory → a verified version in the model repository.

The same pipeline as our own models (``export/build.py``): refuse to overwrite without ``force``,
export every graph with ``export_graph`` (``onnx.checker``, dynamic axes asserted symbolic, ONNX
Runtime vs PyTorch at several batch sizes and lengths within ``TOLERANCE``), write the manifest
and validate it with the service's own loader before the version appears. The PyTorch side of the
parity check is the checkpoint's own transformers modules. There is no held-out data for an
imported model, so ``eval`` stays empty; the description and ``export`` record the provenance.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from safetensors import SafetensorError, safe_open

from export.hf import marian, vision
from export.hf.errors import UnsupportedCheckpoint, read_json
from export.onnx_export import export_graph, export_info
from export.repository import check_target, staged_version
from service.inference.manifest import Manifest, file_sha256

log = logging.getLogger(__name__)
FAMILIES = {**vision.ARCHITECTURES, **marian.ARCHITECTURES}
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
#: what transformers raises on a checkpoint it cannot load (a weight of another shape, a config
#: that does not describe the weights, a corrupt file)
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError)


def architecture(checkpoint: Path) -> str:
    path = checkpoint / "config.json"
    if not path.is_file():
        raise UnsupportedCheckpoint(f"{checkpoint}: no config.json (not a Hugging Face checkpoint)")
    config = read_json(path)
    if not isinstance(config, dict):
        raise UnsupportedCheckpoint(f"{path}: a JSON object is expected, not {type(config).__name__}")
    names = config.get("architectures") or []
    supported = [n for n in names if n in FAMILIES]
    if not supported:
        raise UnsupportedCheckpoint(
            f"{checkpoint}: architectures {names} not supported; supported: {sorted(FAMILIES)}"
        )
    return str(supported[0])


def weights_files(checkpoint: Path) -> list[Path]:
    """The safetensors weights: ``model.safetensors``, or the shards ``model.safetensors.index.json``
    names — each a ``.safetensors`` file in the directory, so nothing is unpickled (an index that
    points at ``pytorch_model.bin`` would make transformers unpickle it). Each file's header is
    read here, so a truncated or corrupt one is refused before any export work."""
    single, index = (checkpoint / name for name in _WEIGHTS)
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            shards = sorted(set(read_json(index)["weight_map"].values()))
        except (KeyError, TypeError, AttributeError) as exc:
            raise UnsupportedCheckpoint(f"{index}: not a shard index ({type(exc).__name__})") from exc
        for shard in shards:
            if not (isinstance(shard, str) and shard.endswith(".safetensors") and Path(shard).name == shard
                    and (checkpoint / shard).is_file()):  # fmt: skip
                raise UnsupportedCheckpoint(
                    f"{index}: shard {shard!r} is not a .safetensors file in {checkpoint} "
                    "(only safetensors are imported)"
                )
        files = [checkpoint / shard for shard in shards]
    else:
        raise UnsupportedCheckpoint(
            f"{checkpoint}: no {' or '.join(_WEIGHTS)} (only safetensors are imported)"
        )
    for file in files:
        try:
            with safe_open(file, "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise UnsupportedCheckpoint(f"{file}: not a readable safetensors file ({exc})") from exc
    return files


def weights_sha256(files: list[Path]) -> str:
    """The manifest's ``checkpoint_sha256``: of the weights file, or of a sharded checkpoint's
    shards read one after the other in name order (not of its index, which names the tensors,
    not their values)."""
    if len(files) == 1:
        return file_sha256(files[0])
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _load(load: Any, checkpoint: Path, *args: Any) -> Any:
    try:
        return load(checkpoint, *args)
    except UnsupportedCheckpoint:  # our own refusal, already naming the checkpoint
        raise
    except _LOAD_ERRORS as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedCheckpoint(f"{checkpoint}: transformers cannot load it: {message}") from exc


def import_checkpoint(
    checkpoint: Path, name: str, repository: Path, version: int = 1, force: bool = False
) -> Path:
    """Export the checkpoint in ``checkpoint`` as ``repository/<name>/<version>``."""
    check_target(repository, name, version, force)  # fail before any work
    arch = architecture(checkpoint)
    weights = weights_files(checkpoint)
    family = FAMILIES[arch]
    with staged_version(repository, name, version, force) as staging:
        try:
            if family == "hf-marian":
                translator = _load(marian.load, checkpoint)
                plans = marian.plans(translator, marian.banned_tokens(translator.generation_config))
                spec = marian.translation_spec(translator, checkpoint, staging)  # tokenizers: fail early
                forward_diff = marian.verify_against_transformers(translator, plans)
                graphs = {plan.key: export_graph(plan, staging) for plan in plans}
                notes = [f"stages vs MarianMTModel.forward max |diff| {forward_diff:.1e}"]
                fields: dict[str, Any] = {"task": "translation", "translation": spec}
            else:
                model = _load(vision.load, checkpoint, arch)
                image, notes = vision.image_spec(model, checkpoint, family)  # before the export's minutes
                plans = vision.plans(model)
                graphs = {plan.key: export_graph(plan, staging) for plan in plans}
                fields = {"task": "image-classification", "image": image}
        except ValidationError as exc:  # the manifest's section refuses what the checkpoint says
            raise UnsupportedCheckpoint(f"{checkpoint}: {_first_error(exc)}") from exc
        description = f"Hugging Face {arch} imported from {checkpoint.resolve().name}"
        manifest = Manifest(
            name=name,
            version=version,
            family=family,
            description="; ".join([description, *notes]),
            graphs={k: g.spec for k, g in graphs.items()},
            export=export_info(graphs, plans[0].shapes, extra_tools=("transformers",)),
            created_at=datetime.now(UTC),
            checkpoint_sha256=weights_sha256(weights),
            **fields,
        )
        manifest.write(staging)
    return repository / name / str(version)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])
