"""Continuous batching: one worker thread owns the models and steps every running sequence.

Requests enter a bounded queue. Each iteration of the worker:

1. admits waiting requests while the batch has room (their prompt pass runs now);
2. retires sequences whose client went away (their KV slots are freed);
3. asks the policy how many tokens each sequence drafts, and drafts them
   (a draft model runs batched: one pass per draft step for all sequences; a
   hybrid sequence first picks prompt lookup or the draft model for this pass);
4. scores every sequence's ``[last token, *draft]`` in ONE batched target pass
   (:func:`verispec.batching.batched_forward`, ragged lengths);
5. verifies each sequence on its own (:func:`verispec.engine.finish_step`: its
   own accepted length, cache crop and random generator), turns the tokens into
   text (stop strings included) and hands an :class:`Update` to the request's
   asyncio queue; finished sequences leave the batch.

Sequences join and leave between target passes, so a short request never waits
for a long one. Nothing in a sequence's output depends on its batch mates:
greedy output equals the output of the request alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from verispec.batching import batched_forward, pooled, propose_batch, release
from verispec.costs import AdaptiveDraftLength
from verispec.drafters import (
    Draft,
    Drafter,
    DraftModelDrafter,
    HybridDrafter,
    PromptLookupDrafter,
)
from verispec.engine import (
    NO_DRAFT,
    SequenceState,
    StepEvent,
    draft_budget,
    finish_step,
    release_sequence,
    start_sequence,
    uncached_prompt,
)
from verispec.errors import VerispecError
from verispec.generate import Detokenizer, to_text_event
from verispec.models import LanguageModel
from verispec.prefix import PrefixCache
from verispec.sampling import SamplingParams
from verispec.server.policy import AcceptanceEstimate, DraftPolicy, FixedDraftLength
from verispec.server.provenance import ProvenanceTracker
from verispec.server.schemas import Provenance
from verispec.stats import GenerationStats

log = logging.getLogger("verispec.server")
PREFILL_ROWS = 2048  # most padded positions in one batched prompt pass


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
    drafter: str | None = None  # "model", "prompt-lookup", "hybrid" or "none"; None: the server's
    num_draft_tokens: int | None = None  # a fixed draft length; None: the policy's choice
    provenance: bool = False  # report each token's origin in the updates
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class _Running:
    request: GenerationRequest
    seq: SequenceState
    detok: Detokenizer | None
    estimate: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)
    trace: ProvenanceTracker | None = None


def asyncio_delivery(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Update]) -> Callable:
    """A ``deliver`` callback that puts updates on an asyncio queue from another thread."""

    def deliver(update: Update) -> None:
        # A closed event loop means nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, update)

    return deliver


class Scheduler:
    """Owns the models; serves :class:`GenerationRequest` s from a worker thread."""

    def __init__(
        self,
        target: LanguageModel,
        drafter: Drafter | None,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        num_draft_tokens: int = 4,
        policy: DraftPolicy | None = None,
        metrics: Any = None,  # verispec.server.metrics.Metrics, or None
        prefix_cache: int = 0,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or prefix_cache < 0:
            raise ValueError("max_batch must be >= 1, max_queue and prefix_cache >= 0")
        # Finished sequences' caches (copied out of the slots) for requests that continue
        # them: a chat's next turn scores only its new messages.
        self.prefix = PrefixCache(prefix_cache) if prefix_cache else None
        # Caches live in per-model slot pools, one slot per running sequence. The draft
        # model's pool is shared by every request that drafts with it ("model", "hybrid").
        self.target = pooled(target, slots=max_batch)
        if isinstance(drafter, DraftModelDrafter):
            drafter = DraftModelDrafter(pooled(drafter.model, slots=max_batch), target=self.target)
        elif isinstance(drafter, HybridDrafter):
            drafter = _with_model_drafter(
                drafter,
                DraftModelDrafter(pooled(drafter.model, slots=max_batch), target=self.target),
            )
        self.drafter = drafter
        # What a request may pick instead (its "drafter" option); prompt lookup costs nothing.
        lookup = PromptLookupDrafter()
        if isinstance(drafter, PromptLookupDrafter):
            lookup = drafter
        elif isinstance(drafter, HybridDrafter) and isinstance(drafter.lookup, PromptLookupDrafter):
            lookup = PromptLookupDrafter(max_ngram=drafter.lookup.max_ngram)
        self.drafters: dict[str, Drafter | None] = {"none": None, "prompt-lookup": lookup}
        if isinstance(drafter, DraftModelDrafter):
            self.drafters["model"] = drafter
            self.drafters["hybrid"] = HybridDrafter(drafter)
        elif isinstance(drafter, HybridDrafter):
            self.drafters["model"] = drafter.model_drafter
            self.drafters["hybrid"] = drafter
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_k = num_draft_tokens if drafter is not None else 0
        self.policy: DraftPolicy = policy or FixedDraftLength(self.max_k)
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

    def drafter_for(self, name: str | None) -> Drafter | None:
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
            try:
                seq = start_sequence(
                    self.target,
                    self.drafter_for(request.drafter),
                    request.prompt_ids,
                    params=request.params,
                    max_new_tokens=request.max_tokens,
                    prefix_cache=self.prefix,
                )
            except (VerispecError, ValueError, RuntimeError) as exc:
                request.deliver(Update(text="", num_tokens=0, error=str(exc)))
                continue
            self._attach_policy(seq, request)
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
                started = time.perf_counter()
                logits = batched_forward(
                    self.target,
                    [item.seq.cache for item in group],
                    [uncached_prompt(item.seq) for item in group],
                    num_logits=1,
                )
            except Exception as exc:  # e.g. out of memory: fail these requests, keep serving
                log.exception("prompt pass failed")
                for item in group:
                    item.request.deliver(
                        Update(text="", num_tokens=0, error=f"prompt pass failed: {exc}")
                    )
                    _free(item.seq)
                continue
            # The prompt pass picks each sequence's first token from its last row.
            for item, rows in zip(group, logits, strict=True):
                self._running.append(item)
                try:
                    event = finish_step(
                        self.target, item.seq, NO_DRAFT, rows, started=started, prompt=True
                    )
                    if self._emit(item, event, NO_DRAFT, rows):
                        done.append(item)
                except Exception as exc:  # a bug must not hang the client or the worker
                    log.exception("first token failed")
                    item.request.deliver(
                        Update(text="", num_tokens=0, error=f"generation failed: {exc}")
                    )
                    self._retire([item], cancelled=True, reuse=False)
        self._retire(done, cancelled=False)

    def _attach_policy(self, seq: SequenceState, request: GenerationRequest) -> None:
        """Under a cost policy (-k auto), a proposer that picks its own draft source per
        pass (hybrid) gets a per-sequence :class:`AdaptiveDraftLength`, attached as
        :func:`verispec.engine.speculate` attaches it; the batch policy's draft length caps
        its choice. A request with a fixed draft length gets none: like a fixed k in the
        engine, it drafts by lookup where the context repeats, else by the draft model."""
        attach = getattr(seq.proposer, "attach_policy", None)
        sequence_costs = getattr(self.policy, "sequence_costs", None)
        if attach is None or sequence_costs is None or request.num_draft_tokens is not None:
            return
        seq.policy = AdaptiveDraftLength(sequence_costs())
        attach(seq.policy)
        seq.proposer_chooses = True

    def _step(self) -> None:
        batch = self._running
        seqs = [item.seq for item in batch]
        choosers = [s.policy for s in seqs if s.proposer_chooses and s.policy is not None]
        sequence_costs = getattr(self.policy, "sequence_costs", None)
        if choosers and sequence_costs is not None:
            # The per-sequence policies follow the batch policy's learned costs (the
            # server's counterpart of the engine's per-sequence observe_time).
            costs = sequence_costs()
            for policy in choosers:
                policy.costs, policy.c_draft = costs, costs.c_draft
        # 3. Draft lengths from the policy, then the drafts.
        budgets = [self._budget(item) for item in batch]
        free = [_takes_lookup(item.seq, b) for item, b in zip(batch, budgets, strict=True)]
        ks = self.policy.choose([item.estimate for item in batch], budgets, free)
        # A request that fixed its draft length drafts its budget, whatever the policy says.
        ks = [
            b if item.request.num_draft_tokens is not None else k
            for item, k, b in zip(batch, ks, budgets, strict=True)
        ]
        t0 = time.perf_counter()
        drafts: list[Draft] = propose_batch(
            [s.proposer for s in seqs],
            [s.tokens for s in seqs],
            ks,
            [s.params for s in seqs],
            [s.generator for s in seqs],
        )
        t1 = time.perf_counter()
        # 4. One target pass for the whole batch.
        inputs = [[s.tokens[-1], *d.tokens] for s, d in zip(seqs, drafts, strict=True)]
        logits = batched_forward(self.target, [s.cache for s in seqs], inputs)
        t2 = time.perf_counter()
        self.passes += 1
        # 5. Verify, emit and retire, each sequence on its own.
        done = []
        for item, k, draft, rows in zip(batch, ks, drafts, logits, strict=True):
            item.seq.stats.time_draft += t1 - t0
            event = finish_step(self.target, item.seq, draft, rows, started=t1)
            item.estimate.observe(asked=k, drafted=event.num_drafted, accepted=event.num_accepted)
            if item.seq.policy is not None:  # a hybrid's source choice learns from this pass
                item.seq.policy.observe(event.num_drafted, event.num_accepted, free=draft.free)
            if self._emit(item, event, draft, rows):
                done.append(item)
        num_rows = len(inputs) * max(len(i) for i in inputs)  # what the padded pass scored
        self.policy.observe(
            rows=num_rows,
            seconds=t2 - t1,
            draft_lengths=[0 if d.free else len(d.tokens) for d in drafts],  # lookups cost 0
            draft_seconds=t1 - t0,
        )
        if self.metrics is not None:
            self.metrics.target_pass(seconds=t2 - t1, rows=num_rows, batch=len(batch))
        self._retire(done, cancelled=False)

    def _emit(self, item: _Running, event: StepEvent, draft: Draft, rows: torch.Tensor) -> bool:
        """Deliver one pass's tokens (text, provenance, metrics) to the request; True
        when the sequence finished."""
        text_event = to_text_event(item.detok, event, item.seq.stats)
        finish = text_event.finish_reason
        provenance = None
        if item.trace is not None:
            provenance = item.trace.record(
                event=event,
                text_event=text_event,
                draft=draft,
                logits=rows,
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
            self.metrics.record_pass(event, len(text_event.tokens), free=draft.free)
        return finish is not None

    def _budget(self, item: _Running) -> int:
        if item.seq.proposer is None:
            return 0
        k = item.request.num_draft_tokens
        return draft_budget(self.target, item.seq, self.max_k if k is None else k)

    def _retire(self, items: list[_Running], *, cancelled: bool, reuse: bool = True) -> None:
        """Remove sequences from the batch and free their slots; with ``reuse`` (they stopped
        between passes, so their caches are whole) the prefix cache keeps a copy first."""
        for item in items:
            self._running.remove(item)
            if reuse:
                try:
                    release_sequence(item.seq, self.target)
                except Exception:  # keeping a prefix is an optimization; never fail on it
                    log.exception("keeping a finished sequence's prefix failed")
            _free(item.seq)
            if self.metrics is not None:
                self.metrics.finished(cancelled=cancelled)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.running.set(len(self._running))


def _takes_lookup(seq: SequenceState, budget: int) -> bool:
    """A hybrid sequence that picks its own source and will draft this pass by prompt
    lookup: the batch policy charges it no draft-model time."""
    takes_lookup = getattr(seq.proposer, "takes_lookup", None)
    if not seq.proposer_chooses or takes_lookup is None:
        return False
    return bool(takes_lookup(seq.tokens, budget, params=seq.params, generator=seq.generator))


def _free(seq: SequenceState) -> None:
    """Give a sequence's KV slots back (target and draft model)."""
    release(seq.cache)
    release(getattr(seq.proposer, "cache", None))
    # A hybrid proposer keeps its draft-model proposer (and its cache) one level down.
    release(getattr(getattr(seq.proposer, "model", None), "cache", None))


def _with_model_drafter(hybrid: HybridDrafter, model_drafter: DraftModelDrafter) -> HybridDrafter:
    """``hybrid`` (its lookup and settings as they are) drafting with ``model_drafter``."""
    out = copy.copy(hybrid)
    out.model_drafter = model_drafter
    out.model = model_drafter.model
    return out


def _prefill_groups(items: list[_Running], max_rows: int = PREFILL_ROWS) -> list[list[_Running]]:
    """New sequences grouped for their prompt passes by prompt length, so that padding
    stays small: a group's padded size (sequences x longest prompt) stays under
    ``max_rows`` unless one prompt alone is longer."""
    todo = sorted(items, key=lambda item: len(uncached_prompt(item.seq)))
    groups: list[list[_Running]] = []
    for item in todo:
        if groups and (len(groups[-1]) + 1) * len(uncached_prompt(item.seq)) <= max_rows:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _openai_reason(finish: str) -> str:
    return "length" if finish == "length" else "stop"  # "eos" and stop strings are both "stop"
