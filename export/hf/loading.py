"""Loading a checkpoint's weights with transformers, whole or not at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from export.hf.errors import UnsupportedCheckpoint


def pretrained(cls: Any, checkpoint: Path) -> Any:
    """``cls.from_pretrained`` on the checkpoint's safetensors with eager attention (the
    probabilities as outputs), in eval mode; :class:`UnsupportedCheckpoint` when any weight of
    the model is not in the checkpoint. transformers fills such weights with random values and
    goes on (a checkpoint without its classifier head was imported, served and scored as that
    checkpoint, with a random head); its load report is not printed: the refusal names the keys."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(
            checkpoint,
            attn_implementation="eager",
            use_safetensors=True,
            output_loading_info=True,
            # in float32 whatever the checkpoint's dtype (an exact upcast): transformers loads the
            # checkpoint's own, and float16 weights were refused by the parity check, bfloat16
            # ones failed with a traceback (the export writes float32 graphs)
            dtype=torch.float32,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UnsupportedCheckpoint(
            f"{checkpoint}: the checkpoint lacks weights the {cls.__name__} needs ({shown}); "
            "transformers would fill them with random values"
        )
    return model.eval()
