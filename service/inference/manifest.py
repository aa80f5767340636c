"""The model-repository manifest: the one contract between ``export/`` and ``service/``.

A model repository is laid out like Triton's::

    model_repository/
      <name>/
        <version>/            # a positive integer; the highest servable one wins by default
          manifest.json       # validated by :class:`Manifest`
          *.onnx              # the graphs it names
          *_tokenizer.json    # tokenizers (translation) — names listed in the manifest

Everything the service needs to run a model without PyTorch is here: which graphs exist, their
tensors (names, dtypes, shapes with symbolic axes), how to tokenise or preprocess, and how the
decoder step is wired. Evaluation results and export provenance ride along so that a client can
see what it is talking to (``GET /v1/models``).

This module imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
#: the largest manifest read (the demo models' are 2–10 KB)
MAX_MANIFEST_BYTES = 1024 * 1024

#: Model names: what may appear in a URL path segment and a directory name, nothing else.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
#: Version directories: a positive integer in ASCII digits (``str.isdigit`` also takes ``²`` and ``٢``)
VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,8}")
_FILE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

Dtype = Literal["float32", "float16", "int64", "int32", "bool", "uint8"]
Task = Literal["translation", "image-classification"]
#: a fixed size, or a symbolic one: a name (``batch``) or an expression of names (``past_len + 1``)
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
Dim = int | Annotated[str, Field(pattern=rf"^{_NAME}( [-+*] ({_NAME}|[0-9]+))*$")]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ManifestError(ValueError):
    """A manifest (or the directory holding it) is not a servable model."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_file_name(value: str) -> str:
    """Files are plain names inside the version directory: no separators, no ``..``."""
    if not _FILE_PATTERN.match(value) or ".." in value:
        raise ValueError(f"{value!r} must be a plain file name inside the model directory")
    return value


class TensorSpec(_Strict):
    """One graph input or output. Symbolic axes are strings (ONNX ``dim_param``)."""

    name: str = Field(min_length=1)
    dtype: Dtype
    shape: list[Dim]


class GraphSpec(_Strict):
    """One ONNX graph file and its interface."""

    file: str
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)

    _file = field_validator("file")(_check_file_name)

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)


class TokenizerSpec(_Strict):
    """A Hugging Face ``tokenizers`` JSON file plus the ids the decoder loop needs.

    ``encode`` of the source tokenizer already appends ``eos`` (its post-processor does).
    """

    file: str
    pad_id: int = Field(ge=0)
    bos_id: int = Field(ge=0)
    eos_id: int = Field(ge=0)
    unk_id: int = Field(ge=0)
    vocab_size: int = Field(gt=0)

    _file = field_validator("file")(_check_file_name)

    @model_validator(mode="after")
    def _ids_in_vocabulary(self) -> Self:
        ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id, "unk_id": self.unk_id}
        outside = [f"{k} {v}" for k, v in ids.items() if v >= self.vocab_size]
        if outside:  # an EOS the model can never choose decodes every text to its length limit
            raise ValueError(f"{', '.join(outside)} not below vocab_size {self.vocab_size}")
        return self


class TranslationSpec(_Strict):
    """How to run an encoder + decoder-step pair.

    ``decoder`` names the step contract:

    * ``rnn``: inputs ``prev_tokens`` (B,), ``state`` (B, state_size), ``memory`` (B, S, D),
      ``src_mask`` (B, S) and optionally ``step`` (B,); outputs ``logits``, ``new_state``,
      ``attention`` (B, S).
    * ``transformer``: inputs ``tokens`` (B, T) — the whole prefix, BOS first — ``memory`` and
      ``src_mask``; outputs ``logits`` for the last position and ``cross_attention``
      (B, layers, heads, S) for it. Each step recomputes the prefix (repositories exported before
      the KV-cached contract; still served).
    * ``transformer-kv-layers`` (what export writes): the encoder also outputs each decoder
      layer i's ``cross_keys.{i}`` and ``cross_values.{i}`` (B, heads, S, dh); the step takes one
      new token per row — ``tokens`` and its ``positions`` (B,) — with each layer's cached
      ``past_keys.{i}``/``past_values.{i}`` (B, heads, P, dh), ``past_mask`` (B, P) (rows may hold
      different numbers of positions; masked ones are ignored), ``cross_keys.{i}``,
      ``cross_values.{i}`` and ``src_mask``; outputs ``logits``, ``cross_attention``
      (B, layers, heads, S) and ``present_keys.{i}``/``present_values.{i}`` (B, heads, P + 1, dh).
    * ``transformer-kv``: the same with every layer in one tensor per kind — ``cross_keys``,
      ``past_keys``, ``present_keys``… (B, layers, heads, ·, dh) (repositories exported before
      the per-layer contract; still served).
    """

    source_language: str
    target_language: str
    source_tokenizer: TokenizerSpec
    target_tokenizer: TokenizerSpec
    decoder: Literal["rnn", "transformer", "transformer-kv", "transformer-kv-layers"]
    state_size: int | None = Field(default=None, gt=0)
    max_source_tokens: int = Field(gt=0)
    max_target_tokens: int = Field(gt=0)
    num_layers: int = Field(default=1, gt=0)
    num_heads: int = Field(default=1, gt=0)

    @model_validator(mode="after")
    def _state_for_rnn(self) -> Self:
        if self.decoder == "rnn" and self.state_size is None:
            raise ValueError("translation.state_size is required when decoder is 'rnn'")
        return self


