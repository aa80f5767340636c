"""One model, in process: its runner behind its own scheduler, with its metrics and its queue limit.

Both topologies use it. In the default ``in-replica`` frontend every serving replica holds a
worker per model (and, during a hot swap, briefly one per version) and calls it directly; in the
Ray-ingress frontends each model deployment (``service/hosting/ray_ingress.py``) wraps one worker and the
ingress reaches it through a handle. Each worker has its own queue and batch parameters
(``Settings.batching_for``), so models never share a batch whatever the frontend.

Translation models whose decoder step carries a per-row state (``transformer-kv``, ``rnn``) run
on a :class:`~service.inference.scheduler.TranslationScheduler`: iteration-level batching, where
requests join and leave the running batch at every decoder step, bounded by a token budget.

Everything else (images, whole-prefix Transformers of older repositories, models whose output
depends on the batch) runs on a :class:`~service.inference.batcher.Batcher`: a batch holds up to
``max_batch_size`` sequences (a multi-text translation counts each text); an idle model starts at
once, a busy one takes what accumulated meanwhile (``batch_wait_timeout_s``, default 0, can make a
batch wait for more). It runs on the batcher's own thread so the event loop keeps accepting. A request
larger than a batch is split into batch-sized parts, answered whole and in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

from service.errors import InferenceFailed, Overloaded, ServiceError
from service.inference import decode_process
from service.inference.admission import Admission, Holding
from service.inference.batcher import Batcher
from service.inference.callers import Decoded, StepToken, all_or_none
from service.inference.decode_child import translator_decoder
from service.inference.decode_process import DecodeProcess
from service.inference.jobs import Answer, AnswerMetrics, LastTokens, Tokens, Translated, TranslateJob
from service.inference.repository import ModelEntry
from service.inference.runners import TranslateWork, TranslationRunner, decodes_continuously, make_runner
from service.inference.running_batch import text_cost
from service.inference.runtime import choose_providers
from service.inference.scheduler import TranslationScheduler
from service.inference.statistics import Snapshot, Statistics
from service.inference.worker_metrics import NoMetrics, WorkerMetrics
from service.settings import Settings, max_ongoing_requests, max_queued_requests

log = logging.getLogger("ray.serve")


class ModelWorker:
    def __init__(
        self,
        entry: ModelEntry,
        settings: Settings,
        replica: str,
        node: str,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.entry = entry
        providers = choose_providers(list(settings.providers))
        threads = settings.intra_op_threads
        #: translation on a per-row-state contract: iteration-level batching instead of batches,
        #: the decode loop in a process of its own unless settings.decode_process is off
        continuous = decodes_continuously(entry)
        remote = continuous and settings.decode_process
        self.runner = make_runner(entry, providers, threads, settings.limits, graphs=not remote)
        batching = settings.batching_for(entry.name)
        self.scheduler: TranslationScheduler | DecodeProcess | None = None
        batch_units = batching.max_batch_size  # what one batch holds, in the units of its work
        start = time.perf_counter()  # a replica takes traffic only once constructed and warm
        if not remote:  # a decode process warms up its own graphs
            self.runner.warmup()
        if isinstance(self.runner, TranslationRunner) and continuous:
            spec = self.runner.translator.spec
            budget = batching.token_budget or batching.max_batch_size * (
                spec.max_source_tokens + spec.max_target_tokens
            )
            batch_units = budget
            if remote:
                load = functools.partial(
                    translator_decoder, manifest=entry.manifest, providers=providers, threads=threads
                )
                # it warms up there, from the version's files held open here (a restart too)
                self.scheduler = DecodeProcess(load, budget, self._stepped, files=entry.directory)
                self.runner.providers = self.scheduler.providers
            else:
                self.scheduler = TranslationScheduler(self.runner.translator, budget, self._stepped)
        self.warmup_ms = round((time.perf_counter() - start) * 1000, 3)
        self.max_batch_size = batching.max_batch_size
        self.batcher: Batcher[Any, Any] = Batcher(
            self._infer, batching.max_batch_size, batching.batch_wait_timeout_s, name=entry.name
        )
        #: requests (or parts of one) this worker holds at once — waiting, or in a batch that is
        #: computing or being answered — before it sheds new ones
        self.capacity = max_ongoing_requests(settings, entry.name) + max_queued_requests(
            settings, entry.manifest.task
        )
        self._preprocessing = 0  # jobs in :meth:`_accept_in_thread`
        #: and before that, work that would not drain within the request timeout is shed at once
        #: (``service/inference/admission.py``), in the units of the model's batch: positions of
        #: the token budget on the scheduler, texts or images on the batcher
        limits = settings.limits
        self.admission = Admission(
            entry.name,
            batch_units,
            limits.request_timeout_s if limits.shed_by_predicted_wait else math.inf,
        )
        self.metrics = metrics or NoMetrics()
        self.statistics = Statistics()
        provider = self.runner.providers[0]
        self.metrics.loaded(entry.version, entry.manifest.task, entry.manifest.family, provider)
        self.replica, self.node = replica, node
        self.stream_interval_s = settings.stream_interval_ms / 1000
        log.info(
            "%s v%s ready on %s, batch ≤ %d", entry.name, entry.version, provider, batching.max_batch_size
        )

    async def info(self) -> dict[str, Any]:
        return {
            "providers": list(self.runner.providers),
            "max_batch_size": self.max_batch_size,
            "warmup_ms": self.warmup_ms,
        }

    async def stats(self) -> Snapshot:
        """What this version did since it was loaded (Triton's statistics extension)."""
        return self.statistics.snapshot(self.entry.name, self.entry.version)

    @property
    def held(self) -> int:
        """Requests (or parts of one) being preprocessed in a thread, waiting, being computed or
        being answered."""
        return self._preprocessing + self.batcher.held + (self.scheduler.held if self.scheduler else 0)

    async def predict(self, job: Any) -> Answer:
        """Preprocess here (per request), infer in batches, postprocess here."""
        start = time.perf_counter()
        try:  # as _failures_counted, inline: this is every request's path
            work = self._accept(job) if self.runner.inline(job) else await self._accept_in_thread(job)
            accepted = time.perf_counter()
            with self._held(work) as holding:
                answer = await (self._decode(work) if self.scheduler is not None else self._batched(work))
                holding.computed()
        except Exception:
            self.statistics.failed(time.perf_counter() - start)
            raise
        self._answered(work, answer, start, accepted)
        return answer

    def _answered(self, work: Any, answer: Answer, start: float, accepted: float) -> None:
        m = answer.metrics
        self.statistics.answered(
            self.runner.size(work), time.perf_counter() - start, accepted - start,
            m.queue_wait_ms / 1000, m.compute_ms / 1000,
        )  # fmt: skip

    async def stream(self, job: Any) -> AsyncIterator[Tokens | Answer]:
        """A translation's tokens as the scheduler delivers them (lists of :class:`TokenEvent`:
        those of the steps since the last item), then its :class:`Answer`
        — the one :meth:`predict` gives. Beam search, and models that decode in
        static batches (whole-prefix graphs, images), yield the answer alone: a beam's best
        prefix can change until it ends. Closing the iterator early (a client gone) takes the
        request's rows out of the batch at the next step. What waits here is bounded by the
        request's own tokens (texts × its target limit): the scheduler never runs ahead of that.

        Tokens chosen within ``stream_interval_ms`` of the last item wait and go together in the
        next one (the first goes at once, the last with the answer): a reader sees no difference
        below a display frame, and a busy replica writes a few chunks per answer instead of one
        per token. The scheduler holds them (``TranslationScheduler.enqueue``'s ``interval_s``):
        a decode process sends them across, and this loop wakes, once per interval, not per step."""
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            with self._failures_counted(start):
                work = self._accept(job) if self.runner.inline(job) else await self._accept_in_thread(job)
                # refused when it comes, never shed later: its caller also waits outside (writing)
                holding = stack.enter_context(self._held(work, sheddable=False))
            async with contextlib.aclosing(self._events(work, start, holding)) as events:
                async for item in events:
                    yield item

    async def _events(
        self, work: Any, start: float, holding: Holding
    ) -> AsyncGenerator[Tokens | Answer, None]:
        """:meth:`stream`'s items, for admitted ``work``; ``holding`` is given back as soon as
        the work is computed, however slowly its client reads."""
        accepted = time.perf_counter()
        runner = self.runner
        if self.scheduler is None or not isinstance(runner, TranslationRunner) or work.job.beam_size > 1:
            with self._failures_counted(start):
                answer = await (self._decode(work) if self.scheduler is not None else self._batched(work))
            holding.computed()
            self._answered(work, answer, start, accepted)
            yield answer
            return
        loop = asyncio.get_running_loop()
        chosen: list[StepToken] = []  # delivered by the scheduler, not yet yielded
        wake: asyncio.Future[None] | None = None

        def arrived(tokens: list[StepToken] | None = None) -> None:
            if tokens:
                chosen.extend(tokens)
            if wake is not None and not wake.done():
                wake.set_result(None)

        # the scheduler's own future, waited on here with the tokens (no task of its own)
        attention = work.job.attention != "none"
        options = runner.options(work.job)
        with self._failures_counted(start):  # refused there (a decode process restarting): a fail
            request = self.scheduler.enqueue(work.ids, options, arrived, attention, self.stream_interval_s)
        decoding = request.future
        decoding.add_done_callback(lambda _: arrived())  # after every token: the loop keeps the order
        # decoded: the units go back now, while the client may still be reading its tokens
        decoding.add_done_callback(lambda f: None if f.cancelled() or f.exception() else holding.computed())
        streams = runner.token_streams(work)
        try:
            while True:
                if chosen:  # what arrived since the last item: one item
                    ready = chosen[:]
                    chosen.clear()
                    events = [runner.token_event(work, streams, token) for token in ready]
                    yield LastTokens(events) if decoding.done() else events
                elif decoding.done():
                    break
                else:
                    wake = loop.create_future()
                    await wake
            with self._failures_counted(start), self._runtime_failures("decoding"):
                decoded = decoding.result()
            holding.computed()  # (if the done-callback, queued behind this task, has not yet)
            answer = self._decoded_answer(work, decoded)
            self._answered(work, answer, start, accepted)
            yield answer
        finally:
            self.scheduler.release(request)  # the caller left early: its rows leave the batch

    @contextlib.contextmanager
    def _failures_counted(self, start: float) -> Iterator[None]:
        """A request that fails here is counted in the statistics' ``fail`` (a client that left is
        not: that is a cancellation, not an exception)."""
        try:
            yield
        except Exception:
            self.statistics.failed(time.perf_counter() - start)
            raise

    def _accept(self, job: Any) -> Any:
        self._admit(job)
        return self.runner.preprocess(job)

    async def _accept_in_thread(self, job: Any) -> Any:
        """:meth:`_accept` for a job whose preprocessing would hold the event loop, and with it
        every model and protocol of the replica (a large image's decoding): admitted here, then
        preprocessed in a thread of the loop's executor."""
        self._admit(job)
        self._preprocessing += 1  # held meanwhile: the capacity counts it
        try:
            return await asyncio.to_thread(self.runner.preprocess, job)
        finally:
            self._preprocessing -= 1

    def _admit(self, job: Any) -> None:
        if self.held >= self.capacity:
            raise Overloaded(f"model {self.entry.name!r} is overloaded; retry later")
        self.admission.check(self._least_cost(job))  # before tokenising or decoding it

    def _held(self, work: Any, sheddable: bool = True) -> Holding:
        """``work``'s place in the admission while it is computed (:meth:`Admission.holding`)."""
        return self.admission.holding(self._cost(work), sheddable)

    def _least_cost(self, job: Any) -> int:
        """:meth:`_cost` of ``job``'s work at least, known before its preprocessing: each text
        one source token long. Under overload, refusing a request of 64 texts before tokenising
        them leaves that time to the model."""
        if not isinstance(job, TranslateJob):
            return 1
        if self.scheduler is None or not isinstance(self.runner, TranslationRunner):
            return len(job.texts)
        return len(job.texts) * text_cost([0], self.runner.options(job))

    def _cost(self, work: Any) -> int:
        """What ``work`` holds of a batch: on the scheduler, its texts' positions of the token
        budget (what a text holds there); else its size (texts, images)."""
        if self.scheduler is None or not isinstance(work, TranslateWork):
            return self.runner.size(work)
        assert isinstance(self.runner, TranslationRunner)
        options = self.runner.options(work.job)
        return sum(text_cost(ids, options) for ids in work.ids)

    async def _batched(self, work: Any) -> Answer:
        size = self.runner.size(work)
        if size <= self.max_batch_size:
            done = [await self.batcher.submit(work, size)]
        else:  # larger than a batch: batch-sized parts, answered whole and in order
            parts = self.runner.split(work, self.max_batch_size)
            done = await all_or_none([self.batcher.submit(p, self.runner.size(p)) for p in parts])
        for d in done:
            self.metrics.waited(d.queue_wait_s)
        output = done[0].output if len(done) == 1 else self.runner.join([d.output for d in done])
        result = self.runner.postprocess(work, output)
        tokens = result.tokens_generated if isinstance(result, Translated) else None
        self.metrics.generated(tokens or 0)
        metrics = AnswerMetrics(
            queue_wait_ms=round(max(d.queue_wait_s for d in done) * 1000, 3),
            # parts that shared a batch computed once
            compute_ms=round(sum({d.batch_id: d.compute_s for d in done}.values()) * 1000, 3),
            batch_size=max(d.batch_size for d in done),
            tokens_generated=tokens,
            replica=self.replica,
            node=self.node,
        )
        return Answer(self.entry.name, self.entry.version, result, metrics)

    async def _decode(self, work: TranslateWork) -> Answer:
        """A translation through the model's scheduler: its texts join the running batch at the
        next decoder step and it is answered as soon as its last text is done."""
        assert self.scheduler is not None and isinstance(self.runner, TranslationRunner)
        with self._runtime_failures("decoding"):
            options = self.runner.options(work.job)
            decoded = await self.scheduler.submit(work.ids, options, attention=work.job.attention != "none")
        return self._decoded_answer(work, decoded)

    def _decoded_answer(self, work: TranslateWork, decoded: Decoded) -> Answer:
        assert isinstance(self.runner, TranslationRunner)
        result = self.runner.postprocess(work, self.runner.finish(work, decoded.hypotheses))
        tokens = result.tokens_generated
        longest = max(len(t.target_tokens) for t in result.translations)
        per_token = (
            (decoded.queue_wait_s + decoded.compute_s - decoded.time_to_first_token_s) / (longest - 1)
            if longest > 1
            else None
        )
        self.metrics.waited(decoded.queue_wait_s)
        self.metrics.generated(tokens)
        self.metrics.decoded(decoded.time_to_first_token_s, per_token)
        metrics = AnswerMetrics(
            queue_wait_ms=round(decoded.queue_wait_s * 1000, 3),
            compute_ms=round(decoded.compute_s * 1000, 3),
            batch_size=max(1, round(decoded.mean_rows)),
            tokens_generated=tokens,
            replica=self.replica,
            node=self.node,
            time_to_first_token_ms=round(decoded.time_to_first_token_s * 1000, 3),
            time_per_output_token_ms=None if per_token is None else round(per_token * 1000, 3),
        )
        return Answer(self.entry.name, self.entry.version, result, metrics)

    @contextlib.contextmanager
    def _runtime_failures(self, what: str) -> Iterator[None]:
        """A runtime failure reaches its callers as InferenceFailed (logged once, here); the
        service's own refusals pass through unchanged."""
        try:
            yield
        except ServiceError:
            raise
        except Exception as exc:
            log.exception("%s: %s failed", self.entry.name, what)
            raise InferenceFailed(f"inference failed: {type(exc).__name__}") from exc

    def _stepped(self, rows: int, live: int, tokens: int, seconds: float) -> None:
        if rows:  # else: no step ran, the batch only lost the rows of callers that left
            self.metrics.batch(rows, seconds)
            self.statistics.executed(rows, seconds)
        self.metrics.stepped(live, tokens, 1 if rows else 0)

    def _infer(self, works: list[Any]) -> list[Any]:
        """One formed batch, on the batcher's thread; a runtime failure reaches every caller in it."""
        start = time.perf_counter()
        with self._runtime_failures(f"batch of {len(works)}"):
            outputs = self.runner.infer(works)
        size, seconds = sum(self.runner.size(w) for w in works), time.perf_counter() - start
        self.metrics.batch(size, seconds)
        self.statistics.executed(size, seconds)
        return outputs

    def refresh_metrics(self) -> None:
        """Every few seconds (the replica's health check): the gauges again, with the wait the
        admission predicts now."""
        self.metrics.predicted_wait(self.admission.wait_s)
        self.metrics.refresh()

    def problem(self) -> str | None:
        """What makes this model unhealthy, else None: its decode process down or hung, or a batch
        or decoder step in this process that has run for ``HUNG_S`` (a call into ONNX Runtime
        that never returns: its requests time out, then every new one is shed, until Ray
        replaces the replica)."""
        if isinstance(self.scheduler, DecodeProcess):
            return self.scheduler.problem()
        now = time.monotonic()
        stepping = self.scheduler.stepping_since if self.scheduler is not None else None
        for what, since in (("a batch", self.batcher.computing_since), ("a decoder step", stepping)):
            if since is not None and now - since >= decode_process.HUNG_S:
                return f"{what} has run for {now - since:.0f} s"
        return None

    def close(self) -> None:
        """This version is being replaced: finish what is queued, then let the batch thread (or
        the scheduler's loop) end."""
        self.metrics.unloaded()
        self.batcher.close()
        if self.scheduler is not None:
            self.scheduler.close()
