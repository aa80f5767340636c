"""The ``dates`` task: human-readable dates in several locales → ISO ``YYYY-MM-DD``.

Dates are rendered with babel's CLDR patterns field by field, so every example knows exactly which
characters of the source spell the year, the month and the day. Those *gold spans* let us score
later whether the model's attention looked at the right place (alignment error rate).

Ambiguous renderings are left out on purpose: US numeric ``M/d/y`` reads the same as the
day-first forms of the other locales, and two-digit years lose the century; a translation model
cannot be right on them, so they would only cap the accuracy floor.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from dataclasses import dataclass

from babel.dates import DateTimeFormat, get_date_format, parse_pattern

LOCALES = ("en", "fr", "de", "es")
FIELDS = ("year", "month", "day")
#: where each field sits in the ISO target string
TARGET_SPANS: dict[str, tuple[int, int]] = {"year": (0, 4), "month": (5, 7), "day": (8, 10)}
FIRST_DAY = dt.date(1950, 1, 1)
LAST_DAY = dt.date(2049, 12, 31)

_EXTRA_PATTERNS: dict[str, tuple[str, ...]] = {
    "en": ("d MMMM y", "EEE, MMM d, y", "EEEE d MMMM y", "y-MM-dd"),
    "fr": ("EEE d MMM y", "d/M/y", "EEEE d MMM y"),
    "de": ("EEE, d. MMM y", "d.M.y", "EEEE, d. MMM y"),
    "es": ("EEE, d MMM y", "dd/MM/y", "d 'de' MMM 'de' y"),
}


def _field_of(symbol: str) -> str | None:
    """Map a CLDR pattern symbol to the ISO field it carries (weekdays carry none)."""
    return {"y": "year", "M": "month", "L": "month", "d": "day"}.get(symbol[0])


def locale_patterns(locale: str) -> list[str]:
    """The CLDR date formats of ``locale`` (full … short) plus a few common extras,
    with two-digit years widened to four and ambiguous US numeric forms dropped."""
    patterns = []
    for width in ("full", "long", "medium", "short"):
        pattern = get_date_format(width, locale=locale).pattern
        pattern = pattern.replace("yyyy", "y").replace("yy", "y")
        if locale == "en" and width == "short":
            continue  # M/d/y collides with the day-first numeric forms
        patterns.append(pattern)
    patterns.extend(_EXTRA_PATTERNS[locale])
    return list(dict.fromkeys(patterns))


@dataclass(frozen=True)
class DateExample:
    source: str
    target: str
    locale: str
    pattern: str
    #: field → [start, end) character span in ``source``
    spans: dict[str, tuple[int, int]]


def render(date: dt.date, pattern: str, locale: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """Render ``date`` with a CLDR ``pattern``, returning the text and each field's char span."""
    parsed = parse_pattern(pattern)
    values = DateTimeFormat(date, locale)
    text = ""
    spans: dict[str, tuple[int, int]] = {}
    # parsed.format is a %-template such as "%(EEEE)s, %(d)s %(MMMM)s %(y)s"; walk it in order.
    template = str(parsed.format)
    i = 0
    while i < len(template):
        if template.startswith("%(", i):
            end = template.index(")s", i)
            symbol = template[i + 2 : end]
            value = values[symbol]
            field = _field_of(symbol)
            if field is not None:
                spans[field] = (len(text), len(text) + len(value))
            text += value
            i = end + 2
        elif template.startswith("%%", i):
            text += "%"
            i += 2
        else:
            text += template[i]
            i += 1
    if set(spans) != set(FIELDS):
        raise ValueError(f"pattern {pattern!r} does not spell year, month and day")
    return text, spans


def make_example(date: dt.date, pattern: str, locale: str, lowercase: bool = False) -> DateExample:
    text, spans = render(date, pattern, locale)
    if lowercase:
        text = text.lower()  # lower() keeps lengths for these alphabets, so spans stay valid
    return DateExample(text, date.isoformat(), locale, pattern, spans)


def generate(n: int, seed: int) -> Iterator[DateExample]:
    """``n`` random examples, uniformly over dates 1950–2049, locales and their patterns;
    a quarter lower-cased. Deterministic for a given seed."""
    rng = random.Random(seed)
    patterns = {loc: locale_patterns(loc) for loc in LOCALES}
    span_days = (LAST_DAY - FIRST_DAY).days
    for _ in range(n):
        date = FIRST_DAY + dt.timedelta(days=rng.randint(0, span_days))
        locale = rng.choice(LOCALES)
        pattern = rng.choice(patterns[locale])
        yield make_example(date, pattern, locale, lowercase=rng.random() < 0.25)


def splits(n_train: int, n_test: int, seed: int) -> tuple[list[DateExample], list[DateExample]]:
    """Train and held-out test sets; test sources never occur in train."""
    train = list(generate(n_train, seed))
    seen = {ex.source for ex in train}
    test = [ex for ex in generate(n_test * 2, seed + 1) if ex.source not in seen][:n_test]
    return train, test
