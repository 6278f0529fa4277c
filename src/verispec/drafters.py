"""Drafters: cheap proposers of the next few tokens, behind one declared protocol.

A :class:`Drafter` is shared by many sequences (it holds weights or settings);
``start()`` gives a :class:`Proposer` that owns one sequence's drafting state
(e.g. the draft model's KV cache). Each target pass, the engine hands every
sequence's proposer a :class:`DraftRequest` (the verified context, the most
tokens to propose, the sampling parameters, and under ``-k auto`` the
sequence's :class:`~verispec.policy.DraftPolicy`) and gets a :class:`Draft`
back: the tokens and, when they were sampled, the distributions they were
sampled from. Deterministic drafters (prompt lookup, or any drafter under
greedy decoding) return ``probs=None``; verification treats them as one-hot.

The engine asks a drafter for all of its sequences at once
(:meth:`Drafter.propose_batch`), so a draft model runs one batched pass per
draft step for the whole batch; the default asks each proposer on its own.
Every capability beyond ``propose`` has a default here, so the engine calls
methods and never looks a hook up by name:

========================  ===============================================  ==========
capability                what it means                                    default
========================  ===============================================  ==========
``propose(request)``      up to ``request.k`` tokens after the context     (required)
``propose_batch``         drafts for many proposers of this drafter        one by one
``chooses_length``        asks ``request.policy`` for its own length;      False
                          ``request.k`` is then only a cap
``stops_by_confidence``   stops each draft where the policy's              False
                          ``keep_drafting`` says one more token won't pay
``cached_state()``        its cache, for a prefix cache to keep            None
``adopt_cache(state)``    start from a finished sequence's cache           ignored
``draft_model``           the model whose step the cost model times        None
========================  ===============================================  ==========

Proposers need no notification of what was accepted: each request carries the
full verified context and a proposer reconciles its own state with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from verispec.errors import InvalidArgumentError
from verispec.models import LanguageModel, check_tokenizers_compatible
from verispec.policy import DraftPolicy
from verispec.prefix import CachedState, common_prefix_length
from verispec.sampling import SamplingParams, sample, warp


@dataclass(frozen=True)
class Draft:
    tokens: list[int]  # [k'] with k' <= k (k' may be 0: nothing to propose)
    probs: torch.Tensor | None = None  # [k', vocab] sampling distributions of the tokens, or None
    free: bool = False  # True when proposing cost (next to) nothing, e.g. a prompt lookup
    # (i, s): token s is verified as an alternative to tokens[i] in the same pass (a token
    # tree, greedy decoding only; see verispec.verify)
    siblings: tuple[tuple[int, int], ...] = ()
    # How many of ``tokens`` the draft model read off one pass over a prompt-lookup hint
    # instead of a step each (see HybridDrafter): their cost says nothing of a step's.
    hinted: int = 0
    # The draft model's probability of each token, when a policy asked for them (the
    # policy calibrates its acceptance estimate per confidence from these).
    confidences: tuple[float, ...] = ()


@dataclass(frozen=True)
class DraftRequest:
    """What one sequence asks of its proposer for one target pass."""

    context: Sequence[int]  # the verified tokens: prompt + generated so far
    k: int  # the most tokens to propose (never past max tokens or the context window)
    params: SamplingParams
    generator: torch.Generator  # the sequence's own, for sampled drafts
    policy: DraftPolicy | None = None  # the sequence's adaptive policy under -k auto
    tree_room: int = 0  # sibling rows the target may verify beside the draft (0: chains)
    hint: Sequence[int] = ()  # a guess at the next tokens (a prompt lookup's), for a draft model


NO_DRAFT = Draft(tokens=[])


class Proposer:
    """One sequence's drafting state. Subclasses implement :meth:`propose`."""

    chooses_length = False  # True: asks request.policy for its own length (k is a cap)
    stops_by_confidence = False  # True: stops drafts by the policy's keep_drafting

    def propose(self, request: DraftRequest) -> Draft:
        """Up to ``request.k`` tokens to follow ``request.context``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement propose()")

    def cached_state(self) -> CachedState | None:
        """This sequence's cache and the ids behind it, for a prefix cache to keep."""
        return None

    def adopt_cache(self, state: CachedState) -> None:
        """Start from a finished sequence's cache (kept by a prefix cache)."""
        del state


P = TypeVar("P", bound=Proposer)


