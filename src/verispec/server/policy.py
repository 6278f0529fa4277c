"""How many tokens each sequence of a batch drafts: the one decision the scheduler delegates.

A policy maps the running acceptance estimates and draft budgets of the
sequences in a batch to a draft length per sequence (0 = no speculation).

:class:`FixedDraftLength` drafts k everywhere. :class:`BatchCostPolicy` maximizes
expected output tokens per second of the whole batched pass. In a batch the
cost of a pass depends on the total number of positions scored (its rows), so
the single-sequence ``c_verify(k)`` of :mod:`verispec.costs` is not enough:
on a CPU, 16 sequences scoring 1 row each cost about as much as 1 scoring 16,
and 16 x 5 rows cost several times more. The policy therefore uses measured
seconds per pass as a function of rows (:class:`BatchCosts`).

One draft length per batch: a batched pass pads every sequence to the longest
input, so a batch of B sequences drafting up to K tokens costs
``T(B * (K + 1))`` whoever drafts fewer. For each K the policy adds up the
expected tokens of the sequences, ``1 + alpha + ... + alpha^K`` each
(Leviathan et al.; scaled by how much of a draft a prompt lookup fills, and
fewer where a sequence's budget is smaller), divides by the
pass and the K lock-step draft steps, and keeps the best K; 0 (no speculation)
unless another K beats it by a margin. A hybrid sequence that will draft by prompt
lookup this pass (``free``) is charged no draft step, and for each K the policy also
weighs letting only such sequences draft (the others pad the pass but draft nothing).

Example: passes of 1-4 rows cost 1 s, 8 rows 5 s. One sequence with alpha 0.9
drafts K = 3: 3.44 expected tokens in 1 s against 1 token for plain decoding.
Four such sequences draft nothing: 4 tokens in 1 s plainly, 7.6 in 5 s with K = 1.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from verispec.batching import batched_forward, release
from verispec.costs import CostModel, expected_tokens
from verispec.models import LanguageModel


@dataclass
class AcceptanceEstimate:
    """What drafting is worth for one sequence: running acceptance rate and fill.

    alpha: accepted / drafted, per position up to the first rejection. fill:
    drafted / asked (a prompt lookup often finds fewer tokens than asked, or
    none). Both are exponential moving averages; passes the policy gave no
    draft pull them slowly back to their priors, so a sequence is tried again.
    """

    alpha: float = 0.6
    fill: float = 1.0
    decay: float = 0.9
    relax: float = 0.05

    def expected_tokens(self, k: int) -> float:
        """Expected new tokens of a pass with k draft tokens asked for (1 for k = 0)."""
        return 1.0 + self.fill * (expected_tokens(self.alpha, k) - 1.0)

    def observe(self, *, asked: int, drafted: int, accepted: int) -> None:
        if asked == 0:
            self.alpha += self.relax * (AcceptanceEstimate.alpha - self.alpha)
            self.fill += self.relax * (AcceptanceEstimate.fill - self.fill)
            return
        self.fill = self.decay * self.fill + (1 - self.decay) * min(1.0, drafted / asked)
        for i in range(min(drafted, accepted + 1)):
            self.alpha = self.decay * self.alpha + (1 - self.decay) * (1.0 if i < accepted else 0.0)


class DraftPolicy(Protocol):
    def choose(
        self,
        estimates: Sequence[AcceptanceEstimate],
        budgets: Sequence[int],
        free: Sequence[bool] | None = None,
    ) -> list[int]:
        """Draft length per sequence, each at most its budget. ``free[i]``: sequence i
        drafts this pass by prompt lookup (a hybrid that found a match), at no draft cost."""
        ...

    def observe(
        self, *, rows: int, seconds: float, draft_lengths: Sequence[int], draft_seconds: float
    ) -> None:
        """The pass just run: positions scored (padded), its time, the draft lengths (0 for a
        prompt lookup's, which cost nothing) and the drafting time."""
        ...


@dataclass(frozen=True)
class FixedDraftLength:
    k: int

    def choose(
        self,
        estimates: Sequence[AcceptanceEstimate],
        budgets: Sequence[int],
        free: Sequence[bool] | None = None,
    ) -> list[int]:
        del estimates, free  # a fixed k drafts its k whatever the estimates and sources
        return [min(self.k, b) for b in budgets]

    def observe(
        self, *, rows: int, seconds: float, draft_lengths: Sequence[int], draft_seconds: float
    ) -> None:
        del rows, seconds, draft_lengths, draft_seconds  # a fixed k learns nothing


@dataclass
class BatchCosts:
    """Seconds per pass, measured at start-up and corrected by every pass the server runs.

    ``target_seconds[i]``: one target pass scoring ``target_rows[i]`` positions in all.
    ``draft_seconds[i]``: one draft-model step of ``draft_batch[i]`` sequences (one
    position each); empty when drafting is free (prompt lookup). Interpolated
    linearly, extrapolated beyond the last point.
    """

    target_rows: list[int]
    target_seconds: list[float]
    draft_batch: list[int] = field(default_factory=list)
    draft_seconds: list[float] = field(default_factory=list)
    draft_scale: float = 1.0  # observed / measured draft time
    learning_rate: float = 0.3

    def target(self, rows: int) -> float:
        return _interpolate(self.target_rows, self.target_seconds, rows)

    def draft(self, draft_lengths: Sequence[int]) -> float:
        """Lock-step drafting: step i is one pass over the sequences drafting >= i tokens."""
        if not self.draft_seconds:
            return 0.0
        total, longest = 0.0, max(draft_lengths, default=0)
        for i in range(1, longest + 1):
            batch = sum(1 for k in draft_lengths if k >= i)
            total += _interpolate(self.draft_batch, self.draft_seconds, batch)
        return total * self.draft_scale

    def learn(
        self, *, rows: int, seconds: float, draft_lengths: Sequence[int], draft_seconds: float
    ) -> None:
        """Move the estimates toward a pass just timed: contexts grow, load changes."""
        rate = self.learning_rate
        predicted = self.target(rows)
        if predicted > 0:
            factor = 1 + rate * (_clamp(seconds / predicted) - 1)
            for i, weight in _neighbours(self.target_rows, rows):
                self.target_seconds[i] *= 1 + weight * (factor - 1)
        predicted = self.draft(draft_lengths)
        if predicted > 0 and draft_seconds > 0:
            self.draft_scale *= 1 + rate * (_clamp(draft_seconds / predicted) - 1)


def _clamp(ratio: float) -> float:
    return min(max(ratio, 0.2), 5.0)  # one outlier (a GC pause) moves little


def _neighbours(xs: Sequence[int], x: int) -> list[tuple[int, float]]:
    """The grid points around x, weighted by closeness."""
    j = bisect.bisect_left(xs, x)
    if j == 0 or j == len(xs):
        return [(min(j, len(xs) - 1), 1.0)]
    if xs[j] == x:
        return [(j, 1.0)]
    w = (x - xs[j - 1]) / (xs[j] - xs[j - 1])
    return [(j - 1, 1 - w), (j, w)]


def _interpolate(xs: Sequence[int], ys: Sequence[float], x: int) -> float:
    if x <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + w * (ys[i] - ys[i - 1])
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else ys[-1] / xs[-1]
    return ys[-1] + max(slope, 0.0) * (x - xs[-1])


@dataclass
class BatchCostPolicy:
    costs: BatchCosts
    max_k: int = 8
    margin: float = 1.05  # speculation must promise this much over plain decoding
    choices: list[int] = field(default_factory=list, repr=False)  # last allocation (for tests)

    def choose(
        self,
        estimates: Sequence[AcceptanceEstimate],
        budgets: Sequence[int],
        free: Sequence[bool] | None = None,
    ) -> list[int]:
        batch = len(estimates)
        free = free if free is not None else [False] * batch
        plain_rate = batch / self.costs.target(batch)
        best_rate, best = 0.0, [0] * batch
        for k in range(1, min(self.max_k, max(budgets, default=0)) + 1):
            everyone = [min(k, b) for b in budgets]
            options = [everyone]
            if any(free) and not all(free):  # or only the lookups draft (they cost nothing)
                options.append([n if f else 0 for f, n in zip(free, everyone, strict=True)])
            for ks in options:
                tokens = sum(e.expected_tokens(n) for e, n in zip(estimates, ks, strict=True))
                model_ks = [0 if f else n for f, n in zip(free, ks, strict=True)]
                seconds = self.costs.target(batch * (k + 1)) + self.costs.draft(model_ks)
                if tokens / seconds > best_rate:
                    best_rate, best = tokens / seconds, ks
        self.choices = best if best_rate > plain_rate * self.margin else [0] * batch
        return list(self.choices)

    def sequence_costs(self) -> CostModel:
        """One sequence's relative costs (:class:`verispec.costs.CostModel`) as measured and
        learned so far: ``c_verify[k] = T(k + 1) / T(1)``, ``c_draft`` = one draft step / T(1).

        For a proposer that chooses its own draft source and length per pass under an
        :class:`~verispec.costs.AdaptiveDraftLength` (``HybridDrafter``); the batch's
        draft length stays this policy's choice and caps it.
        """
        one = max(self.costs.target(1), 1e-12)
        c_verify = (1.0, *(self.costs.target(k + 1) / one for k in range(1, self.max_k + 1)))
        return CostModel(
            c_verify=c_verify,
            c_draft=self.costs.draft([1]) / one,
            target_step_seconds=one,
        )

    def observe(
        self, *, rows: int, seconds: float, draft_lengths: Sequence[int], draft_seconds: float
    ) -> None:
        self.costs.learn(
            rows=rows, seconds=seconds, draft_lengths=draft_lengths, draft_seconds=draft_seconds
        )


def _time_pass(model: LanguageModel, batch: int, rows_each: int, context: int) -> float:
    caches = [model.new_cache() for _ in range(batch)]
    try:
        prompt = [(i * 7919 + 10) % min(model.vocab_size, 1000) for i in range(context)]
        for cache in caches:  # one shape for every prompt pass: CPU kernels compile per shape
            batched_forward(model, [cache], [prompt], num_logits=1)
        times = []
        for _ in range(2):  # the first pass of a new shape includes compiling its kernels
            t0 = time.perf_counter()
            batched_forward(model, caches, [prompt[:rows_each]] * batch)
            times.append(time.perf_counter() - t0)
            for cache in caches:
                cache.crop(context)
        return min(times)
    finally:
        for cache in caches:
            release(cache)


def measure_batch_costs(
    target: LanguageModel,
    draft: LanguageModel | None,
    *,
    max_batch: int,
    max_k: int,
    context: int = 64,
) -> BatchCosts:
    """Time target passes laid out as in decoding (b sequences scoring r rows each) for
    the row counts a batch of up to ``max_batch`` sequences produces, and one-row
    draft steps for 1..max_batch sequences."""
    batches = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_batch} | {max_batch})
    layouts: dict[int, tuple[int, int]] = {}
    for rows_each in sorted({1, 2, 3, 5, max_k + 1}):
        for batch in batches:
            if rows_each <= max_k + 1:
                layouts.setdefault(batch * rows_each, (batch, rows_each))
    rows = sorted(layouts)
    target_seconds = _lower_envelope([_time_pass(target, *layouts[r], context) for r in rows])
    draft_seconds: list[float] = []
    if draft is not None:
        draft_seconds = _lower_envelope([_time_pass(draft, b, 1, context) for b in batches])
    return BatchCosts(
        target_rows=rows,
        target_seconds=target_seconds,
        draft_batch=batches if draft is not None else [],
        draft_seconds=draft_seconds,
    )


def _lower_envelope(seconds: list[float]) -> list[float]:
    """Scoring more rows never costs less; other load only ever adds time, so a point
    above a later one was disturbed: lower it."""
    for i in range(len(seconds) - 2, -1, -1):
        seconds[i] = min(seconds[i], seconds[i + 1])
    return seconds
