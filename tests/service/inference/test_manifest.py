"""The manifest contract rejects bad manifests with messages that name the field."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from service.inference.manifest import MAX_MANIFEST_BYTES, Manifest, ManifestError, list_versions

GRAPH = {
    "file": "model.onnx",
    "inputs": [{"name": "pixels", "dtype": "float32", "shape": ["batch", 1, 16, 16]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
}
VALID: dict[str, Any] = {
    "name": "tiny-vit",
    "version": 1,
    "task": "image-classification",
    "family": "vit",
    "graphs": {"model": GRAPH},
    "image": {
        "height": 16,
        "width": 16,
        "channels": 1,
        "mean": [0.1],
        "std": [0.2],
        "labels": list("abcdefghij"),
        "patch_size": 4,
        "num_layers": 2,
        "num_heads": 2,
    },
    "eval": {"accuracy": 0.9},
    "export": {
        "tool_versions": {"torch": "2.13.0"},
        "opset": 20,
        "parity_max_abs_diff": {"model.logits": 1e-7},
        "parity_tolerance": 1e-4,
        "verified_shapes": [{"batch": 1}, {"batch": 3}, {"batch": 7}],
    },
    "created_at": "2026-11-25T12:00:00Z",
    "checkpoint_sha256": "a" * 64,
}


def write(tmp_path: Path, data: dict[str, Any], name: str = "tiny-vit", version: str = "1") -> Path:
    directory = tmp_path / name / version
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(json.dumps(data))
    (directory / "model.onnx").write_bytes(b"")
    return directory


def mutate(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


def test_valid_manifest_loads(tmp_path: Path) -> None:
    manifest = Manifest.load(write(tmp_path, VALID))
    assert manifest.image is not None and manifest.image.grid == (4, 4)
    assert manifest.files() == ["model.onnx"]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("name", "../etc", "name"),
        ("name", "Big Name", "name"),
        ("version", 0, "version"),
        ("task", "segmentation", "task"),
        ("graphs.model.file", "../../secret.onnx", "graphs.model.file"),
        ("graphs.model.file", "/etc/passwd", "graphs.model.file"),
        ("graphs.model.inputs", [], "graphs.model.inputs"),
        ("image.mean", [0.1, 0.2], "mean"),
        ("image.std", [0.0], "std"),
        ("image.patch_size", 5, "patch_size"),
        ("image", ..., "image: required"),
        ("checkpoint_sha256", "xyz", "checkpoint_sha256"),
        ("export.verified_shapes", [{"batch": 1}], "export.verified_shapes"),
        ("surprise", 1, "surprise"),
        # checksums are hashed at load: their names are plain files the manifest uses
        ("checksums", {"/dev/zero": "0" * 64}, "checksums"),
        ("checksums", {"../1/model.onnx": "0" * 64}, "checksums"),
        ("checksums", {"extra.bin": "0" * 64}, "not files the manifest names"),
        # a graph scoring 10 classes needs 10 labels (else every answer past the labels is a 500)
        ("image.labels", list("abc"), "image.labels: 3 labels, but the graph's logits score 10"),
    ],
)
def test_bad_manifests_are_refused_naming_the_field(
    tmp_path: Path, path: str, value: Any, message: str
) -> None:
    with pytest.raises(ManifestError, match="invalid manifest") as info:
        Manifest.load(write(tmp_path, mutate(path, value)))
    assert message in str(info.value)


def test_translation_needs_both_graphs_and_rnn_needs_state_size(tmp_path: Path) -> None:
    tok = {"file": "t.json", "pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3, "vocab_size": 20}
    data = mutate("task", "translation")
    del data["image"]
    data["translation"] = {
        "source_language": "x",
        "target_language": "y",
        "source_tokenizer": tok,
        "target_tokenizer": tok,
        "decoder": "rnn",
        "max_source_tokens": 8,
        "max_target_tokens": 8,
    }
    with pytest.raises(ManifestError) as info:
        Manifest.load(write(tmp_path, data))
    assert "encoder" in str(info.value) or "state_size" in str(info.value)


def translation(**target: int) -> dict[str, Any]:
    tok = {"file": "t.json", "pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3, "vocab_size": 20}
    step = {
        **GRAPH,
        "file": "step.onnx",
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 20]}],
    }
    data = mutate("task", "translation")
    del data["image"]
    data["graphs"] = {"encoder": {**GRAPH, "file": "encoder.onnx"}, "decoder_step": step}
    data["translation"] = {
        "source_language": "x", "target_language": "y", "source_tokenizer": tok,
        "target_tokenizer": {**tok, **target}, "decoder": "rnn", "state_size": 4,
        "max_source_tokens": 8, "max_target_tokens": 8,
    }  # fmt: skip
    return data


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({}, None),
        ({"eos_id": 20}, "eos_id 20 not below vocab_size 20"),
        ({"pad_id": 25, "unk_id": 30}, "pad_id 25, unk_id 30 not below vocab_size 20"),
        ({"eos_id": 24, "vocab_size": 32}, "eos_id: 24, but the decoder's logits score 20 tokens"),
    ],
)
def test_special_ids_must_be_tokens_the_model_has(
    tmp_path: Path, target: dict[str, int], message: str | None
) -> None:
    """An EOS the decoder can never choose would decode every text to its length limit."""
    directory = write(tmp_path, translation(**target))
    for name in ("t.json", "encoder.onnx", "step.onnx"):
        (directory / name).write_bytes(b"")
    if message is None:
        Manifest.load(directory)
        return
    with pytest.raises(ManifestError, match="invalid manifest") as info:
        Manifest.load(directory)
    assert message in str(info.value)


def test_directory_must_match_name_and_version(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="lives in"):
        Manifest.load(write(tmp_path, VALID, version="2"))


def test_missing_files_are_named(tmp_path: Path) -> None:
    directory = write(tmp_path, VALID)
    (directory / "model.onnx").unlink()
    with pytest.raises(ManifestError, match=r"model\.onnx"):
        Manifest.load(directory)


def test_list_versions_refuses_names_that_leave_the_repository(tmp_path: Path) -> None:
    write(tmp_path, VALID)
    (tmp_path / "tiny-vit" / "10").mkdir()
    assert list_versions(tmp_path, "tiny-vit") == [1, 10]
    for bad in ("../x", "/abs", "a/b", ".."):
        with pytest.raises(ManifestError):
            list_versions(tmp_path, bad)


def test_only_ascii_positive_integers_are_versions(tmp_path: Path) -> None:
    """``str.isdigit`` is true for ``²`` and ``٢`` (whose ``int`` fails or reads 2) — such a
    directory once stopped the service's start and every later repository poll."""
    write(tmp_path, VALID)
    for name in ("²", "٢", "0", "01", "v2", "1.5", "-3", "12"):
        (tmp_path / "tiny-vit" / name).mkdir()
    (tmp_path / "tiny-vit" / "7").write_text("a file, not a version")
    assert list_versions(tmp_path, "tiny-vit") == [1, 12]


