"""Checkpoints: a directory with ``model.safetensors`` (weights + family/config metadata),
the tokenizers a translation model needs, and ``train.json`` (what training reported).

safetensors holds only tensors and string metadata, so loading a checkpoint never unpickles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from export.models import build_model, model_config

WEIGHTS = "model.safetensors"
SOURCE_TOKENIZER = "source_tokenizer.json"
TARGET_TOKENIZER = "target_tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, unreadable, or not the one asked for."""


class CheckpointMissing(CheckpointError):
    pass


class CheckpointMismatch(CheckpointError):
    """The checkpoint was trained by another recipe than the one it is exported as."""


@dataclass
class Checkpoint:
    recipe: str
    family: str
    model: nn.Module
    source_tokenizer: Tokenizer | None = None
    target_tokenizer: Tokenizer | None = None
    train_info: dict[str, Any] = field(default_factory=dict)


def save(ckpt: Checkpoint, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"recipe": ckpt.recipe, "family": ckpt.family, "config": json.dumps(model_config(ckpt.model))}
    state = {k: v.detach().contiguous() for k, v in ckpt.model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS), metadata=metadata)
    if ckpt.source_tokenizer is not None and ckpt.target_tokenizer is not None:
        ckpt.source_tokenizer.save(str(directory / SOURCE_TOKENIZER))
        ckpt.target_tokenizer.save(str(directory / TARGET_TOKENIZER))
    (directory / "train.json").write_text(json.dumps(ckpt.train_info, indent=2) + "\n")
    return directory


def load(directory: Path) -> Checkpoint:
    path = directory / WEIGHTS
    if not path.is_file():
        raise CheckpointMissing(f"no checkpoint at {directory} (no {WEIGHTS})")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        recipe, family = meta["recipe"], meta["family"]
        model = build_model(family, json.loads(meta["config"]))
        model.load_state_dict(load_file(str(path)))
    # what a truncated file, a safetensors file of another program (no or other metadata) or
    # weights that do not fit their config raise: each means "not a checkpoint we wrote"
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a checkpoint export can load: {exc}") from exc
    model.eval()
    tokenizers = [_tokenizer(directory / name) for name in (SOURCE_TOKENIZER, TARGET_TOKENIZER)]
    info_path = directory / "train.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{info_path} is not valid JSON ({exc})") from exc
    return Checkpoint(recipe, family, model, tokenizers[0], tokenizers[1], info)


def _tokenizer(path: Path) -> Tokenizer | None:
    if not path.exists():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot parse
        raise CheckpointError(f"{path} is not a tokenizer file ({exc})") from exc
