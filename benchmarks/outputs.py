"""What every benchmark's ``main`` shares: the name its report takes — never one already in the
results folder, whose committed reports the README links — the report's files written under it,
and a SIGTERM that stops what it started, as Ctrl-C does."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

#: writes a report's Markdown (or plot) from its results to the path given, and returns the path
Writer = Callable[[dict[str, Any], Path], Path]


def free_stem(out: Path, name: str, plots: Iterable[str] = ()) -> str:
    """``name`` (say ``2026-12-05-idle``), or ``name-2``, ``name-3``… — the first that none of the
    report's files in ``out`` has (``<stem>.json``, ``.md``, ``.png``, and ``<stem>-<plot>.png`` for
    each of ``plots``): a run never overwrites a report."""
    stem, n = name, 1
    while any(out.glob(f"{stem}.*")) or any((out / f"{stem}-{plot}.png").exists() for plot in plots):
        n += 1
        stem = f"{name}-{n}"
    return stem


def save(out: Path, name: str, results: dict[str, Any], report: Writer, plot: Writer | None = None) -> Path:
    """``results`` as ``<stem>.json``, its plot as ``<stem>.png`` and its report as ``<stem>.md``
    in ``out`` (created if need be), ``stem`` the first free one for ``name``; the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / free_stem(out, name)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    if plot is not None:
        plot(results, stem.with_suffix(".png"))
    return report(results, stem.with_suffix(".md"))


def main(
    argv: list[str] | None,
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    kind: str,
    report: Writer,
    plot: Writer | None = None,
) -> int:
    """A benchmark whose options have ``--out``: ``run`` (its servers' logs go to ``--out``, and a
    SIGTERM stops them), then its results saved there as ``<date>-<kind>`` (:func:`save`, the
    date ``run`` gives) and the report printed."""
    args = parser.parse_args(argv)
    stop_on_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    r = run(args)
    print(save(args.out, f"{r['date']}-{kind}", r, report, plot).read_text())
    return 0


def stop_on_sigterm() -> None:
    """A SIGTERM (a ``timeout``, a cancelled CI job, ``kill``) leaves through ``SystemExit(143)``
    in the main thread, so every ``finally`` stops the servers the benchmark started and their
    private Ray; without it they outlived the benchmark, re-parented to PID 1."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
