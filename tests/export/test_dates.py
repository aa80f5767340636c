"""The dates generator: every gold span spells its field; splits are deterministic and disjoint."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest
from babel.dates import get_month_names

from export.data import dates
from export.data.tokenizer import char_span_to_tokens, char_tokenizer


def month_spellings(locale: str, month: int) -> set[str]:
    names = set()
    for width in ("wide", "abbreviated"):
        for context in ("format", "stand-alone"):
            names.add(get_month_names(width, context, locale)[month].lower())
    return names | {str(month), f"{month:02d}"}


@pytest.mark.parametrize("seed", [0, 1])
def test_gold_spans_spell_their_fields(seed: int) -> None:
    for ex in dates.generate(3000, seed):
        date = dt.date.fromisoformat(ex.target)
        text = {field: ex.source[a:b] for field, (a, b) in ex.spans.items()}
        assert text["year"] == str(date.year), ex
        assert int(text["day"]) == date.day, ex
        assert text["month"].lower() in month_spellings(ex.locale, date.month), ex
        spans = sorted(ex.spans.values())
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), "spans overlap"


def test_target_spans_are_the_iso_fields() -> None:
    iso = "2031-07-04"
    assert {f: iso[a:b] for f, (a, b) in dates.TARGET_SPANS.items()} == {
        "year": "2031",
        "month": "07",
        "day": "04",
    }


def test_known_rendering() -> None:
    ex = dates.make_example(dt.date(2024, 3, 5), "EEEE d MMMM y", "fr")
    assert ex.source == "mardi 5 mars 2024"
    assert ex.spans == {"day": (6, 7), "month": (8, 12), "year": (13, 17)}
    assert ex.target == "2024-03-05"


def test_every_locale_has_weekday_long_and_numeric_forms() -> None:
    for locale in dates.LOCALES:
        patterns = dates.locale_patterns(locale)
        assert any("EEEE" in p for p in patterns) and any("MMMM" in p for p in patterns)
        assert all("yy" not in p for p in patterns), "two-digit years lose the century"
    assert "M/d/y" not in dates.locale_patterns("en"), "US numeric dates collide with day-first ones"


def test_splits_are_deterministic_and_disjoint() -> None:
    train, test = dates.splits(2000, 300, seed=3)
    again, _ = dates.splits(2000, 300, seed=3)
    assert [e.source for e in train] == [e.source for e in again]
    assert len(test) == 300
    assert not {e.source for e in test} & {e.source for e in train}


def test_char_spans_map_to_token_indices() -> None:
    ex = dates.make_example(dt.date(1999, 12, 31), "d. MMMM y", "de")
    tok = char_tokenizer([ex.source], append_eos=True)
    enc = tok.encode(ex.source)
    assert enc.tokens[-1] == "</s>"
    year = char_span_to_tokens(enc.offsets, ex.spans["year"])
    assert "".join(enc.tokens[i] for i in year) == "1999"
    assert char_span_to_tokens(enc.offsets, (len(ex.source), len(ex.source) + 5)) == []
