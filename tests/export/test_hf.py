"""Hugging Face checkpoints → ``export/hf`` → the repository → the service's own code, equal to
transformers. The checkpoints are tiny, randomly initialised and built here (nothing is
downloaded): ViT, DeiT with and without its teacher head, and MarianMT with SentencePiece
models trained on a few hundred generated dates."""

from __future__ import annotations

import base64
import io
import json
import random
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import sentencepiece as spm
import torch
import transformers
from PIL import Image
from transformers import DeiTConfig, MarianConfig, MarianMTModel, MarianTokenizer, ViTConfig

from export.cli import main
from export.data.dates import generate
from export.hf import import_checkpoint
from export.hf.spm import marian_tokenizer, read_vocab
from export.onnx_export import TOLERANCE
from service.inference import attention as maps
from service.inference.manifest import Manifest, TokenizerSpec
from service.inference.translation import Translator, known_ids
from service.inference.vision import Classifier, preprocess
from tests.conftest import running_service

CPU = ["CPUExecutionProvider"]
LABELS = ["cat", "dog", "bird"]
VISION = ["ViTForImageClassification", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"]
TEXTS = ["mardi 5 mars 2024", "July 4, 1976", "5. Mai 1999", "1 janvier 2000", "12/03/1950", "zzz ¿?"]
MAX_NEW = 12  # target tokens (the checkpoint's generation max_length counts the start token too)


# -- tiny checkpoints ------------------------------------------------------------------------------


def save_vision(arch: str, directory: Path) -> Path:
    """A random ViT/DeiT; the ViT and plain DeiT with an image processor of their own."""
    config_cls = ViTConfig if arch.startswith("ViT") else DeiTConfig
    config = config_cls(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )  # fmt: skip
    torch.manual_seed(0)
    getattr(transformers, arch)(config).save_pretrained(directory)
    if arch == "ViTForImageClassification":
        processor = transformers.ViTImageProcessorPil(
            size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3]
        )
        processor.save_pretrained(directory)
    elif arch == "DeiTForImageClassification":
        processor = transformers.DeiTImageProcessorPil(
            size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}
        )
        processor.save_pretrained(directory)
    return directory


def train_spm(lines: list[str], vocab_size: int) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, unk_id=2, bos_id=-1, eos_id=1, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def save_marian(directory: Path) -> Path:
    """Source and target SentencePiece models, a shared vocab.json laid out like OPUS-MT's
    (``</s>`` 0, ``<unk>`` 1, ``<pad>`` last), MarianTokenizer files and a random MarianMTModel
    whose generation config bans ``<pad>`` as OPUS-MT checkpoints do."""
    directory.mkdir(parents=True)
    examples = list(generate(400, 0))
    source = train_spm([e.source for e in examples], 120)
    target = train_spm([f"{e.target} {e.source.split()[0]}" for e in examples], 60)
    (directory / "source.spm").write_bytes(source)
    (directory / "target.spm").write_bytes(target)
    vocab = {"</s>": 0, "<unk>": 1}
    for blob in (source, target):
        proc = spm.SentencePieceProcessor(model_proto=blob)
        for i in range(proc.get_piece_size()):
            if not (proc.is_control(i) or proc.is_unknown(i)):
                vocab.setdefault(proc.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Recommended: pip install sacremoses."
        tokenizer = MarianTokenizer(
            str(directory / "source.spm"), str(directory / "target.spm"), str(directory / "vocab.json")
        )
    tokenizer.save_pretrained(directory)
    pad = vocab["<pad>"]
    config = MarianConfig(
        vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=0, forced_eos_token_id=0,
        scale_embedding=True, init_std=0.5,  # large enough weights that the input steers the output
    )  # fmt: skip
    torch.manual_seed(0)
    model = MarianMTModel(config)
    with torch.no_grad():
        model.final_logits_bias.normal_(std=0.1)
        model.final_logits_bias[0, 0] = 2.5  # some sentences end before MAX_NEW, some do not
    model.generation_config.bad_words_ids = [[pad]]
    model.generation_config.max_length = MAX_NEW + 1
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="module")
def vision_versions(root: Path) -> dict[str, tuple[Path, Path]]:
    """architecture → (checkpoint, exported version directory)."""
    out = {}
    for i, arch in enumerate(VISION):
        checkpoint = save_vision(arch, root / "checkpoints" / arch)
        out[arch] = (checkpoint, import_checkpoint(checkpoint, f"vision-{i}", root / "repository"))
    return out


