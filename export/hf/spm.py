"""A Marian checkpoint's SentencePiece models → ``tokenizers`` JSON files that give the same ids.

``MarianTokenizer`` segments text with a SentencePiece *unigram* model (Kudo 2018) — one for the
source language, one for the target — and then looks every piece up in ``vocab.json``, whose ids
are the model's (pieces missing there become ``<unk>``). The service only loads ``tokenizers``
JSON, so we rebuild each side as a ``tokenizers`` Unigram model whose vocabulary is ordered by the
``vocab.json`` ids and scored by that side's SentencePiece model, with SentencePiece's own
normaliser (the precompiled NFKC-style character map, whitespace clean-up, the ``▁`` dummy
prefix). Pieces of ``vocab.json`` that the side's SentencePiece model does not know (the other
language's pieces in a shared vocabulary) must keep their strings on the target side, where the
decoder may emit any id and the service shows and detokenises it, so they are scored too low to
be preferred over the side's own pieces. (``tokenizers`` scores ``<unk>`` 10 below the lowest
piece, so where the target SentencePiece model would emit ``<unk>`` — text it cannot cover —
such a piece wins instead: the service never encodes target text.) On the source side, whose ids
must be exactly Marian's for any input, their strings are replaced by placeholders no text can
match. Pieces the source SentencePiece model knows but ``vocab.json`` lacks are kept after the
vocabulary (ids from ``vocab_size`` on) with their scores, so the text is segmented as
SentencePiece segments it; the service reads such an id as ``<unk>``, as MarianTokenizer does
(``Translator.tokenize``).

Decoding follows ``MarianTokenizer.decode(..., skip_special_tokens=True)``: drop the special
tokens, join the pieces, ``▁`` → space, strip. Both sides append ``</s>`` like Marian does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from export.hf.errors import UnsupportedCheckpoint, read_json

#: the score of a vocabulary entry the SentencePiece model does not know (never preferred)
FOREIGN_SCORE = -1e6
_UNIGRAM = 1  # TrainerSpec.model_type
_NORMAL, _USER_DEFINED = 1, 4  # ModelProto.SentencePiece.type


def load_spm(path: Path) -> Any:
    proto = spm_pb2.ModelProto()  # type: ignore[attr-defined]  # generated, no stubs
    try:
        proto.ParseFromString(_required(path).read_bytes())
    except DecodeError as exc:
        raise UnsupportedCheckpoint(f"{path}: not a SentencePiece model ({exc})") from exc
    if proto.trainer_spec.model_type != _UNIGRAM:
        raise UnsupportedCheckpoint(f"{path.name}: only SentencePiece unigram models are supported")
    if proto.trainer_spec.byte_fallback:
        raise UnsupportedCheckpoint(f"{path.name}: byte-fallback SentencePiece models are not supported")
    return proto


def marian_tokenizer(
    spm_path: Path,
    vocab: dict[str, int],
    specials: dict[str, str],
    source_side: bool,
) -> Tokenizer:
    """One side of a Marian tokenizer as a ``tokenizers`` Tokenizer.

    ``vocab`` is ``vocab.json`` (token → model id); ``specials`` maps ``unk``/``eos``/``pad`` to
    their token strings (from ``tokenizer_config.json``). Both sides append ``</s>`` on ``encode``
    as Marian does; ``source_side`` makes the entries this side cannot emit unmatchable.
    """
    proto = load_spm(spm_path)
    scores = {
        p.piece: p.score for p in proto.pieces if p.type in (_NORMAL, _USER_DEFINED)
    }  # what SentencePiece can emit; control pieces (<s>, </s>) never come out of encode
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise UnsupportedCheckpoint("vocab.json ids must be 0..n-1 without gaps")
    entries: list[tuple[str, float]] = []
    for token, i in by_id:
        if token in scores:
            entries.append((token, scores[token]))
        elif source_side and token not in specials.values() and not _is_code(token):
            # a language code (">>fr<<") stays itself: it is added whole below, at its own id
            entries.append((f"<foreign-{i}>", FOREIGN_SCORE))  # never matched: see the module docstring
        else:
            entries.append((token, FOREIGN_SCORE))
    if source_side:  # segmented as SentencePiece does, then read as <unk> (module docstring)
        entries += [(piece, score) for piece, score in scores.items() if piece not in vocab]
    tok = Tokenizer(models.Unigram(entries, unk_id=vocab[specials["unk"]], byte_fallback=False))
    tok.normalizer = _normalizer(proto.normalizer_spec)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    # join, "▁" → " ", then ``str.strip()`` as MarianTokenizer does (decoders.Strip counts characters)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.Fuse(), decoders.Replace(Regex(r"\A\s+|\s+\z"), "")]
    )
    # Marian splits text on its special tokens before SentencePiece sees it, and skips them when
    # decoding with skip_special_tokens
    tok.add_special_tokens([AddedToken(specials[k], normalized=False) for k in ("eos", "unk", "pad")])
    # SentencePiece emits user-defined pieces whole; Marian emits a leading ">>fr<<" code whole
    codes = [t for t in vocab if _is_code(t)]
    user = [p.piece for p in proto.pieces if p.type == _USER_DEFINED and p.piece in vocab]
    if user or codes:
        tok.add_tokens([AddedToken(t, normalized=False) for t in [*codes, *user]])
    if (size := tok.get_vocab_size(with_added_tokens=True)) != len(entries):
        # a token added at a new id: past the embedding table, it failed every request of a
        # batch in ONNX Runtime
        raise UnsupportedCheckpoint(
            f"the converted tokenizer has {size} ids where vocab.json has {len(vocab)}: "
            "it could give ids the model has no embedding for"
        )
    eos = specials["eos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A $B {eos}", special_tokens=[(eos, vocab[eos])]
    )
    return tok


def _is_code(token: str) -> bool:
    """A Marian language code, such as ">>fr<<" (multilingual models need one on every input)."""
    return token.startswith(">>") and token.endswith("<<")


def _normalizer(spec: Any) -> normalizers.Normalizer:
    """SentencePiece's normaliser, in its order: character map, whitespace clean-up, escaping.
    The dummy prefix ``▁`` is added by the Metaspace pre-tokenizer (per chunk between special
    tokens, as SentencePiece sees each chunk separately in MarianTokenizer)."""
    steps: list[normalizers.Normalizer] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))  # Metaspace would skip the prefix
    if not spec.add_dummy_prefix:
        raise UnsupportedCheckpoint("SentencePiece models without a dummy prefix are not supported")
    return normalizers.Sequence(steps)


def read_vocab(path: Path, specials: dict[str, str]) -> dict[str, int]:
    """Marian's ``vocab.json`` (token → id), which must hold the special tokens."""
    vocab = read_json(_required(path))
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise UnsupportedCheckpoint(f"{path}: a JSON object of token → id is expected")
    missing = [token for token in specials.values() if token not in vocab]
    if missing:
        raise UnsupportedCheckpoint(f"{path}: no id for the special tokens {missing}")
    return vocab


def _required(path: Path) -> Path:
    if not path.is_file():
        raise UnsupportedCheckpoint(
            f"{path}: missing (a MarianMT checkpoint needs source.spm, target.spm and vocab.json)"
        )
    return path
