"""How much to draft: the adaptive policy, in small parts that each do one thing.

Glossary (DESIGN.md): alpha = probability a draft token is accepted, k = draft
length, ``c_verify(k)`` and ``c_draft`` are relative costs (:mod:`verispec.policy.costs`).

* :class:`AcceptanceRate`: a running alpha (one per draft source).
* :class:`ConfidenceCalibration`: maps a draft model's probability of a token to
  the chance the target accepts it.
* :class:`DraftCost`: the running cost of one draft step, following what drafting
  really costs in this sequence.
* :func:`choose_length`, :func:`keep_drafting`, :func:`choose_siblings`,
  :func:`choose_free`: the decisions, as functions of those estimates.
* :class:`DraftPolicy`: one sequence's estimates and the decisions over them, the
  object drafters and the engine talk to.
* :func:`plan_batch`: caps the draft lengths of a batch whose sequences share one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from verispec.policy.costs import CostModel, expected_tokens

CONFIDENCE_BINS = 10  # draft probabilities are calibrated per tenth of [0, 1]
CONFIDENCE_PRIOR = 4.0  # weight, in observations, of "acceptance = draft probability"
# The least a sibling's extra verification row is charged, in target steps: inside the
# decode loop (the draft model running between passes) rows are not quite as free as a
# back-to-back calibration finds them, so a sibling must be worth at least this much.
ROW_COST_FLOOR = 0.02
MARGIN = 1.02  # a longer draft must promise this much more: noise must not pick k


@dataclass
class AcceptanceRate:
    """Running acceptance of one draft source: an exponential moving average over
    draft tokens, started at a prior. Positions after the first rejection were never
    tested, so only the accepted ones and the first rejected one count."""

    alpha: float = 0.6
    decay: float = 0.9  # weight of the past per observed draft token

    def observe(self, drafted: int, accepted: int) -> None:
        for i in range(min(drafted, accepted + 1)):
            hit = 1.0 if i < accepted else 0.0
            self.alpha = self.decay * self.alpha + (1 - self.decay) * hit


@dataclass
class ConfidenceCalibration:
    """Acceptance per tenth of the draft model's probability of the token it drafted.

    A draft model's probabilities are not acceptance rates (a draft that is the
    target is always right, however unsure), so each tenth counts what was
    accepted, starting from the probability itself as a prior worth
    ``CONFIDENCE_PRIOR`` observations."""

    counts: list[list[float]] = field(
        default_factory=lambda: [[0.0, 0.0] for _ in range(CONFIDENCE_BINS)]
    )  # per tenth: [accepted, observed]

    def acceptance_at(self, confidence: float) -> float:
        accepted, observed = self.counts[_confidence_bin(confidence)]
        return (accepted + CONFIDENCE_PRIOR * confidence) / (observed + CONFIDENCE_PRIOR)

    def observe(self, confidences: Sequence[float], accepted: int) -> None:
        """One verified draft whose tokens had ``confidences``; ``accepted`` were kept."""
        for i in range(min(len(confidences), accepted + 1)):
            counts = self.counts[_confidence_bin(confidences[i])]
            counts[0] += 1.0 if i < accepted else 0.0
            counts[1] += 1.0


@dataclass
class DraftCost:
    """The running cost of one draft step relative to one target step.

    Starts at the calibrated value; each pass's real draft and verification times
    move it (the target's step inferred as ``verify_seconds / c_verify(k)``). A pass
    right after one without drafting is skipped: its draft time includes feeding the
    draft model the tokens it missed (the prompt, on the first pass)."""

    c_draft: float
    drafted_last_pass: bool = False

    def observe(
        self, costs: CostModel, drafted: int, draft_seconds: float, verify_seconds: float
    ) -> None:
        drafted_before, self.drafted_last_pass = self.drafted_last_pass, drafted > 0
        if drafted <= 0 or verify_seconds <= 0 or not drafted_before:
            return
        step = verify_seconds / costs.c_verify[min(drafted, costs.max_k)]
        observed = draft_seconds / (drafted * step)
        self.c_draft = 0.7 * self.c_draft + 0.3 * observed


def choose_length(costs: CostModel, alpha: float, c_draft: float, cap: int) -> int:
    """The draft length (<= cap) with the highest predicted speedup
    ``E(alpha, k) / (c_verify(k) + k * c_draft)``; 0 when none beats plain decoding."""
    best, best_speedup = 0, 1.0
    for k in range(1, min(cap, costs.max_k) + 1):
        s = expected_tokens(alpha, k) / (costs.c_verify[k] + k * c_draft)
        if s > best_speedup * MARGIN:
            best, best_speedup = k, s
    return best


def keep_drafting(
    costs: CostModel,
    c_draft: float,
    acceptances: Sequence[float],
    alpha: float,
    cap: int,
) -> bool:
    """Whether to draft one more token after tokens whose estimated acceptances are
    ``acceptances`` (:meth:`ConfidenceCalibration.acceptance_at` of each).

    Token i is accepted with probability ``a_i`` once the ones before it are, so the
    draft so far yields ``E = 1 + sum of the running products of a_i`` tokens per pass
    at a cost of ``c_verify(n) + n * c_draft``. Tokens not drafted yet are guessed to
    be accepted with ``g``, the mean of the last token's ``a_n`` and the running alpha
    (the draft model's certainty moves slowly within a phrase, but an unsure word is
    often followed by a sure one). Drafting goes on when some longer draft, up to the
    cap, has a higher ratio E / cost.
    """
    n = len(acceptances)
    if n == 0:
        return True
    if n >= cap:
        return False
    chain, expected, last = 1.0, 1.0, 0.0
    for a in acceptances:
        last = a
        chain *= a
        expected += chain
    now = expected / (costs.c_verify[n] + n * c_draft)
    guess = 0.5 * (last + alpha)
    for longer in range(n + 1, cap + 1):
        chain *= guess
        expected += chain
        if expected / (costs.c_verify[longer] + longer * c_draft) > now:
            return True
    return False


def choose_siblings(
    costs: CostModel,
    c_draft: float,
    acceptances: Sequence[float],
    confidences: Sequence[float],
    alternatives: Sequence[float],
    room: int,
) -> list[int]:
    """Which drafted positions get their runner-up token verified too (a sibling).

    ``confidences[i]`` is the draft model's probability of the token it drafted at
    position i (``acceptances[i]`` its estimated acceptance), ``alternatives[i]`` that
    of its runner-up there. A sibling at i adds a token when the draft is accepted up
    to i, rejected at i, and the target's token is the runner-up: estimated as
    ``reach_i * (1 - a_i) * q2_i / (1 - q1_i)``. It costs the extra row's verification,
    ``c_verify(n + s + 1) - c_verify(n + s)`` (at least :data:`ROW_COST_FLOOR`).
    Siblings are taken, likeliest first, while each raises the pass's expected tokens
    per cost; at most ``room`` of them and never past the longest measured length.
    """
    n = len(confidences)
    if n == 0 or room <= 0:
        return []
    c_verify = costs.c_verify
    reach, expected = 1.0, 1.0
    scored: list[tuple[float, int]] = []
    for i, (a, q1, q2) in enumerate(zip(acceptances, confidences, alternatives, strict=True)):
        share = min(1.0, q2 / (1.0 - q1)) if q1 < 1.0 else 0.0
        scored.append((reach * (1.0 - a) * share, i))
        reach *= a
        expected += reach
    scored.sort(reverse=True)
    chosen: list[int] = []
    cost = c_verify[n] + n * c_draft
    for gain, i in scored:
        width = n + len(chosen) + 1
        if len(chosen) >= room or width > costs.max_k or gain <= 0:
            break
        extra = max(c_verify[width] - c_verify[width - 1], ROW_COST_FLOOR)
        if (expected + gain) / (cost + extra) <= expected / cost:
            break
        chosen.append(i)
        expected += gain
        cost += extra
    return sorted(chosen)


def choose_free(costs: CostModel, alpha: float, available: int) -> tuple[int, float]:
    """Best length (<= ``available``) of a draft that costs nothing (a prompt lookup),
    and its predicted speedup; (0, 1.0) when none beats plain decoding."""
    best, best_speedup = 0, 1.0
    for k in range(1, min(available, costs.max_k) + 1):
        s = expected_tokens(alpha, k) / costs.c_verify[k]
        if s > best_speedup * MARGIN:
            best, best_speedup = k, s
    return best, best_speedup


@dataclass
class DraftPolicy:
    """One sequence's draft policy: its estimates and the decisions made from them.

    ``choose()`` gives this pass's draft length; when it is 0 the policy still
    probes with a one-token draft every ``probe_every`` passes, so that a drafter
    that starts to work again (a copy-heavy stretch) is noticed. A draft model
    that reports its confidence per token drafts up to :attr:`cap` and stops where
    :meth:`keep_drafting` says one more token no longer pays (``choose()`` then
    gives the cap once drafting pays at all): acceptance varies a lot within a
    text, and the draft's probability tracks it token by token where a running
    average cannot.
    """

    costs: CostModel
    max_k: int | None = None
    probe_every: int = 8
    model: AcceptanceRate = field(default_factory=AcceptanceRate)  # draft-model drafts
    free: AcceptanceRate = field(default_factory=lambda: AcceptanceRate(alpha=0.5))  # lookups
    calibration: ConfidenceCalibration = field(default_factory=ConfidenceCalibration)
    draft_cost: DraftCost = field(default_factory=lambda: DraftCost(-1.0))
    follow_confidence: bool = False  # set when a drafter stops its drafts by confidence
    _passes_without_draft: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.draft_cost.c_draft < 0:
            self.draft_cost.c_draft = self.costs.c_draft

    @property
    def alpha(self) -> float:
        return self.model.alpha

    @property
    def c_draft(self) -> float:
        return self.draft_cost.c_draft

    @property
    def cap(self) -> int:
        """The longest draft allowed: the longest measured length, or ``max_k``."""
        return self.costs.max_k if self.max_k is None else min(self.max_k, self.costs.max_k)

    def best_model_k(self) -> int:
        """The draft model's best length now (:meth:`choose` without probing)."""
        return choose_length(self.costs, self.alpha, self.c_draft, self.cap)

    def choose(self) -> int:
        """This pass's draft length (following confidence: the cap, or 0 / 1 to probe)."""
        k = self.best_model_k()
        if k == 0:
            self._passes_without_draft += 1
            if self._passes_without_draft >= self.probe_every:
                self._passes_without_draft = 0
                return 1
        elif self.follow_confidence:
            return self.cap
        return k

    def acceptance_at(self, confidence: float) -> float:
        return self.calibration.acceptance_at(confidence)

    def keep_drafting(self, confidences: Sequence[float]) -> bool:
        """Whether to draft one more token after those the draft model gave ``confidences``."""
        acceptances = [self.acceptance_at(c) for c in confidences]
        return keep_drafting(self.costs, self.c_draft, acceptances, self.alpha, self.cap)

    def choose_siblings(
        self, confidences: Sequence[float], alternatives: Sequence[float], room: int
    ) -> list[int]:
        acceptances = [self.acceptance_at(c) for c in confidences]
        return choose_siblings(
            self.costs, self.c_draft, acceptances, confidences, alternatives, room
        )

    def model_speedup(self, k: int) -> float:
        """Predicted speedup of drafting k tokens with the draft model (1.0 for k = 0)."""
        if k <= 0:
            return 1.0
        k = min(k, self.costs.max_k)
        return expected_tokens(self.alpha, k) / (self.costs.c_verify[k] + k * self.c_draft)

    def choose_free(self, available: int) -> tuple[int, float]:
        return choose_free(self.costs, self.free.alpha, available)

    def observe(
        self,
        drafted: int,
        accepted: int,
        *,
        free: bool = False,
        confidences: Sequence[float] = (),
    ) -> None:
        """One verification: ``accepted`` of ``drafted`` kept. ``confidences``: the draft
        model's probability of each drafted token, when it reported them."""
        if free:
            self.free.observe(drafted, accepted)
            return
        self.model.observe(drafted, accepted)
        if len(confidences) == drafted:
            self.calibration.observe(confidences, accepted)

    def observe_time(self, drafted: int, draft_seconds: float, verify_seconds: float) -> None:
        self.draft_cost.observe(self.costs, drafted, draft_seconds, verify_seconds)


def plan_batch(costs: CostModel, policies: Sequence[DraftPolicy], ks: Sequence[int]) -> int:
    """The longest draft any sequence of a batch may verify this pass.

    A batch's sequences share one target pass whose cost grows with the rows of
    all of them: ``c_verify`` read at the total number of rows, beyond the measured
    range extended along its last slope. Each sequence's own choice ``ks[i]`` assumed
    a pass of its own; this caps all of them at the K that maximizes the batch's
    expected tokens per cost (draft steps run in lock-step, so they cost the longest
    draft's steps once). A batch of one keeps its own choice.
    """
    longest = max(ks, default=0)
    if len(ks) <= 1 or longest == 0:
        return longest
    c_draft = max((p.c_draft for p in policies), default=costs.c_draft)

    def rate(cap: int) -> float:
        lengths = [min(k, cap) for k in ks]
        tokens = sum(expected_tokens(p.alpha, k) for p, k in zip(policies, lengths, strict=True))
        rows = sum(k + 1 for k in lengths)
        return tokens / (pass_cost(costs, rows) + max(lengths) * c_draft)

    best, best_rate = 0, rate(0) * MARGIN
    for cap in sorted(set(ks) | {1, 2, 4, 8, 16}):
        if 0 < cap <= longest and rate(cap) > best_rate:
            best, best_rate = cap, rate(cap)
    return best


def pass_cost(costs: CostModel, rows: int) -> float:
    """Cost of one target pass over ``rows`` positions, in one-position passes."""
    c = costs.c_verify
    if rows - 1 <= costs.max_k:
        return c[max(rows - 1, 0)]
    slope = (c[-1] - c[-2]) if len(c) > 1 else 1.0
    return c[-1] + max(slope, 0.0) * (rows - 1 - costs.max_k)


def _confidence_bin(confidence: float) -> int:
    return min(CONFIDENCE_BINS - 1, max(0, int(confidence * CONFIDENCE_BINS)))