@pytest.fixture(scope="module")
def marian_checkpoint(root: Path) -> Path:
    return save_marian(root / "checkpoints" / "opus-mt-dates-iso")


@pytest.fixture(scope="module")
def marian_version(root: Path, marian_checkpoint: Path) -> Path:
    return import_checkpoint(marian_checkpoint, "tiny-marian", root / "repository")


def hf_marian(checkpoint: Path) -> tuple[MarianMTModel, MarianTokenizer]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = MarianTokenizer.from_pretrained(checkpoint)
    model = MarianMTModel.from_pretrained(checkpoint, attn_implementation="eager").eval()
    return model, tokenizer


def hf_greedy(model: MarianMTModel, tokenizer: MarianTokenizer, texts: list[str]) -> list[list[int]]:
    """transformers' greedy generate, each row cut after its first EOS."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, num_beams=1, do_sample=False, forced_eos_token_id=None)
    rows = []
    for row in out[:, 1:].tolist():  # drop decoder_start_token_id
        rows.append(row[: row.index(0) + 1] if 0 in row else row)
    return rows


# -- images ----------------------------------------------------------------------------------------


def random_images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("arch", VISION)
def test_vision_checkpoint_serves_like_transformers(arch: str, vision_versions: dict) -> None:
    checkpoint, version_dir = vision_versions[arch]
    manifest = Manifest.load(version_dir)
    spec = manifest.image
    assert spec is not None and manifest.task == "image-classification" and manifest.eval == {}
    assert manifest.family == ("hf-vit" if arch.startswith("ViT") else "hf-deit")
    assert spec.labels == LABELS and spec.prefix_tokens == (1 if arch.startswith("ViT") else 2)
    assert arch in manifest.description and max(manifest.export.parity_max_abs_diff.values()) <= TOLERANCE
    images = random_images(5)
    pixels = np.stack([preprocess(image, spec)[0] for image in images])
    if arch != "DeiTForImageClassificationWithTeacher":  # the service normalises as the processor
        processor = transformers.AutoImageProcessor.from_pretrained(checkpoint)
        expected = processor(images=images, return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(pixels, expected, atol=1e-5)
    model = getattr(transformers, arch).from_pretrained(checkpoint, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels), output_attentions=True)
    results = Classifier(version_dir, manifest, CPU).classify(pixels)
    np.testing.assert_allclose([r.probabilities for r in results], out.logits.softmax(-1), atol=TOLERANCE)
    attentions = torch.stack(out.attentions, dim=1).numpy()  # (B, layers, heads, T, T)
    np.testing.assert_allclose([r.attentions for r in results], attentions, atol=TOLERANCE)
    relevance = maps.rollout(results[0].attentions, prefix_tokens=spec.prefix_tokens)
    assert relevance.shape == (spec.grid[0] * spec.grid[1],)


def test_deit_preprocessing_differences_are_recorded(vision_versions: dict) -> None:
    manifest = Manifest.load(vision_versions["DeiTForImageClassification"][1])
    assert "centre-crops" in manifest.description


# -- Marian ----------------------------------------------------------------------------------------


def test_marian_tokenizers_match_marian_tokenizer(marian_checkpoint: Path) -> None:
    _, tokenizer = hf_marian(marian_checkpoint)
    specials = {"unk": "<unk>", "eos": "</s>", "pad": "<pad>"}
    vocab = read_vocab(marian_checkpoint / "vocab.json", specials)
    source = marian_tokenizer(marian_checkpoint / "source.spm", vocab, specials, source_side=True)
    target = marian_tokenizer(marian_checkpoint / "target.spm", vocab, specials, source_side=False)
    odd = ["  Hello   WORLD ½ ﬁ  ", "x", "5 mars </s> 3", "ÀÉ 漢字 5", "", " ", "a\tb\nc", "１２３"]
    for text in [e.source for e in generate(200, 7)] + odd:
        assert source.encode(text).ids == tokenizer(text).input_ids, text
    for text in [e.target for e in generate(50, 7)]:  # text the target model covers (see spm.py)
        assert target.encode(text).ids == tokenizer(text_target=text).input_ids, text
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(len(vocab)) for _ in range(rng.randrange(12))]
        assert target.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)


def source_tokenizers(checkpoint: Path) -> tuple[MarianTokenizer, Any]:
    """MarianTokenizer of a checkpoint's files, and the source side converted from them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = MarianTokenizer(
            str(checkpoint / "source.spm"), str(checkpoint / "target.spm"), str(checkpoint / "vocab.json")
        )
    specials = {"unk": "<unk>", "eos": "</s>", "pad": "<pad>"}
    vocab = read_vocab(checkpoint / "vocab.json", specials)
    return tokenizer, marian_tokenizer(checkpoint / "source.spm", vocab, specials, source_side=True)


