"""The decode child's life (``service/inference/decode_process.py``): how it ends — drained by
``close``, or with an owner dropped without one — a factory that fails at start, a child that
dies and is started again (on its files although their directory was removed), and what the
health check makes of a silent or hung child, of restarts that keep failing and of one that is
only slow.

The child runs the deterministic stand-in decoder of ``table_decoder`` (built by a module-level
factory of ``decode_stand_ins``, as the service builds the model's Translator), so every answer
after a restart can be compared with the same text decoded alone in this process. Real
processes, real sockets; ``HUNG_S`` and ``DOWN_S`` lowered where a test waits on them.
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import time
from pathlib import Path

import pytest

from service.errors import InferenceFailed
from service.inference import decode_process
from service.inference.decode_process import DecodeProcess
from tests.service.inference.decode_stand_ins import (
    alive,
    broken,
    from_files,
    hung,
    kill,
    slow,
    slow_to_start,
    stuck,
    table,
    until,
)
from tests.service.inference.table_decoder import TableDecoder, alone, options, synchronous


@synchronous
async def test_close_drains_what_is_running_then_the_child_exits() -> None:
    process = DecodeProcess(slow, token_budget=10_000)
    ids = [3, 4, 5] * 10
    running = asyncio.create_task(process.submit([ids], options(max_len=40)))
    await until(lambda: process.rows >= 1)  # step counts arrive every 50 ms while it decodes
    pid = process.pid
    assert pid is not None
    process.close()
    answer = await running
    assert answer.hypotheses[0].tokens == alone(TableDecoder(), ids, options(max_len=40)).tokens
    # (``running`` reads False once the reader thread's wait() has reaped the child: until then
    # Popen.poll() cannot take the wait lock and says None)
    await until(lambda: not alive(pid) and not process.running)


def test_a_process_dropped_without_close_ends_its_child() -> None:
    process = DecodeProcess(table, token_budget=400)
    pid = process.pid
    assert pid is not None and alive(pid)
    del process
    gc.collect()
    deadline = time.monotonic() + 10
    while alive(pid):
        assert time.monotonic() < deadline, "the child outlived its owner"
        time.sleep(0.02)


def test_a_factory_that_fails_is_a_start_up_error() -> None:
    with pytest.raises(RuntimeError, match="failed to start: ZeroDivisionError"):
        DecodeProcess(broken, token_budget=400)


@synchronous
async def test_a_child_that_dies_fails_what_it_held_and_is_started_again() -> None:
    process = DecodeProcess(slow, token_budget=10_000)
    held = asyncio.create_task(process.submit([[3] * 30], options(max_len=500)))
    await until(lambda: process.rows >= 1)
    first = kill(process)
    with pytest.raises(InferenceFailed, match="decoder process exited"):
        await held
    await until(lambda: process.pid != first and process.running)
    assert process.restarts == 1 and process.held == 0
    answer = await process.submit([[5, 6]], options())
    assert answer.hypotheses[0].tokens == alone(TableDecoder(), [5, 6], options()).tokens
    process.close()


@synchronous
async def test_a_child_started_again_loads_its_files_although_their_directory_was_removed(
    tmp_path: Path,
) -> None:
    """A newer version serves and the old version's directory is deleted, then the old one's
    child crashes while it drains: its restart loads the files as they were when it was made."""
    version = tmp_path / "1"
    version.mkdir()
    (version / "decoder.json").write_text('{"seconds": 0.01}')
    process = DecodeProcess(from_files, token_budget=10_000, files=version)
    assert process.providers[:2] == ["TableDecoder", "0.01"]
    # the links it loaded through went once it was ready: a replica killed leaves none behind
    assert not Path(process.providers[2]).exists()
    shutil.rmtree(version)
    first = kill(process)
    await until(lambda: process.pid != first and process.running)
    assert process.restarts == 1 and process.down_since is None
    answer = await process.submit([[5, 6]], options())
    assert answer.hypotheses[0].tokens == alone(TableDecoder(), [5, 6], options()).tokens
    process.close()
    await until(lambda: not process.running)
    await until(lambda: process.pinned is not None and process.pinned.closed)  # with the last child


@synchronous
async def test_a_child_silent_while_holding_requests_makes_the_model_unhealthy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(decode_process, "HUNG_S", 0.5)
    process = DecodeProcess(stuck, token_budget=10_000)
    await asyncio.sleep(0.7)
    assert process.problem() is None  # idle and silent: healthy
    running = asyncio.create_task(process.submit([[3, 4]], options(max_len=2)))
    await asyncio.sleep(0.2)
    assert process.problem() is None  # its silence counts from the submit
    await until(lambda: process.problem() is not None)
    assert "sent nothing for" in (process.problem() or "") and "holding 1 requests" in (
        process.problem() or ""
    )
    await running
    assert process.problem() is None
    process.close()


@synchronous
async def test_a_child_whose_restarts_fail_makes_the_model_unhealthy_until_one_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(decode_process, "DOWN_S", 0.3)
    process = DecodeProcess(table, token_budget=400)
    assert process.problem() is None
    process.factory = broken  # every restart fails from now on
    kill(process)
    await until(lambda: process.problem() is not None and "no model here" in (process.problem() or ""))
    assert "has failed to restart for" in (process.problem() or "")
    process.factory = table  # the next try (back-off 1 s, 2 s, …) starts
    await until(lambda: process.running and process.problem() is None, seconds=15)
    answer = await process.submit([[5, 6]], options())
    assert answer.hypotheses[0].tokens == alone(TableDecoder(), [5, 6], options()).tokens
    process.close()


@synchronous
async def test_a_hung_child_is_found_although_its_callers_give_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each caller times out and leaves (its request leaves the held set) sooner than HUNG_S; a new
    request must not restart the silence clock of a child that never reported being idle."""
    monkeypatch.setattr(decode_process, "HUNG_S", 0.8)
    process = DecodeProcess(hung, token_budget=10_000)
    seen = None
    for _ in range(5):  # requests 0.5 s apart, each abandoned after 0.4 s: never one held 0.8 s
        caller = asyncio.create_task(process.submit([[3, 4]], options(max_len=2)))
        for _ in range(8):
            await asyncio.sleep(0.05)
            seen = seen or process.problem()
        caller.cancel()  # its timeout: the caller leaves
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert process.held == 0 and process.problem() is None  # nothing waits on it now
        await asyncio.sleep(0.1)
    assert seen is not None and "sent nothing for" in seen
    kill(process)
    process.close()


@synchronous
async def test_a_restart_that_takes_long_but_succeeds_is_not_unhealthy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(decode_process, "DOWN_S", 0.3)
    process = DecodeProcess(slow_to_start, token_budget=400)
    first = kill(process)
    deadline = time.monotonic() + 10
    while not (process.running and process.pid != first):
        assert process.problem() is None, process.problem()  # loading, not failing
        assert time.monotonic() < deadline, "no restart"
        await asyncio.sleep(0.05)
    answer = await process.submit([[5, 6]], options())
    assert answer.hypotheses[0].tokens == alone(TableDecoder(), [5, 6], options()).tokens
    process.close()
