"""Continuous batching: one worker thread owns the models and steps every running sequence.

Requests enter a bounded queue. Each iteration of the worker:

1. admits waiting requests while the batch has room (their prompt passes run
   now, batched, similar prompt lengths together);
2. retires sequences whose client went away;
3. advances every running sequence by one target pass with the library's own
   decode step (:func:`verispec.engine.step`): drafting (every drafter feature:
   lookup hints, token-tree siblings, confidence-stopped drafts, hybrid routing,
   the per-machine cost model), one batched target pass, verification per
   sequence;
4. turns each sequence's new tokens into text (stop strings included) and hands
   an :class:`Update` to the request's asyncio queue; finished sequences leave
   the batch, and their caches go to the prefix cache.

Sequences join and leave between target passes, so a short request never waits
for a long one. Nothing in a sequence's output depends on its batch mates:
greedy output equals the output of the request alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from verispec.drafting import Drafter
from verispec.engine import (
    DraftLength,
    SequenceState,
    StepEvent,
    prompt_pass,
    release_sequence,
    start_sequence,
    step,
    uncached_prompt,
)
from verispec.errors import VerispecError
from verispec.generate import Detokenizer, to_text_event
from verispec.models import LanguageModel
from verispec.policy.costs import CostModel
from verispec.prefix import PrefixCache
from verispec.sampling import SamplingParams
from verispec.server.metrics import Metrics
from verispec.server.provenance import ProvenanceTracker
from verispec.server.schemas import Provenance
from verispec.stats import GenerationStats

log = logging.getLogger("verispec.server")
PREFILL_ROWS = 2048  # most positions in one batched prompt pass


class QueueFullError(Exception):
    """The waiting queue is at its limit; the client should retry later."""


class ShuttingDownError(Exception):
    """The server no longer accepts requests."""


@dataclass(frozen=True)
class Update:
    """What the worker tells a request: new text, and at the end the outcome."""

    text: str
    num_tokens: int
    finish_reason: str | None = None  # "stop", "length" or None (more to come)
    stats: GenerationStats | None = None  # with the last update
    error: str | None = None  # the request failed; no more updates
    provenance: Provenance | None = None  # where the tokens came from (if the request asked)
    token_ids: tuple[int, ...] = ()  # the new tokens themselves (num_tokens of them)


@dataclass(eq=False)
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    deliver: Callable[[Update], None]  # called from the worker thread; must not block
    drafter: str | None = None  # a name from Scheduler.drafters; None: the server's
    num_draft_tokens: int | None = None  # a fixed draft length; None: the server's choice
    provenance: bool = False  # report each token's origin in the updates
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class _Running:
    request: GenerationRequest
    seq: SequenceState
    detok: Detokenizer | None
    trace: ProvenanceTracker | None = None


def asyncio_delivery(
    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Update]
) -> Callable[[Update], None]:
    """A ``deliver`` callback that puts updates on an asyncio queue from another thread."""

    def deliver(update: Update) -> None:
        # A closed event loop means nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, update)

    return deliver


class Scheduler:
    """Owns the models; serves :class:`GenerationRequest` s from a worker thread.

    ``drafters`` are the drafters a request may pick by name (``None``: plain
    decoding), ``default`` the one a request gets when it names none.
    ``num_draft_tokens`` is the server's draft length: a fixed k, or ``"auto"``
    (each sequence's :class:`~verispec.policy.DraftPolicy` over ``costs``, as in
    the library, with a batch's drafts capped where its shared pass grows costly).
    """

    def __init__(
        self,
        target: LanguageModel,
        drafters: Mapping[str, Drafter[Any] | None],
        *,
        default: str,
        max_batch: int = 8,
        max_queue: int = 64,
        num_draft_tokens: DraftLength = 4,
        costs: CostModel | None = None,
        siblings: bool = True,
        metrics: Metrics | None = None,
        prefix_cache: int = 0,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or prefix_cache < 0:
            raise ValueError("max_batch must be >= 1, max_queue and prefix_cache >= 0")
        if default not in drafters:
            raise ValueError(f"the default drafter {default!r} is not one of {list(drafters)}")
        if (
            num_draft_tokens == "auto"
            and costs is None
            and any(d is not None for d in drafters.values())
        ):
            raise ValueError("num_draft_tokens='auto' needs a cost model (costs=...)")
        # Finished sequences' caches for requests that continue them: a chat's next
        # turn scores only its new messages.
        self.prefix = PrefixCache(prefix_cache) if prefix_cache else None
        self.target = target
        self.drafters = dict(drafters)
        self.default = default
        self.drafter = drafters[default]
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.num_draft_tokens = num_draft_tokens
        self.costs = costs
        self.siblings = siblings
        self.metrics = metrics
        self._waiting: deque[GenerationRequest] = deque()
        self._running: list[_Running] = []
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.passes = 0  # target passes so far (all sequences)

    # -- called from the web server's thread -------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="verispec-scheduler", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> None:
        with self._lock:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} waiting requests)")
            self._waiting.append(request)
            self._gauges()
            self._lock.notify()

    def cancel(self, request: GenerationRequest) -> None:
        """Drop a request; a running one leaves the batch (and frees its cache) before
        the next target pass."""
        request.cancelled = True
        with self._lock:
            if request in self._waiting:
                self._waiting.remove(request)
                self._gauges()
            self._lock.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish running sequences (up to ``timeout`` seconds), answer waiting ones with
        an error, and end the worker."""
        with self._lock:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            self._lock.notify()
        for request in waiting:
            request.deliver(Update(text="", num_tokens=0, error="the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # still generating: answer and cut the rest short
                for item in list(self._running):
                    item.request.deliver(
                        Update(text="", num_tokens=0, error="the server is shutting down")
                    )
                    item.request.cancelled = True
                self._thread.join(5.0)

    def drafter_for(self, name: str | None) -> Drafter[Any] | None:
        """The drafter a request asks for by name (None: the server's own)."""
        if name is None:
            return self.drafter
        if name not in self.drafters:
            raise ValueError(
                f"this server has no {name!r} drafter (available: {', '.join(self.drafters)})"
            )
        return self.drafters[name]

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the worker thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._running and not self._waiting and not self._stopping:
                    self._lock.wait()
                if self._stopping and not self._running:
                    return
                room = self.max_batch - len(self._running)
                admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            self._admit(admitted)
            self._retire([r for r in self._running if r.request.cancelled], cancelled=True)
            if self._running:
                try:
                    self._step()
                except Exception as exc:  # a bug must not hang clients or kill the worker
                    log.exception("batched step failed")
                    for item in self._running:
                        item.request.deliver(
                            Update(text="", num_tokens=0, error=f"generation failed: {exc}")
                        )
                    self._retire(list(self._running), cancelled=True, reuse=False)
            self._gauges()

    def _admit(self, requests: list[GenerationRequest]) -> None:
        """Start new sequences; their prompt passes run batched (similar lengths together)."""
        new: list[_Running] = []
        for request in requests:
            if request.cancelled:
                continue
            plain = request.num_draft_tokens == 0  # this request asked for plain decoding
            try:
                seq = start_sequence(
                    self.target,
                    None if plain else self.drafter_for(request.drafter),
                    request.prompt_ids,
                    params=request.params,
                    max_new_tokens=request.max_tokens,
                    num_draft_tokens=request.num_draft_tokens or self.num_draft_tokens,
                    costs=self.costs,
                    siblings=self.siblings,
                    prefix_cache=self.prefix,
                )
            except (VerispecError, ValueError, RuntimeError) as exc:
                request.deliver(Update(text="", num_tokens=0, error=str(exc)))
                continue
            tokenizer = self.target.tokenizer
            detok = Detokenizer(tokenizer, request.stop) if tokenizer is not None else None
            trace = ProvenanceTracker(tokenizer) if request.provenance else None
            new.append(_Running(request=request, seq=seq, detok=detok, trace=trace))
        now = time.perf_counter()
        for item in new:
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(len(item.request.prompt_ids))
                self.metrics.queue_wait.observe(now - item.request.submitted_at)
        done: list[_Running] = []
        for group in _prefill_groups(new):
            try:
                events = prompt_pass(self.target, [item.seq for item in group])
            except Exception as exc:  # e.g. out of memory: fail these requests, keep serving
                log.exception("prompt pass failed")
                for item in group:
                    item.request.deliver(
                        Update(text="", num_tokens=0, error=f"prompt pass failed: {exc}")
                    )
                continue
            for item, event in zip(group, events, strict=True):
                self._running.append(item)
                try:
                    if self._emit(item, event):
                        done.append(item)
                except Exception as exc:  # a bug must not hang the client or the worker
                    log.exception("first token failed")
                    item.request.deliver(
                        Update(text="", num_tokens=0, error=f"generation failed: {exc}")
                    )
                    self._retire([item], cancelled=True, reuse=False)
        self._retire(done, cancelled=False)

    def _step(self) -> None:
        batch = list(self._running)
        started = time.perf_counter()
        events = step(self.target, [item.seq for item in batch])
        seconds = time.perf_counter() - started
        self.passes += 1
        done, failed = [], []
        for item, event in zip(batch, events, strict=True):
            if event.error is not None:  # its drafter failed: end just this request
                item.request.deliver(Update(text="", num_tokens=0, error=event.error))
                failed.append(item)
            elif self._emit(item, event):
                done.append(item)
        if self.metrics is not None:
            rows = sum(1 + len(e.draft.tokens) + len(e.draft.siblings) for e in events)
            self.metrics.target_pass(seconds=seconds, rows=rows, batch=len(batch))
        self._retire(done, cancelled=False)
        self._retire(failed, cancelled=True)

    def _emit(self, item: _Running, event: StepEvent) -> bool:
        """Deliver one pass's tokens (text, provenance, metrics) to the request; True
        when the sequence finished."""
        text_event = to_text_event(item.detok, event, item.seq.stats)
        finish = text_event.finish_reason
        provenance = None
        if item.trace is not None and event.logits is not None:
            provenance = item.trace.record(
                event=event,
                text_event=text_event,
                draft=event.draft,
                logits=event.logits,
                params=item.seq.params,
                detok=item.detok,
            )
        item.request.deliver(
            Update(
                text=text_event.text,
                num_tokens=len(text_event.tokens),
                token_ids=tuple(text_event.tokens),
                finish_reason=None if finish is None else _openai_reason(finish),
                stats=item.seq.stats if finish is not None else None,
                provenance=provenance,
            )
        )
        if self.metrics is not None:
            self.metrics.record_pass(event, len(text_event.tokens), free=event.draft.free)
        return finish is not None

    def _retire(self, items: list[_Running], *, cancelled: bool, reuse: bool = True) -> None:
        """Remove sequences from the batch; with ``reuse`` (they stopped between passes,
        so their caches are whole) the prefix cache keeps their caches."""
        for item in items:
            self._running.remove(item)
            if reuse:
                try:
                    release_sequence(item.seq, self.target)
                except Exception:  # keeping a prefix is an optimization; never fail on it
                    log.exception("keeping a finished sequence's prefix failed")
            if self.metrics is not None:
                self.metrics.finished(cancelled=cancelled)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.running.set(len(self._running))


def _prefill_groups(items: list[_Running], max_rows: int = PREFILL_ROWS) -> list[list[_Running]]:
    """New sequences grouped for their prompt passes by prompt length, so that one pass
    stays under ``max_rows`` positions unless one prompt alone is longer."""
    todo = sorted(items, key=lambda item: len(uncached_prompt(item.seq)))
    groups: list[list[_Running]] = []
    rows = 0
    for item in todo:
        n = len(uncached_prompt(item.seq))
        if groups and rows + n <= max_rows:
            groups[-1].append(item)
            rows += n
        else:
            groups.append([item])
            rows = n
    return groups


def _openai_reason(finish: str) -> str:
    return "length" if finish == "length" else "stop"  # "eos" and stop strings are both "stop"