def test_pieces_vocab_json_lacks_are_read_as_unk(marian_checkpoint: Path, tmp_path: Path) -> None:
    """A source piece SentencePiece emits but ``vocab.json`` lacks is ``<unk>`` to MarianTokenizer,
    after SentencePiece's own segmentation. The converted tokenizer had no such piece, and split
    the text into other pieces: other ids for the encoder."""
    checkpoint = tmp_path / "missing-piece"
    shutil.copytree(marian_checkpoint, checkpoint)
    vocab = json.loads((checkpoint / "vocab.json").read_text())
    proc = spm.SentencePieceProcessor(model_file=str(checkpoint / "source.spm"))
    gone = max(proc.encode("mardi 5 mars 2024", out_type=str), key=len)  # a whole word's piece
    kept = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t != gone]
    vocab = {t: i for i, t in enumerate(kept)}
    (checkpoint / "vocab.json").write_text(json.dumps(vocab))
    tokenizer, source = source_tokenizers(checkpoint)
    spec = TokenizerSpec(file="t.json", pad_id=vocab["<pad>"], bos_id=vocab["<pad>"], eos_id=0, unk_id=1,
                         vocab_size=len(vocab))  # fmt: skip
    unknown = 0
    for text in ["mardi 5 mars 2024", *(e.source for e in generate(200, 7))]:
        ids = known_ids(source.encode(text).ids, spec)
        assert ids == tokenizer(text).input_ids, text
        unknown += ids.count(1)
    assert unknown > 0  # the piece was met, and read as <unk>


def test_language_codes_keep_their_ids(marian_checkpoint: Path, tmp_path: Path) -> None:
    """Multilingual OPUS-MT models take a ">>fr<<" code on every input; the source SentencePiece
    model does not know it. It was given a new id past the embedding table, and every request with
    a code failed in ONNX Runtime, with its whole batch."""
    checkpoint = tmp_path / "codes"
    shutil.copytree(marian_checkpoint, checkpoint)
    vocab = json.loads((checkpoint / "vocab.json").read_text())
    vocab |= {">>fr<<": len(vocab), ">>de<<": len(vocab) + 1}
    (checkpoint / "vocab.json").write_text(json.dumps(vocab))
    tokenizer, source = source_tokenizers(checkpoint)
    for text in (">>fr<< 5 mars 2024", ">>de<< July 4, 1976", "12/03/1950"):
        ids = source.encode(text).ids
        assert ids == tokenizer(text).input_ids and max(ids) < len(vocab), text
    assert source.encode(">>fr<< 5 mars").ids[0] == vocab[">>fr<<"]


