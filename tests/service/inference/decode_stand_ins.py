"""Stand-ins and helpers for the decode-process tests (``test_decode_process_lifecycle`` and
``test_decode_process_messages``; ``test_model_set`` borrows ``broken``).

Each factory returns ``(decoder, providers)`` as the service's factory returns the model's
Translator: the deterministic stand-in decoder of ``table_decoder``, slowed, failing or hung to
order. ``DecodeProcess`` pickles a factory by reference and the child imports it by name, so the
factories are module-level functions of an importable module — not of a test module, which two
test modules would then import from each other.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

from service.inference.decode_process import DecodeProcess
from tests.service.inference.table_decoder import TableDecoder


def table(seconds: float = 0.0, fail_on: int | None = None) -> tuple[TableDecoder, list[str]]:
    """(In the child.)"""
    return TableDecoder(fail_on=fail_on, seconds=seconds), ["TableDecoder"]


def slow() -> tuple[TableDecoder, list[str]]:
    return table(seconds=0.01)


def failing() -> tuple[TableDecoder, list[str]]:
    return table(fail_on=3)


def slow_failing() -> tuple[TableDecoder, list[str]]:
    return TableDecoder(fail_on=6, seconds=0.01), ["TableDecoder"]


def from_files(directory: Path) -> tuple[TableDecoder, list[str]]:
    """(In the child.) The stand-in decoder as ``directory/decoder.json`` configures it: a
    translation model's child loads its graphs and tokenizers from the version's directory so.
    Its "providers" name the directory it was given."""
    seconds = json.loads((directory / "decoder.json").read_text())["seconds"]
    return TableDecoder(seconds=seconds), ["TableDecoder", str(seconds), str(directory)]


def broken(*_: object) -> tuple[TableDecoder, list[str]]:  # with or without a directory
    raise ZeroDivisionError("no model here")


def stuck() -> tuple[TableDecoder, list[str]]:
    return table(seconds=1.5)  # a step this long stands in for a hung one (HUNG_S lowered)


def hung() -> tuple[TableDecoder, list[str]]:
    return table(seconds=30.0)  # its first step outlasts the test: a hang


def slow_to_start() -> tuple[TableDecoder, list[str]]:
    time.sleep(1.0)  # a big model loading: longer than the DOWN_S its test sets
    return table()


def sluggish() -> tuple[TableDecoder, list[str]]:
    return table(seconds=0.5)


def named_by_environment() -> tuple[TableDecoder, list[str]]:
    """(In the child.) Its "providers" end with $STAND_IN_PROVIDER as the child saw it: a child
    started again may get other providers than the first (a GPU gone meanwhile)."""
    return TableDecoder(), ["TableDecoder", os.environ.get("STAND_IN_PROVIDER", "")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone between the two looks
        return False


def kill(process: DecodeProcess) -> int:
    """SIGKILL the child (a crash, out of memory); → its pid."""
    pid = process.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return pid


async def until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)