class Drafter(Generic[P]):
    """Shared by the sequences it drafts for; ``start()`` gives one sequence its proposer."""

    name: str = "drafter"
    draft_model: LanguageModel | None = None  # the model whose step the cost model times

    def start(self) -> P:
        raise NotImplementedError(f"{type(self).__name__} does not implement start()")

    def propose_batch(
        self, proposers: Sequence[P], requests: Sequence[DraftRequest]
    ) -> list[Draft]:
        """Drafts for several sequences of this drafter (one request each)."""
        return [p.propose(r) for p, r in zip(proposers, requests, strict=True)]


class StatelessDrafter(Proposer, Drafter[Proposer]):
    """A drafter that keeps no per-sequence state is its own proposer: subclass this and
    implement :meth:`Proposer.propose` (see the README's phrase drafter)."""

    def start(self) -> Proposer:
        return self


# Hinted drafting (DraftRequest.hint): a hint is fed while this running share of hint
# tokens agreeing with the draft model's own is at least HINT_MIN_AGREEMENT, and only when
# it is HINT_MIN_TOKENS long or more. With a share a of agreeing hint tokens, m hint tokens
# save a + a^2 + ... + a^m draft steps for one pass over 1 + m rows, which costs a few
# steps (the measured costs say how many on a machine); at a = 0.75 and m = 16 that is
# 3 steps, about what the wider pass costs more.
HINT_MIN_AGREEMENT = 0.75
HINT_MIN_TOKENS = 2
HINT_PRIOR = 0.5  # before any observation: not trusted until a hint has agreed
HINT_DECAY = 0.8  # weight of the past per observed hint token


def sample_preferring(probs: torch.Tensor, guess: int, generator: torch.Generator) -> int:
    """One sample from ``probs`` (normalised, [vocab]) that is ``guess`` as often as
    possible: ``guess`` when a uniform draw falls below ``probs[guess]``, else a sample from
    ``probs`` without it, renormalised. P(guess) = probs[guess] and, for any other token y,
    (1 - probs[guess]) * probs[y] / (1 - probs[guess]) = probs[y]: exactly ``probs``."""
    p_guess = float(probs[guess])
    if float(torch.rand(1, generator=generator, dtype=torch.float64)) < p_guess:
        return guess
    rest = probs.clone()
    rest[guess] = 0.0
    if float(rest.sum()) <= 0.0:  # rounding: all the mass was on the guess
        return guess
    return sample(rest, generator)


class DraftModelProposer(Proposer):
    """One sequence's draft cache and the token ids it holds.

    Off-by-one cases: after a partial accept the cache holds draft tokens the
    target rejected, and is cropped back to the verified prefix; after a full
    accept of k tokens it holds ``d_1 .. d_{k-1}`` only (``d_k`` was never fed),
    so it is one token behind and the next request feeds ``d_k`` and the bonus
    token together.
    """

    stops_by_confidence = True

    def __init__(self, model: LanguageModel, target_vocab_size: int) -> None:
        self.model = model
        self.vocab_size = target_vocab_size
        self.cache = model.new_cache()
        self.cached: list[int] = []  # the token ids behind self.cache, in order
        # Running share of prompt-lookup hint tokens this draft model agrees with
        # (see DraftModelDrafter); hints are fed only while it is high.
        self.hint_agreement = HINT_PRIOR

    def propose(self, request: DraftRequest) -> Draft:
        return _draft_in_lockstep(self.model, [self], [request])[0]

    def cached_state(self) -> CachedState:
        return CachedState(self.model, list(self.cached), self.cache)

    def adopt_cache(self, state: CachedState) -> None:
        """Start from a finished sequence's draft cache (the next request keeps the part
        its context agrees with); ignored if another model filled it."""
        if state.model is not self.model or state.cache.length != len(state.tokens):
            return
        self.cache = state.cache
        self.cached = list(state.tokens)

    def align(self, logits: torch.Tensor) -> torch.Tensor:  # [vocab_draft] -> [vocab_target]
        width = logits.shape[-1]
        if width == self.vocab_size:
            return logits
        if width > self.vocab_size:
            return logits[: self.vocab_size]
        pad = torch.full((self.vocab_size - width,), float("-inf"), dtype=logits.dtype)
        return torch.cat([logits, pad])

    def observe_hint(self, hint: Sequence[int], tokens: Sequence[int]) -> None:
        """Update ``hint_agreement`` from how far ``hint`` matched the drafted ``tokens``:
        each matching token counts as agreement, the first mismatch as disagreement, and
        positions past it (or past the draft) are not observed. Whether the hint was fed
        or not, this compares it with the model's own tokens, so hints that stopped
        being fed are still watched and resume when they agree again."""
        for guess, token in zip(hint, tokens, strict=False):
            hit = 1.0 if guess == token else 0.0
            self.hint_agreement = HINT_DECAY * self.hint_agreement + (1 - HINT_DECAY) * hit
            if not hit:
                break