@pytest.mark.slow
def test_marian_checkpoint_translates_like_generate(marian_checkpoint: Path, marian_version: Path) -> None:
    manifest = Manifest.load(marian_version)
    spec = manifest.translation
    assert spec is not None and manifest.family == "hf-marian" and spec.decoder == "transformer-kv-layers"
    model, tokenizer = hf_marian(marian_checkpoint)
    pad = tokenizer.pad_token_id
    assert spec.target_tokenizer.bos_id == model.config.decoder_start_token_id == pad
    assert (spec.target_tokenizer.eos_id, spec.max_target_tokens) == (0, MAX_NEW)
    assert spec.source_language == "dates" and spec.target_language == "iso"
    translator = Translator(marian_version, manifest, CPU)
    for text in TEXTS:  # the service's tokenizer files are MarianTokenizer's
        assert translator.tokenize(text)[0] == tokenizer(text).input_ids
    expected = hf_greedy(model, tokenizer, TEXTS)
    got = translator.translate(TEXTS, beam_size=1)
    assert {t.finished for t in got} == {True, False}  # both endings are covered
    vocab = tokenizer.get_vocab()
    for text, ids, t in zip(TEXTS, expected, got, strict=True):
        assert [vocab[tok] for tok in t.target_tokens] == ids, text
        assert t.text == tokenizer.decode(ids, skip_special_tokens=True)
        # the per-step cross-attention is transformers' at each position of the same prefix
        src = torch.tensor([tokenizer(text).input_ids])
        prefix = torch.tensor([[pad, *ids[: len(t.attention) - 1]]])
        with torch.no_grad():
            out = model(input_ids=src, decoder_input_ids=prefix, output_attentions=True)
        cross = torch.stack(out.cross_attentions, dim=1)[0].permute(2, 0, 1, 3).numpy()  # (T, L, H, S)
        np.testing.assert_allclose(t.attention, cross, atol=TOLERANCE)
    beams = translator.translate(TEXTS, beam_size=3)  # beam search runs over the same graphs
    assert all(
        b.score >= g.score - 1e-4 for b, g in zip(beams, got, strict=True) if b.finished and g.finished
    )


# -- CLI -------------------------------------------------------------------------------------------


