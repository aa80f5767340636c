"""The decode child's life (``service/inference/decode_process.py``): how it ends — drained by
``close`` (answering the requests that come meanwhile; killed if it hangs), or with an owner
dropped without one — a factory that fails at start, a child that dies (or whose message cannot
be read) and is started again (on its files although their directory was removed, on the
providers it gets then), and what the health check makes of a silent or hung child, of restarts
that keep failing and of one that is only slow.

The child runs the deterministic stand-in decoder of ``table_decoder`` (built by a module-level
factory of ``decode_stand_ins``, as the service builds the model's Translator), so every answer
after a restart can be compared with the same text decoded alone in this process. Real
processes, real sockets; ``HUNG_S`` and ``DOWN_S`` lowered where a test waits on them.
"""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import shutil
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from service.errors import InferenceFailed, Overloaded
from service.inference import decode_process
from service.inference.decode_process import DecodeProcess
from tests.service.inference.decode_stand_ins import (
    alive,
    broken,
    from_files,
    hung,
    kill,
    named_by_environment,
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


@synchronous
async def test_a_replaced_version_answers_the_requests_that_come_while_it_drains_then_ends() -> None:
    """A request that found the old version just before a swap reaches it after ``close`` (its
    texts were tokenised in a thread meanwhile): it is answered, as the in-process scheduler and
    the batcher answer a late caller. The child ends once nothing is held; only then are requests
    refused, naming the swap (the current version serves them)."""
    process = DecodeProcess(slow, token_budget=10_000)
    long_ids = [3, 4, 5] * 10
    running = asyncio.create_task(process.submit([long_ids], options(max_len=40)))
    await until(lambda: process.rows >= 1)
    pid = process.pid
    assert pid is not None
    process.close()
    late = await process.submit([[5, 6]], options())
    assert late.hypotheses[0].tokens == alone(TableDecoder(), [5, 6], options()).tokens
    assert not running.done() and alive(pid)  # the late one decoded beside the long one
    answer = await running
    assert answer.hypotheses[0].tokens == alone(TableDecoder(), long_ids, options(max_len=40)).tokens
    await until(lambda: not alive(pid) and not process.running)
    with pytest.raises(Overloaded, match="version was replaced"):
        await process.submit([[5, 6]], options())
    assert process.restarts == 0


@synchronous
async def test_a_replaced_version_whose_child_hangs_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its callers gave up (their deadline), so nothing is held and the child is told to end, but
    it is stuck in a step: ``HUNG_S`` later it is killed, not left holding its model's memory for
    the replica's lifetime (a replaced version is not in the health check), and not restarted."""
    monkeypatch.setattr(decode_process, "HUNG_S", 0.5)
    process = DecodeProcess(hung, token_budget=10_000)
    pid = process.pid
    assert pid is not None
    caller = asyncio.create_task(process.submit([[3, 4]], options(max_len=2)))
    await asyncio.sleep(0.2)  # in its first step (30 s)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    process.close()
    await asyncio.sleep(0.2)
    assert alive(pid)
    await until(lambda: not alive(pid) and not process.running, seconds=5)
    assert process.restarts == 0 and process.held == 0


@synchronous
async def test_a_request_released_before_the_child_read_it_leaves_no_false_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request submitted and released before the child's next pass (a client that left at once)
    leaves no pass to tell the parent that the child is idle; the child says so itself, so the
    next request, long after, does not find the silence since counted as a hang."""
    monkeypatch.setattr(decode_process, "HUNG_S", 0.3)
    process = DecodeProcess(table, token_budget=400)
    pid = process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # both messages wait in the socket: the child reads them together
    try:
        process.release(process.enqueue([[3, 4]], options()))
    finally:
        os.kill(pid, signal.SIGCONT)
    await asyncio.sleep(0.6)
    request = process.enqueue([[5, 6]], options())
    try:
        assert process.problem() is None
        answer = await request.future
    finally:
        process.release(request)
    assert answer.hypotheses[0].tokens == alone(TableDecoder(), [5, 6], options()).tokens
    process.close()


class _UnreadableOnce(Connection):
    """The parent's end of the socket, whose first answer cannot be read (as a message that does
    not unpickle, or one too large for memory)."""

    spoiled = False

    def recv(self):  # type: ignore[no-untyped-def]
        message = super().recv()
        if message[0] == "step" and message[3] and not _UnreadableOnce.spoiled:
            _UnreadableOnce.spoiled = True
            raise pickle.UnpicklingError("a message that does not unpickle")
        return message


@synchronous
async def test_a_message_that_cannot_be_read_fails_its_requests_and_the_child_starts_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reader thread does not die silently with the answers in flight (every later request
    would hang until the health check): the child is killed and started again, its requests fail."""
    monkeypatch.setattr(decode_process, "Connection", _UnreadableOnce)
    process = DecodeProcess(table, token_budget=400)
    first = process.pid
    with pytest.raises(InferenceFailed, match="decoder process exited"):
        await process.submit([[5, 6]], options())
    await until(lambda: process.pid != first and process.running)
    assert _UnreadableOnce.spoiled and process.restarts == 1
    answer = await process.submit([[5, 6]], options())
    assert answer.hypotheses[0].tokens == alone(TableDecoder(), [5, 6], options()).tokens
    process.close()


@synchronous
async def test_a_child_started_again_reports_the_providers_it_runs_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's runner shows the same list (``/info``): after a restart on other providers
    (a GPU gone meanwhile) it shows the new ones, not the first child's."""
    monkeypatch.setenv("STAND_IN_PROVIDER", "first")
    process = DecodeProcess(named_by_environment, token_budget=400)
    shown = process.providers
    assert shown == ["TableDecoder", "first"]
    monkeypatch.setenv("STAND_IN_PROVIDER", "second")
    first = kill(process)
    await until(lambda: process.pid != first and process.providers[-1] == "second")
    assert process.providers is shown
    process.close()


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