class DraftModelDrafter(Drafter[DraftModelProposer]):
    """A smaller model of the same family drafts autoregressively.

    Its tokenizer must equal the target's (checked here, at construction). The
    drafts of all sequences asked together run in lock-step: one batched pass of
    the draft model per draft step (:func:`_draft_in_lockstep`).
    """

    def __init__(self, model: LanguageModel, *, target: LanguageModel) -> None:
        check_tokenizers_compatible(target.tokenizer, model.tokenizer)
        self.model = model
        self.draft_model = model
        self.target_vocab_size = target.vocab_size
        self.name = f"draft model {model.name}"

    def start(self) -> DraftModelProposer:
        return DraftModelProposer(self.model, self.target_vocab_size)

    def propose_batch(
        self, proposers: Sequence[DraftModelProposer], requests: Sequence[DraftRequest]
    ) -> list[Draft]:
        return _draft_in_lockstep(self.model, proposers, requests)


@dataclass(eq=False)
class _DraftRun:
    """One sequence's draft in progress (the steps of :func:`_draft_in_lockstep`).

    ``hint`` is a guess at the model's next tokens, e.g. a prompt lookup's continuation.
    While the sequence's hints have mostly agreed with what the model drafted, the hint
    is fed along with the catch-up tokens in one pass: the model's token after each hint
    token is read off that pass for as long as the hint agrees with it, and drafting
    goes on step by step from the first disagreement. The drafted tokens are the model's
    own either way (up to float rounding between the two kinds of pass): under greedy
    decoding its argmax; under sampling a hint token is kept as often as the model's
    probability of it (:func:`sample_preferring`), so each drafted token is still a
    sample from the distribution reported in ``Draft.probs``.
    """

    proposer: DraftModelProposer
    request: DraftRequest
    feed: list[int] = field(default_factory=list)  # tokens to feed in the next pass
    fed_hint: list[int] = field(default_factory=list)
    base: int = 0  # the cache's length before the first hint token
    on_hint: bool = False  # the cache holds fed_hint after the context
    rows: torch.Tensor | None = None  # [m + 1, vocab_draft]: the first pass's rows
    logits: torch.Tensor | None = None  # [vocab_draft]: the row the next token comes from
    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)  # the draft's p of each token
    runners_up: list[tuple[int, float]] = field(default_factory=list)  # (token, p) each
    hinted: int = 0

    def __post_init__(self) -> None:
        # 1. Keep the cached prefix that the verified context still agrees with;
        #    at least the last context token is fed again to get fresh logits.
        p, context = self.proposer, self.request.context
        keep = min(common_prefix_length(p.cached, context), len(context) - 1)
        p.cache.crop(keep)
        del p.cached[keep:]
        # 2. Catch up (usually one token, two after a fully accepted draft), and with a
        #    trusted hint, feed its tokens too: row i + 1 then follows hint[:i + 1].
        hint = list(self.request.hint[: self.request.k - 1])
        fed = hint if p.hint_agreement >= HINT_MIN_AGREEMENT else []
        self.fed_hint = fed if len(fed) >= HINT_MIN_TOKENS else []
        self.feed = [*context[keep:], *self.fed_hint]
        self.base = len(context)
        self.on_hint = bool(self.fed_hint)

    @property
    def siblings(self) -> bool:
        r = self.request
        return r.tree_room > 0 and r.params.greedy and r.policy is not None

    def begin(self, rows: torch.Tensor) -> None:  # [len(fed_hint) + 1, vocab_draft]
        self.proposer.cached.extend(self.feed)
        self.rows, self.logits = rows, rows[0]

    def advance(self) -> list[int] | None:
        """3. Draft from the logits at hand until the next token needs a pass of the
        model: returns what to feed it, or None when the draft is done."""
        request, policy = self.request, self.request.policy
        p = self.proposer
        while True:
            assert self.logits is not None and self.rows is not None
            i = len(self.tokens)
            row = p.align(self.logits)  # [vocab]
            if self.siblings:
                best = row.topk(2)
                token = int(best.indices[0])
                top = torch.exp(best.values - torch.logsumexp(row, -1)).tolist()
                self.confidences.append(top[0])
                self.runners_up.append((int(best.indices[1]), top[1]))
            elif request.params.greedy:
                token = int(row.argmax().item())
                if policy is not None:
                    self.confidences.append(float(torch.exp(row[token] - torch.logsumexp(row, -1))))
            else:
                p_draft = warp(row[None], request.params)[0]  # [vocab]
                if self.on_hint and i < len(self.fed_hint):
                    token = sample_preferring(p_draft, self.fed_hint[i], request.generator)
                else:
                    token = sample(p_draft, request.generator)
                self.probs.append(p_draft)
                self.confidences.append(float(p_draft[token]))
            self.tokens.append(token)
            if self.on_hint:
                self.hinted += 1
            if policy is not None and not policy.keep_drafting(self.confidences):
                return None
            if i + 1 >= request.k:
                return None
            if self.on_hint and i < len(self.fed_hint) and token == self.fed_hint[i]:
                self.logits = self.rows[i + 1]  # already scored: the cache holds this token
                continue
            if self.on_hint:  # leave the hint: drop its rows from this token on
                p.cache.crop(self.base + i)
                del p.cached[self.base + i :]
                self.on_hint = False
            return [token]

    def fed(self, feed: list[int], logits: torch.Tensor) -> None:  # logits [vocab_draft]
        self.proposer.cached.extend(feed)
        self.logits = logits

    def finish(self) -> Draft:
        p, request = self.proposer, self.request
        if self.on_hint:  # keep the cache one token behind the draft, as step by step
            p.cache.crop(self.base + len(self.tokens) - 1)
            del p.cached[self.base + len(self.tokens) - 1 :]
        if request.hint:
            p.observe_hint(request.hint[: request.k - 1], self.tokens)
        chosen: tuple[tuple[int, int], ...] = ()
        if self.siblings and request.policy is not None:
            room = max(0, request.tree_room - len(self.tokens))
            alternatives = [q for _, q in self.runners_up]
            picks = request.policy.choose_siblings(self.confidences, alternatives, room)
            chosen = tuple((i, self.runners_up[i][0]) for i in picks)
        return Draft(
            tokens=self.tokens,
            probs=torch.stack(self.probs) if self.probs else None,
            siblings=chosen,
            hinted=self.hinted,
            confidences=tuple(self.confidences) if request.policy is not None else (),
        )