class ImageSpec(_Strict):
    """Preprocessing for an image classifier: resize to (height, width), scale to [0, 1],
    then ``(x - mean) / std`` per channel."""

    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[1, 3]
    mean: list[float]
    std: list[float]
    labels: list[str] = Field(min_length=2)
    patch_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    #: tokens before the patches: CLS (always first), then e.g. DeiT's distillation token; maps
    #: read the CLS row and drop these columns
    prefix_tokens: int = Field(default=1, ge=1, le=16)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"image.mean and image.std need {self.channels} values (one per channel)")
        if any(s <= 0 for s in self.std):
            raise ValueError("image.std values must be positive")
        if self.height % self.patch_size or self.width % self.patch_size:
            raise ValueError("image.height and image.width must be multiples of image.patch_size")
        return self

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid (rows, cols) that rollout maps are laid on."""
        return self.height // self.patch_size, self.width // self.patch_size


class ExportInfo(_Strict):
    """Provenance and the parity verdict of the export."""

    tool_versions: dict[str, str]
    opset: int = Field(gt=0)
    #: max |ORT - PyTorch| per graph output over every verified shape; a variant (``quantization``
    #: set) keeps its fp32 graphs' figures and shapes (its ``eval_details["parity_of"]`` says so)
    parity_max_abs_diff: dict[str, float]
    parity_tolerance: float = Field(gt=0)
    verified_shapes: list[dict[str, int]] = Field(min_length=3)
    #: how a variant's graphs were made from the fp32 export's (``<name>-int8``, ``<name>-fp16``);
    #: None for the fp32 export itself
    quantization: str | None = None
    #: a variant's own verdict: max |variant − fp32| per graph output (``encoder.memory``), each
    #: over ``max(1, max |fp32|)`` of that output — both graphs on ONNX Runtime, fed alike at
    #: several batch sizes and lengths — and the tolerance every value met; None where no such
    #: verdict was given (the fp32 export, an int8 variant)
    variant_max_diff: dict[str, float] | None = None
    variant_tolerance: float | None = Field(default=None, gt=0)


class Manifest(_Strict):
    schema_version: Literal[1] = 1
    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=1)
    task: Task
    family: str = Field(pattern=r"^[a-z0-9-]+$")
    description: str = ""
    graphs: dict[str, GraphSpec]
    translation: TranslationSpec | None = None
    image: ImageSpec | None = None
    eval: dict[str, float] = Field(default_factory=dict)
    #: extra evaluation context, e.g. the fp32 numbers and drift of a quantised variant
    eval_details: dict[str, float | str] = Field(default_factory=dict)
    export: ExportInfo
    created_at: datetime
    checkpoint_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    #: sha256 of every file the manifest names, written by :meth:`write` and checked by
    #: :meth:`load`: a truncated or replaced graph is refused before a session ever opens it
    checksums: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(default_factory=dict)

    @field_validator("checksums")
    @classmethod
    def _checksummed_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:  # hashed at load: a path here would read any file (or /dev/zero for ever)
            _check_file_name(name)
        return value

    @model_validator(mode="after")
    def _task_fields(self) -> Self:
        required = {"translation": {"encoder", "decoder_step"}, "image-classification": {"model"}}[self.task]
        missing = required - self.graphs.keys()
        if missing:
            raise ValueError(f"graphs: task {self.task!r} needs graphs {sorted(missing)}")
        if self.task == "translation" and self.translation is None:
            raise ValueError("translation: required when task is 'translation'")
        if self.task == "image-classification" and self.image is None:
            raise ValueError("image: required when task is 'image-classification'")
        unused = sorted(set(self.checksums) - set(self.files()))
        if unused:
            raise ValueError(f"checksums: {unused} are not files the manifest names")
        if self.image is not None:  # each class the graph scores needs its label, and no more
            width = _last_dim(self.graphs["model"].output("logits"))
            if width is not None and width != len(self.image.labels):
                raise ValueError(
                    f"image.labels: {len(self.image.labels)} labels, but the graph's logits "
                    f"score {width} classes"
                )
        if self.translation is not None:
            width = _last_dim(self.graphs["decoder_step"].output("logits"))
            eos = self.translation.target_tokenizer.eos_id
            if width is not None and eos >= width:
                raise ValueError(
                    f"translation.target_tokenizer.eos_id: {eos}, but the decoder's logits "
                    f"score {width} tokens"
                )
        return self

    # -- files -------------------------------------------------------------------------------------

    @classmethod
    def load(cls, version_dir: Path, location: tuple[str, str] | None = None) -> Manifest:
        """Read and validate ``<version_dir>/manifest.json``; check that the files it names exist
        and that name/version agree with the directory (or with ``location`` = (name, version),
        for a directory still being staged). Raises :class:`ManifestError`."""
        path = version_dir / MANIFEST_FILE
        try:
            manifest = cls.model_validate_json(_read_manifest(path))
        except FileNotFoundError as exc:
            raise ManifestError(f"{path}: no manifest") from exc
        except OSError as exc:  # a directory, unreadable, …
            raise ManifestError(f"{path}: cannot read the manifest: {exc.strerror or exc}") from exc
        except ValidationError as exc:
            raise ManifestError(f"{path}: invalid manifest: {_summarise(exc)}") from exc
        name, version = location or (version_dir.parent.name, version_dir.name)
        if (name, version) != (manifest.name, str(manifest.version)):
            raise ManifestError(
                f"{path}: manifest says {manifest.name}/{manifest.version} but lives in {name}/{version}"
            )
        missing = [f for f in manifest.files() if not (version_dir / f).is_file()]
        if missing:
            raise ManifestError(f"{path}: files named in the manifest are missing: {missing}")
        try:
            changed = [f for f, want in manifest.checksums.items() if file_sha256(version_dir / f) != want]
        except OSError as exc:
            raise ManifestError(f"{path}: cannot read {exc.filename}: {exc.strerror or exc}") from exc
        if changed:
            raise ManifestError(
                f"{path}: files differ from their sha256 in the manifest (corrupt?): {changed}"
            )
        return manifest

    def files(self) -> list[str]:
        files = [g.file for g in self.graphs.values()]
        if self.translation is not None:
            files += [self.translation.source_tokenizer.file, self.translation.target_tokenizer.file]
        return sorted(set(files))

    def write(self, version_dir: Path) -> Path:
        """Write ``manifest.json`` with the checksums of the files beside it — atomically, since
        ``make eval`` rewrites the manifests of versions a running service may be loading."""
        checksums = {f: file_sha256(version_dir / f) for f in self.files()}
        path = version_dir / MANIFEST_FILE
        # a ViT with the usual single CLS token leaves prefix_tokens out, so services from before the
        # field existed (strict schema) still load it
        plain = self.image is not None and self.image.prefix_tokens == 1
        exclude: Any = {"image": {"prefix_tokens"}} if plain else {}
        # likewise an export without a variant's verdict leaves its fields out
        if self.export.variant_max_diff is None and self.export.variant_tolerance is None:
            exclude["export"] = {"variant_max_diff", "variant_tolerance"}
        dumped = self.model_copy(update={"checksums": checksums}).model_dump(mode="json", exclude=exclude)
        partial = path.with_name(f".{MANIFEST_FILE}.partial")
        partial.write_text(json.dumps(dumped, indent=2) + "\n")
        partial.replace(path)
        return path


def _last_dim(tensor: TensorSpec | None) -> int | None:
    """A tensor's last dimension when it is fixed (None: no such tensor, or a symbolic size)."""
    if tensor is None or not tensor.shape or not isinstance(tensor.shape[-1], int):
        return None
    return tensor.shape[-1]


def _summarise(exc: ValidationError) -> str:
    """One line per problem, each naming its field path — the message a human needs."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "manifest"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def list_versions(repository: Path, name: str) -> list[int]:
    """The integer version directories of ``name``, ascending. ``name`` must be a valid model name,
    so it can never leave the repository."""
    if not re.match(NAME_PATTERN, name):
        raise ManifestError(f"{name!r} is not a valid model name")
    model_dir = repository / name
    if not model_dir.is_dir():
        return []
    versions = (p for p in model_dir.iterdir() if VERSION_PATTERN.fullmatch(p.name) and p.is_dir())
    return sorted(int(p.name) for p in versions)


def _read_manifest(path: Path) -> bytes:
    """The manifest's bytes, from a regular file of at most :data:`MAX_MANIFEST_BYTES`: a FIFO
    in its place held up the repository's poll for good, a link to ``/dev/zero`` would have
    filled the memory. Opened without blocking and checked on the open file, not by its name."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ManifestError(f"{path}: cannot read the manifest: not a regular file")
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: cannot read the manifest: more than {MAX_MANIFEST_BYTES} bytes")
    return data
