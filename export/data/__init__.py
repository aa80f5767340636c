"""The data each recipe trains on, generated (dates) or read from local packages (fashion, bible)."""


class DatasetMissing(FileNotFoundError):
    """A corpus is not installed; the message says which command installs it."""