def _draft_in_lockstep(
    model: LanguageModel,
    proposers: Sequence[DraftModelProposer],
    requests: Sequence[DraftRequest],
) -> list[Draft]:
    """Draft for every (proposer, request) with ``model``: the catch-up pass of all
    sequences together, then one batched pass per draft step over the sequences still
    drafting (a sequence reading its tokens off a hint's rows needs none). A batch of
    one is exactly the single sequence's step-by-step draft."""
    drafts = [NO_DRAFT] * len(requests)
    runs = [
        (i, _DraftRun(p, r))
        for i, (p, r) in enumerate(zip(proposers, requests, strict=True))
        if r.k > 0
    ]
    if not runs:
        return drafts
    first = model.forward_batch(
        [run.proposer.cache for _, run in runs],
        [run.feed for _, run in runs],
        num_logits=[len(run.fed_hint) + 1 for _, run in runs],
    )
    for (_, run), hint_rows in zip(runs, first, strict=True):
        run.begin(hint_rows)
    active = [run for _, run in runs]
    while active:
        feeding = [(run, feed) for run in active if (feed := run.advance()) is not None]
        if not feeding:
            break
        rows = model.forward_batch(
            [run.proposer.cache for run, _ in feeding],
            [feed for _, feed in feeding],
            num_logits=[1] * len(feeding),
        )
        for (run, feed), logits in zip(feeding, rows, strict=True):
            run.fed(feed, logits[-1])
        active = [run for run, _ in feeding]
    for i, run in runs:
        drafts[i] = run.finish()
    return drafts


class PromptLookupDrafter(StatelessDrafter):
    """Propose the continuation of the latest earlier occurrence of the context's tail.

    Tries n-grams from ``max_ngram`` down to ``min_ngram``. Example with
    context ``[1, 2, 3, 4, 2, 3]``, k = 2: the tail ``[2, 3]`` occurred at
    positions 1-2, followed by ``[4, 2]``, so the draft is ``[4, 2]``.
    Deterministic, so it returns no probabilities (one-hot proposal).
    """

    def __init__(self, *, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidArgumentError(
                f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}"
            )
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.name = f"prompt lookup (n-gram {min_ngram}..{max_ngram})"

    def propose(self, request: DraftRequest) -> Draft:
        return Draft(tokens=self.lookup(request.context, request.k), free=True)

    def lookup(self, context: Sequence[int], k: int) -> list[int]:
        if k <= 0 or len(context) < 2:
            return []
        ids = np.asarray(context, dtype=np.int64)
        length = len(ids)
        # Earlier positions holding the last token; latest first.
        ends = np.flatnonzero(ids[:-1] == ids[-1])[::-1]
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            tail = ids[length - n :]
            for end in ends:
                start = end - n + 1
                if start >= 0 and np.array_equal(ids[start : end + 1], tail):
                    return [int(t) for t in ids[end + 1 : end + 1 + k]]
        return []


