"""The cost model that decides the draft length.

Glossary (DESIGN.md): alpha = probability a draft token is accepted, k = draft
length, ``c_verify(k)`` = time of a target pass over k + 1 positions divided by
a one-position pass, ``c_draft`` = one drafter step divided by one target step.

    expected tokens per target pass  E(alpha, k) = (1 - alpha^(k+1)) / (1 - alpha)
    speedup over plain decoding      S(alpha, k) = E(alpha, k) / (c_verify(k) + k * c_draft)

:func:`measure_costs` times real forward passes on this machine;
:class:`AdaptiveDraftLength` keeps a running alpha per sequence and picks the k
that maximizes S, or 0 (no speculation) when no k beats plain decoding.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from verispec.lean import EXACT_ROWS_MAX
from verispec.models import LanguageModel

# Part of the cache key of measured costs: bump it when kernels or the forward
# pass change in a way that the model names and kernel descriptions do not show.
COSTS_VERSION = "5"  # 3: interleaved timing; fused int8 projections; 4: medians of 5 rounds;
# 5: k up to MAX_CALIBRATED_K

# The longest draft the cost model measures (and so the adaptive policy allows). On this
# project's 2-core CPU a pass of the fp32 1.5B target over 1 / 17 / 25 / 33 positions
# after 300 cached ones took 210 / 399 / 528 / 626 ms (2026-11-30): past ~8 positions
# each one costs about 1/16 of a step, so a long copied stretch (a code answer restating
# its prompt) verified 33 at a time yields 9.6 tokens per step of cost against 7.8 at 17.
# Targets whose rows must match one-position passes bit for bit (an int8 target's) stop
# where their per-query attention does (verispec.lean.EXACT_ROWS_MAX).
MAX_CALIBRATED_K = 32


@dataclass(frozen=True)
class CostModel:
    """Measured relative costs. ``c_verify[k]`` for k = 0..k_max (``c_verify[0] == 1``)."""

    c_verify: tuple[float, ...]
    c_draft: float
    target_step_seconds: float = 0.0

    @property
    def max_k(self) -> int:
        return len(self.c_verify) - 1

    def speedup(self, alpha: float, k: int) -> float:
        return expected_tokens(alpha, k) / (self.c_verify[k] + k * self.c_draft)

    def best_k(self, alpha: float, *, max_k: int | None = None) -> int:
        """The draft length with the highest predicted speedup; 0 if none beats plain decoding."""
        top = min(self.max_k, max_k if max_k is not None else self.max_k)
        best, best_speedup = 0, 1.0
        for k in range(1, top + 1):
            s = self.speedup(alpha, k)
            if s > best_speedup * 1.02:  # demand a margin: measurement noise must not pick k
                best, best_speedup = k, s
        return best


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens per target pass with draft length k (k + 1 when alpha = 1)."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def _time_passes(
    passes: list[tuple[LanguageModel, int]], context: list[int], repeats: int
) -> list[float]:
    """Median time of each ``(model, new tokens)`` pass on a warm cache, rounds interleaved.

    Every round times each pass once, so load that comes and goes while
    measuring hits all of them alike instead of inflating some of the ratios.
    The median, not the minimum: every cost is divided by the one-token pass's,
    so one outlying reading of that pass would shift every ratio.
    """
    caches = {}
    for model, _ in passes:
        if id(model) not in caches:
            cache = model.new_cache()
            model.forward(cache, context, num_logits=1)
            caches[id(model)] = cache
    base = len(context)
    times: list[list[float]] = [[] for _ in passes]
    for round_ in range(repeats + 1):
        for i, (model, n_new) in enumerate(passes):
            new = [context[j % len(context)] for j in range(n_new)]
            cache = caches[id(model)]
            t0 = time.perf_counter()
            model.forward(cache, new)
            elapsed = time.perf_counter() - t0
            cache.crop(base)
            if round_:  # the first round warms up
                times[i].append(elapsed)
    return [statistics.median(t) for t in times]


def measure_costs(
    target: LanguageModel,
    draft: LanguageModel | None,
    *,
    max_k: int = 16,
    context_length: int = 100,
    repeats: int = 5,
) -> CostModel:
    """Time target passes of 1..max_k+1 positions (and one draft step) on a warm cache."""
    context = [(i * 7919) % target.vocab_size for i in range(context_length)]
    passes = [(target, n) for n in range(1, max_k + 2)]
    if draft is not None:
        passes.append((draft, 1))
    times = _time_passes(passes, context, repeats)
    one = times[0]
    c_verify = [1.0] + [t / one for t in times[1 : max_k + 1]]
    # Enforce monotonicity: scoring more positions never costs less (noise aside).
    for k in range(1, len(c_verify)):
        c_verify[k] = max(c_verify[k], c_verify[k - 1])
    c_draft = times[-1] / one if draft is not None else 0.0
    return CostModel(c_verify=tuple(c_verify), c_draft=c_draft, target_step_seconds=one)


def cached_costs(
    key: str,
    cache_dir: Path,
    target: LanguageModel,
    draft: LanguageModel | None,
    *,
    max_k: int = 16,
) -> CostModel:
    """:func:`measure_costs`, measured once per (machine, models, kernels) key and kept on disk."""
    path = cache_dir / "costs" / f"{key}.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
            return CostModel(
                c_verify=tuple(data["c_verify"]),
                c_draft=float(data["c_draft"]),
                target_step_seconds=float(data.get("target_step_seconds", 0.0)),
            )
        except (ValueError, KeyError, TypeError):
            pass  # a damaged file is measured again
    costs = measure_costs(target, draft, max_k=max_k)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(costs), indent=2))
    return costs


CONFIDENCE_BINS = 10  # draft probabilities are calibrated per tenth of [0, 1]
CONFIDENCE_PRIOR = 4.0  # weight, in observations, of "acceptance = draft probability"


@dataclass
class AdaptiveDraftLength:
    """Per-sequence draft-length policy: running acceptance estimate + cost model.

    alpha is an exponential moving average of per-token acceptance (each
    drafted token counts as one observation), started at a prior. When the
    policy chooses k = 0 it still probes with a short draft every
    ``probe_every`` passes, so that a drafter that starts to work again (a
    copy-heavy stretch of text) is noticed.

    ``c_draft`` starts at the calibrated value and follows what drafting
    really costs in this sequence (:meth:`observe_time`): Python overhead,
    sampling and a busy machine all show up there and not in a calibration.

    With ``follow_confidence`` (set by a draft model that reports how sure it
    is of each token), alpha only decides whether to draft at all; the draft
    then runs up to the longest measured length and stops where
    :meth:`keep_drafting` says one more token no longer pays, judged from the
    draft model's own probabilities of the tokens it drafted. Acceptance
    varies a lot within a text (boilerplate, then a free choice of word), and
    the draft's probability tracks it token by token where a running average
    cannot. A draft model's probabilities are not acceptance rates (a draft that
    is the target is always right, however unsure), so each is mapped to one
    through per-sequence counts of what was accepted in its tenth of [0, 1],
    starting from the probability itself as a prior worth ``CONFIDENCE_PRIOR``
    observations.
    """

    costs: CostModel
    alpha: float = 0.6  # prior before any observation
    decay: float = 0.9  # weight of the past per observed draft token
    probe_every: int = 8
    max_k: int | None = None
    c_draft: float = -1.0  # running estimate; -1 = take the calibrated value
    alpha_free: float = 0.5  # acceptance of free drafts (prompt lookup), tracked apart
    follow_confidence: bool = False  # drafts stop by keep_drafting (choose() gives the cap)
    _passes_without_draft: int = field(default=0, repr=False)
    # Confidence calibration: per tenth of [0, 1], [accepted, observed] draft tokens.
    _by_confidence: list[list[float]] = field(
        default_factory=lambda: [[0.0, 0.0] for _ in range(CONFIDENCE_BINS)], repr=False
    )
    _draft_confidences: list[float] = field(default_factory=list, repr=False)
    _drafted_last_pass: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.c_draft < 0:
            self.c_draft = self.costs.c_draft

    def best_model_k(self) -> int:
        """The draft model's best length now: :meth:`choose` without its probing (and
        without side effects)."""
        return replace(self.costs, c_draft=self.c_draft).best_k(self.alpha, max_k=self.max_k)

    @property
    def cap(self) -> int:
        """The longest draft allowed: the longest measured length, or ``max_k``."""
        return self.costs.max_k if self.max_k is None else min(self.max_k, self.costs.max_k)

    def choose(self) -> int:
        """This pass's draft length (with ``follow_confidence``: its cap, or 0 / 1 to probe)."""
        k = self.best_model_k()
        if k == 0:
            self._passes_without_draft += 1
            if self._passes_without_draft >= self.probe_every:
                self._passes_without_draft = 0
                return 1
        elif self.follow_confidence:
            return self.cap
        return k

    def keep_drafting(self, confidences: Sequence[float]) -> bool:
        """Whether to draft one more token after those whose draft probabilities are
        ``confidences`` (each the draft model's probability of the token it drafted).

        Token i counts as accepted with probability ``a_i = acceptance_at(confidences[i])``
        once the ones before it are, so the draft so far yields ``E = 1 + sum of the
        running products of a_i`` tokens per pass at a cost of ``c_verify(n) + n * c_draft``.
        Tokens not drafted yet are guessed to be accepted with ``g``, the mean of the last
        token's ``a_n`` and the running alpha (the draft model's certainty moves slowly
        within a phrase, but an unsure word is often followed by a sure one). Drafting
        goes on when some longer draft, up to the cap, has a higher ratio E / cost.
        """
        self._draft_confidences = list(confidences)  # for observe()
        n = len(confidences)
        if n == 0:
            return True
        cap = self.cap
        if n >= cap:
            return False
        chain, expected, last = 1.0, 1.0, 0.0
        for confidence in confidences:
            last = self.acceptance_at(confidence)
            chain *= last
            expected += chain
        c_verify, c_draft = self.costs.c_verify, self.c_draft
        now = expected / (c_verify[n] + n * c_draft)
        guess = 0.5 * (last + self.alpha)
        for longer in range(n + 1, cap + 1):
            chain *= guess
            expected += chain
            if expected / (c_verify[longer] + longer * c_draft) > now:
                return True
        return False

    def choose_siblings(
        self, confidences: Sequence[float], alternatives: Sequence[float], room: int
    ) -> list[int]:
        """Which drafted positions get their runner-up token verified too (a sibling).

        ``confidences[i]`` is the draft model's probability of the token it drafted at
        position i, ``alternatives[i]`` that of its runner-up there. A sibling at i
        adds a token when the draft is accepted up to i, rejected at i, and the
        target's token is the runner-up: estimated as ``reach_i * (1 - a_i) * q2_i /
        (1 - q1_i)`` (the draft's share of the runner-up among the tokens it did not
        pick). It costs the extra row's verification, ``c_verify(n + s + 1) -
        c_verify(n + s)``. Siblings are taken, likeliest first, while each raises the
        pass's expected tokens per cost; at most ``room`` of them and never past the
        longest measured length. A row is charged at least :data:`ROW_COST_FLOOR`, so
        where verification costs the same for a few more positions, a sibling must
        still have some chance of paying.
        """
        n = len(confidences)
        if n == 0 or room <= 0:
            return []
        c_verify, c_draft = self.costs.c_verify, self.c_draft
        reach, expected = 1.0, 1.0
        scored: list[tuple[float, int]] = []
        for i, (q1, q2) in enumerate(zip(confidences, alternatives, strict=True)):
            a = self.acceptance_at(q1)
            share = min(1.0, q2 / (1.0 - q1)) if q1 < 1.0 else 0.0
            scored.append((reach * (1.0 - a) * share, i))
            reach *= a
            expected += reach
        scored.sort(reverse=True)
        chosen: list[int] = []
        cost = c_verify[n] + n * c_draft
        for gain, i in scored:
            width = n + len(chosen) + 1
            if len(chosen) >= room or width > self.costs.max_k or gain <= 0:
                break
            extra = max(c_verify[width] - c_verify[width - 1], ROW_COST_FLOOR)
            if (expected + gain) / (cost + extra) <= expected / cost:
                break
            chosen.append(i)
            expected += gain
            cost += extra
        return sorted(chosen)

    def acceptance_at(self, confidence: float) -> float:
        """Estimated acceptance of a draft token the draft model gave ``confidence``."""
        accepted, observed = self._by_confidence[_confidence_bin(confidence)]
        return (accepted + CONFIDENCE_PRIOR * confidence) / (observed + CONFIDENCE_PRIOR)

    def model_speedup(self, k: int) -> float:
        """Predicted speedup of drafting k tokens with the draft model (1.0 for k = 0)."""
        if k <= 0:
            return 1.0
        k = min(k, self.costs.max_k)
        return expected_tokens(self.alpha, k) / (self.costs.c_verify[k] + k * self.c_draft)

    def choose_free(self, available: int) -> tuple[int, float]:
        """Best length (<= ``available``) of a draft that costs nothing, and its predicted
        speedup; (0, 1.0) when none beats plain decoding."""
        best, best_speedup = 0, 1.0
        for k in range(1, min(available, self.costs.max_k) + 1):
            s = expected_tokens(self.alpha_free, k) / self.costs.c_verify[k]
            if s > best_speedup * 1.02:
                best, best_speedup = k, s
        return best, best_speedup

    def observe(self, drafted: int, accepted: int, *, free: bool = False) -> None:
        """Update alpha from one verification: ``accepted`` of ``drafted`` kept.

        Positions after the first rejection were never tested, so only the
        accepted ones and the first rejected one count as observations. Free
        drafts (prompt lookup) update ``alpha_free`` instead of ``alpha``.
        """
        observed = min(drafted, accepted + 1)
        confidences, self._draft_confidences = self._draft_confidences, []
        if free or len(confidences) != drafted:
            confidences = []  # not this draft's (a lookup draft, or a drafter without them)
        for i in range(observed):
            hit = 1.0 if i < accepted else 0.0
            if free:
                self.alpha_free = self.decay * self.alpha_free + (1 - self.decay) * hit
            else:
                self.alpha = self.decay * self.alpha + (1 - self.decay) * hit
            if confidences:
                counts = self._by_confidence[_confidence_bin(confidences[i])]
                counts[0] += hit
                counts[1] += 1.0

    def observe_time(self, drafted: int, draft_seconds: float, verify_seconds: float) -> None:
        """Update c_draft from one pass's real draft and verification times.

        The target's one-token step is inferred as ``verify_seconds / c_verify(k)``.
        A pass right after one without drafting is skipped: its draft time includes
        feeding the draft model the tokens it missed (the prompt, on the first pass).
        """
        drafted_before, self._drafted_last_pass = self._drafted_last_pass, drafted > 0
        if drafted <= 0 or verify_seconds <= 0 or not drafted_before:
            return
        step = verify_seconds / self.costs.c_verify[min(drafted, self.costs.max_k)]
        observed = draft_seconds / (drafted * step)
        self.c_draft = 0.7 * self.c_draft + 0.3 * observed


