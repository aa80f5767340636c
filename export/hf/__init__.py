"""Hugging Face checkpoints (ViT, DeiT, MarianMT) exported into the model repository.

``import_checkpoint`` turns a local checkpoint directory into the same verified graphs and
manifest as our own models, so the service runs them with no code of its own: ``vision`` and
``marian`` wrap the checkpoints' modules into the graph contracts of ``export/graphs.py``, ``spm``
converts Marian's SentencePiece tokenizers to the ``tokenizers`` JSON the service loads.
"""

from export.hf.errors import UnsupportedCheckpoint
from export.hf.importer import FAMILIES, import_checkpoint

__all__ = ["FAMILIES", "UnsupportedCheckpoint", "import_checkpoint"]
