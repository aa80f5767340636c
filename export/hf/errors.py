"""The one error of the Hugging Face importer: what it cannot export faithfully, it refuses."""

import json
from pathlib import Path
from typing import Any


class UnsupportedCheckpoint(ValueError):
    """The directory is not a checkpoint (or tokenizer) the importer can export faithfully."""


def read_json(path: Path, default: Any = None) -> Any:
    """A checkpoint's JSON file (``default`` when it is absent and a default is given), or
    :class:`UnsupportedCheckpoint` naming the file when it is not UTF-8 JSON."""
    if default is not None and not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedCheckpoint(f"{path}: not valid JSON ({exc})") from exc
