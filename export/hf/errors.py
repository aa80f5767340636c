"""The one error of the Hugging Face importer: what it cannot export faithfully, it refuses."""


class UnsupportedCheckpoint(ValueError):
    """The directory is not a checkpoint (or tokenizer) the importer can export faithfully."""