# The least a sibling's extra verification row is charged, in target steps. The
# calibration (passes timed back to back) finds 2-6 rows equally costly, but inside the
# decode loop (the draft model running between passes) a pass of the 1.5B target took
# 217-221 ms for 2-4 rows and 229-237 ms for 5-6 (2026-11-30, MT-bench turns): rows are
# not quite free there, so a sibling must be worth at least this much of a step.
ROW_COST_FLOOR = 0.02


def _confidence_bin(confidence: float) -> int:
    return min(CONFIDENCE_BINS - 1, max(0, int(confidence * CONFIDENCE_BINS)))


def costs_for(
    target: LanguageModel, draft: LanguageModel | None, *, cache_dir: Path | None = None
) -> CostModel:
    """The cost model of this target/draft pair on this machine, measured once and cached.

    The key covers the models, their kernels, the thread count and torch's
    version, so a change of any of them measures again.
    """
    import hashlib
    import os
    import platform

    import torch

    from verispec.presets import default_cache_dir

    parts = [
        COSTS_VERSION,
        target.name,
        getattr(target, "runner", ""),
        getattr(target, "kernels", ""),
        draft.name if draft is not None else "-",
        getattr(draft, "kernels", "") if draft is not None else "",
        getattr(draft, "runner", "") if draft is not None else "",
        str(getattr(draft, "vocab_limit", None)),
        str(torch.get_num_threads()),
        torch.__version__,
        platform.processor() or platform.machine(),
        str(os.cpu_count()),
        str(getattr(target, "device", "cpu")),
    ]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return cached_costs(
        key, cache_dir or default_cache_dir(), target, draft, max_k=calibrated_length(target)
    )


def calibrated_length(target: LanguageModel) -> int:
    """The longest draft :func:`costs_for` measures for ``target``: :data:`MAX_CALIBRATED_K`,
    or less where longer passes would not score each position exactly as alone."""
    lean = getattr(target, "lean", None)
    if lean is not None and getattr(lean, "exact_rows", False):
        return min(MAX_CALIBRATED_K, EXACT_ROWS_MAX - 1)
    return MAX_CALIBRATED_K