class HybridProposer(Proposer):
    """A sequence's lookup (stateless) and its own draft-model proposer."""

    chooses_length = True
    stops_by_confidence = True

    def __init__(self, model: DraftModelProposer) -> None:
        self.model = model

    def cached_state(self) -> CachedState:
        return self.model.cached_state()

    def adopt_cache(self, state: CachedState) -> None:
        self.model.adopt_cache(state)


class HybridDrafter(Drafter[HybridProposer]):
    """Prompt lookup where the context repeats itself, the draft model elsewhere.

    A lookup draft costs nothing. Without a policy, whenever the context's last
    ``min_ngram`` tokens occurred before, their continuation is proposed
    (one-hot); otherwise the draft model drafts. Under the adaptive policy
    (``request.policy``) each pass takes the source with the higher predicted
    speedup, from separate running acceptance rates of lookup and model drafts:
    in prose, where n-gram matches mislead, the model wins; in code that repeats
    its prompt, the free lookup does. Where the model drafts, the lookup's
    continuation goes along as a hint (:class:`_DraftRun`). Each pass's proposal
    is valid on its own, so verification stays exact; the draft model catches up
    on skipped tokens the next time it is asked.
    """

    def __init__(
        self, model_drafter: DraftModelDrafter, *, max_ngram: int = 3, min_ngram: int = 2
    ) -> None:
        self.model_drafter = model_drafter
        self.lookup = PromptLookupDrafter(max_ngram=max_ngram, min_ngram=min_ngram)
        self.draft_model = model_drafter.model
        self.name = f"prompt lookup, else {model_drafter.name}"

    def start(self) -> HybridProposer:
        return HybridProposer(self.model_drafter.start())

    def propose_batch(
        self, proposers: Sequence[HybridProposer], requests: Sequence[DraftRequest]
    ) -> list[Draft]:
        drafts = [NO_DRAFT] * len(requests)
        by_model: list[tuple[int, DraftRequest]] = []
        for i, request in enumerate(requests):
            lookup, k_model = self.route(request)
            if lookup is not None:
                drafts[i] = lookup
            elif k_model > 0:
                hint = self.lookup.lookup(request.context, k_model) if k_model > 1 else []
                by_model.append((i, replace(request, k=k_model, hint=hint)))
        if by_model:
            model_drafts = self.model_drafter.propose_batch(
                [proposers[i].model for i, _ in by_model], [r for _, r in by_model]
            )
            for (i, _), draft in zip(by_model, model_drafts, strict=True):
                drafts[i] = draft
        return drafts

    def route(self, request: DraftRequest) -> tuple[Draft | None, int]:
        """This pass's source: ``(lookup draft, 0)`` when the prompt lookup wins, else
        ``(None, n)``: the draft model drafts n tokens (n may be 0)."""
        k, policy = request.k, request.policy
        if k <= 0:
            return None, 0
        k_model = k if policy is None else min(policy.choose(), k)
        tokens = self.lookup.lookup(request.context, k)
        if not tokens:
            return None, k_model
        if policy is None:
            return Draft(tokens=tokens, free=True), 0
        k_free, free_speedup = policy.choose_free(len(tokens))
        # The draft model's prospect at the length its running acceptance rate supports
        # (stopping by confidence, k_model is only a cap that its drafts stop short of).
        k_expected = min(k_model, policy.best_model_k())
        if k_free > 0 and free_speedup >= policy.model_speedup(k_expected):
            return Draft(tokens=tokens[:k_free], free=True), 0
        return None, k_model


def drafter_menu(
    target: LanguageModel, draft_model: LanguageModel | None, *, ngram: int = 3
) -> dict[str, Drafter[Any] | None]:
    """The drafters by the names the command line and the server use: ``none`` (plain
    decoding), ``prompt-lookup`` and, with a draft model, ``model`` and ``hybrid``."""
    menu: dict[str, Drafter[Any] | None] = {
        "none": None,
        "prompt-lookup": PromptLookupDrafter(max_ngram=ngram),
    }
    if draft_model is not None:
        model = DraftModelDrafter(draft_model, target=target)
        menu["model"] = model
        menu["hybrid"] = HybridDrafter(model, max_ngram=ngram)
    return menu