def test_an_unreadable_manifest_or_checksummed_file_is_a_manifest_error(tmp_path: Path) -> None:
    directory = write(tmp_path, VALID)
    (directory / "manifest.json").unlink()
    (directory / "manifest.json").mkdir()
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        Manifest.load(directory)
    directory = write(tmp_path, VALID, name="other")
    data = {**VALID, "name": "other", "checksums": {"model.onnx": "0" * 64}}
    (directory / "manifest.json").write_text(json.dumps(data))
    (directory / "model.onnx").unlink()
    (directory / "model.onnx").mkdir()  # "exists", but hashing it fails
    with pytest.raises(ManifestError, match=r"model\.onnx"):
        Manifest.load(directory)


def refusal_within(seconds: float, directory: Path) -> str:
    """Manifest.load's refusal of ``directory``, on a daemon thread (a read blocked for good must
    not hold up the test run's exit)."""
    outcome: list[str] = []

    def load() -> None:
        try:
            Manifest.load(directory)
            outcome.append("loaded")
        except ManifestError as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome[0] if outcome else f"still loading after {seconds} s"


def test_a_manifest_that_is_no_regular_file_or_too_large_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO in the manifest's place held up the repository's poll for good (the read waited for
    a writer), a link to /dev/zero would have filled the memory: both are refused at once, as is
    a file beyond MAX_MANIFEST_BYTES."""
    directory = write(tmp_path, VALID)
    manifest = directory / "manifest.json"
    for make in (lambda: os.mkfifo(manifest), lambda: manifest.symlink_to("/dev/zero")):
        manifest.unlink()
        make()
        assert "not a regular file" in refusal_within(5, directory)
    manifest.unlink()
    manifest.write_bytes(b" " * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(ManifestError, match="more than"):
        Manifest.load(directory)


def test_write_records_checksums_and_load_refuses_a_changed_file(tmp_path: Path) -> None:
    directory = write(tmp_path, VALID)
    (directory / "model.onnx").write_bytes(b"the graph")
    Manifest.load(directory).write(directory)
    manifest = Manifest.load(directory)
    assert manifest.checksums == {"model.onnx": hashlib.sha256(b"the graph").hexdigest()}
    (directory / "model.onnx").write_bytes(b"the graph, truncated or replaced")
    with pytest.raises(ManifestError, match=r"differ from their sha256.*model\.onnx"):
        Manifest.load(directory)


def test_prefix_tokens_are_written_only_when_not_the_usual_single_cls(tmp_path: Path) -> None:
    """Manifests of plain ViTs stay loadable by services from before ``image.prefix_tokens``."""
    directory = write(tmp_path, VALID)
    (directory / "model.onnx").write_bytes(b"the graph")
    Manifest.load(directory).write(directory)
    assert "prefix_tokens" not in json.loads((directory / "manifest.json").read_text())["image"]
    deit = Manifest.load(directory)
    assert deit.image is not None
    deit.model_copy(update={"image": deit.image.model_copy(update={"prefix_tokens": 2})}).write(directory)
    assert json.loads((directory / "manifest.json").read_text())["image"]["prefix_tokens"] == 2
    assert Manifest.load(directory).image.prefix_tokens == 2  # type: ignore[union-attr]


def test_a_variants_verdict_is_written_only_when_there_is_one(tmp_path: Path) -> None:
    """fp32 and int8 manifests leave ``export.variant_*`` out (services from before the fields
    load them); a float16 variant's verdict and its float16 tensors round-trip."""
    directory = write(tmp_path, VALID)
    (directory / "model.onnx").write_bytes(b"the graph")
    Manifest.load(directory).write(directory)
    exported = json.loads((directory / "manifest.json").read_text())["export"]
    assert not {"variant_max_diff", "variant_tolerance"} & exported.keys()
    half = mutate("export.variant_max_diff", {"model.logits": 2e-3})
    half["export"]["variant_tolerance"] = 3e-2
    half["export"]["quantization"] = "float16"
    for tensor in (*half["graphs"]["model"]["inputs"], *half["graphs"]["model"]["outputs"]):
        tensor["dtype"] = "float16"
    directory = write(tmp_path / "half", half)
    (directory / "model.onnx").write_bytes(b"the graph")
    Manifest.load(directory).write(directory)
    manifest = Manifest.load(directory)
    assert manifest.export.variant_max_diff == {"model.logits": 2e-3}
    assert manifest.export.variant_tolerance == 3e-2
    assert manifest.graphs["model"].inputs[0].dtype == "float16"