def test_cli_refuses_to_overwrite_without_force(
    vision_versions: dict, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, exported = vision_versions["ViTForImageClassification"]
    repository = root / "cli-repository"
    existing = publish(exported, repository, "cli-vit")
    before = (existing / "manifest.json").read_text()
    args = ["import-hf", str(checkpoint), "--name", "cli-vit", "--repository", str(repository)]
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert (existing / "manifest.json").read_text() == before
    assert main([*args, "--force"]) == 0
    assert f"wrote {existing}" in capsys.readouterr().out
    assert Manifest.load(existing).created_at > Manifest.load(exported).created_at


def test_cli_refuses_an_unsupported_checkpoint(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = root / "checkpoints" / "bert"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert main(["import-hf", str(checkpoint), "--name", "bert", "--repository", str(root / "r")]) == 2
    assert "BertModel" in capsys.readouterr().err


# -- live ------------------------------------------------------------------------------------------


def publish(version_dir: Path, repository: Path, name: str) -> Path:
    """A copy of an exported version under another name (the manifest names its model)."""
    target = repository / name / "1"
    shutil.copytree(version_dir, target)
    manifest = json.loads((version_dir / "manifest.json").read_text())
    (target / "manifest.json").write_text(json.dumps({**manifest, "name": name}))
    return target


@pytest.fixture(scope="module")
def live(root: Path, vision_versions: dict, marian_version: Path) -> Iterator[str]:
    repository = root / "live-repository"
    publish(vision_versions[VISION[0]][1], repository, "hf-vit")
    publish(vision_versions[VISION[2]][1], repository, "hf-deit")
    publish(marian_version, repository, "hf-marian")
    with running_service(repository, root) as svc:
        yield svc.url


@pytest.mark.slow
def test_the_running_service_serves_imported_checkpoints(
    live: str, vision_versions: dict, marian_checkpoint: Path
) -> None:
    checkpoint = vision_versions[VISION[0]][0]
    image = np.asarray(random_images(1)[0])
    answer = requests.post(
        f"{live}/v1/models/hf-vit/classify",
        json={"pixels": image.tolist(), "top_k": 3, "return_attention": True, "attention_layers": "all"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    processor = transformers.AutoImageProcessor.from_pretrained(checkpoint)
    model = transformers.ViTForImageClassification.from_pretrained(checkpoint, attn_implementation="eager")
    with torch.no_grad():
        out = model(**processor(images=[Image.fromarray(image)], return_tensors="pt"), output_attentions=True)
    probs = out.logits.softmax(-1)[0].numpy()
    for p in body["predictions"]:
        assert p["label"] == LABELS[p["index"]] and abs(p["probability"] - probs[p["index"]]) <= TOLERANCE
    attentions = torch.stack(out.attentions, dim=1)[0].numpy()  # (layers, heads, T, T)
    np.testing.assert_allclose(body["attention"]["layers"], attentions, atol=TOLERANCE)
    np.testing.assert_allclose(
        body["attention"]["values"], maps.rollout(attentions).reshape(4, 4), atol=TOLERANCE
    )

    answer = requests.post(
        f"{live}/v1/models/hf-marian/translate",
        json={"text": TEXTS[:3], "return_attention": True, "attention_layers": "all"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    model, tokenizer = hf_marian(marian_checkpoint)
    expected = hf_greedy(model, tokenizer, TEXTS[:3])
    for text, ids, t in zip(TEXTS[:3], expected, answer.json()["translations"], strict=True):
        assert t["text"] == tokenizer.decode(ids, skip_special_tokens=True), text
        assert t["source_tokens"] == tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)
        src = torch.tensor([tokenizer(text).input_ids])
        prefix = torch.tensor([[tokenizer.pad_token_id, *ids[: len(t["target_tokens"]) - 1]]])
        with torch.no_grad():
            out = model(input_ids=src, decoder_input_ids=prefix, output_attentions=True)
        cross = torch.stack(out.cross_attentions, dim=1)[0].numpy()  # (layers, heads, T, S)
        np.testing.assert_allclose(t["attention"]["layers"], cross, atol=TOLERANCE)
        np.testing.assert_allclose(t["attention"]["values"], cross[-1].mean(0), atol=TOLERANCE)


@pytest.mark.slow
def test_the_running_service_lays_deit_maps_after_both_prefix_tokens(
    live: str, vision_versions: dict
) -> None:
    """DeiT's CLS and distillation tokens come before the patches: the served rollout covers the
    patches only, and equals transformers' attention rolled out the same way."""
    checkpoint, version = vision_versions[VISION[2]]
    spec = Manifest.load(version).image
    assert spec is not None and spec.prefix_tokens == 2
    image = random_images(1)[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    answer = requests.post(
        f"{live}/v1/models/hf-deit/classify",
        json={"image": base64.b64encode(buffer.getvalue()).decode(), "return_attention": True,
              "attention_layers": "all"},
        timeout=60,
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    body = answer.json()["attention"]
    pixels, _ = preprocess(image, spec)  # the service's own preprocessing, fed to transformers
    model = transformers.DeiTForImageClassificationWithTeacher.from_pretrained(
        checkpoint, attn_implementation="eager"
    )
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels[None]), output_attentions=True)
    attentions = torch.stack(out.attentions, dim=1)[0].numpy()  # (layers, heads, T, T)
    rows, cols = spec.grid
    assert attentions.shape[-1] == 2 + rows * cols and body["shape"] == [rows, cols]
    np.testing.assert_allclose(body["layers"], attentions, atol=TOLERANCE)
    np.testing.assert_allclose(
        body["values"], maps.rollout(attentions, prefix_tokens=2).reshape(rows, cols), atol=TOLERANCE
    )
