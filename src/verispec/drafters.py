"""Drafters: cheap proposers of the next few tokens.

A :class:`Drafter` is shared (it holds weights or settings); ``start()`` gives a
:class:`Proposer` that owns one sequence's drafting state (e.g. the draft
model's KV cache). A proposer is asked for up to ``k`` tokens after the
current context and returns a :class:`Draft`: the tokens and, when they were
sampled, the distributions they were sampled from. Deterministic drafters
(prompt lookup, or any drafter under greedy decoding) return ``probs=None``;
verification then treats the proposal as one-hot.

Proposers need no notification of what was accepted: each call receives the
full verified context and reconciles its own state with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from verispec.costs import AdaptiveDraftLength
from verispec.errors import InvalidArgumentError
from verispec.models import LanguageModel, check_tokenizers_compatible
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


class Proposer(Protocol):
    def propose(
        self,
        context: Sequence[int],
        k: int,
        *,
        params: SamplingParams,
        generator: torch.Generator,
    ) -> Draft: ...


class Drafter(Protocol):
    name: str

    def start(self) -> Proposer:
        """Begin drafting for one new sequence."""
        ...


# Hinted drafting (``_DraftModelProposer.propose(hint=...)``): a hint is fed while this
# running share of hint tokens agreeing with the draft model's own is at least
# HINT_MIN_AGREEMENT, and only when it is HINT_MIN_TOKENS long or more. Measured on the
# 0.5B int4 draft (2 threads, 300 cached tokens): one step 20-25 ms; one pass of 1 + m
# rows 38-43 / 49-52 / 63 / 73-75 / 87-94 ms for m = 1 / 3 / 7 / 11 / 16. With a share a
# of agreeing hint tokens, m hint tokens save a + a^2 + ... + a^m steps; at a = 0.75 and
# m = 16 that is 3 steps, about what the wider pass costs more, so feeding pays above it.
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


def include_ids(model: LanguageModel, ids: list[int]) -> None:
    """Tell a draft with a trimmed vocabulary the context's token ids (see ``TrimmedHead``)."""
    include = getattr(model, "include_ids", None)  # optional: only HFModel has it
    if include is not None:
        include(ids)


class DraftModelDrafter:
    """A smaller model of the same family drafts autoregressively.

    Its tokenizer must equal the target's (checked here, at construction).
    """

    def __init__(self, model: LanguageModel, *, target: LanguageModel) -> None:
        check_tokenizers_compatible(target.tokenizer, model.tokenizer)
        self.model = model
        self.target_vocab_size = target.vocab_size
        self.name = f"draft model {model.name}"

    def start(self) -> _DraftModelProposer:
        return _DraftModelProposer(self.model, self.target_vocab_size)


class _DraftModelProposer:
    """One sequence's draft cache and the token ids it holds.

    Off-by-one cases: after a partial accept the cache holds draft tokens the
    target rejected, and is cropped back to the verified prefix; after a full
    accept of k tokens it holds ``d_1 .. d_{k-1}`` only (``d_k`` was never fed),
    so it is one token behind and the next call feeds ``d_k`` and the bonus
    token together.
    """

    def __init__(self, model: LanguageModel, target_vocab_size: int) -> None:
        self.model = model
        self.vocab_size = target_vocab_size
        self.cache = model.new_cache()
        self.cached: list[int] = []  # the token ids behind self.cache, in order
        self.policy: AdaptiveDraftLength | None = None  # set by follow_confidence
        self.siblings = False  # set by propose_siblings
        self.target_context = 0  # the target's context window (propose_siblings)
        # Running share of prompt-lookup hint tokens this draft model agrees with
        # (see propose(hint=...)); hints are fed only while it is high.
        self.hint_agreement = HINT_PRIOR

    def propose_siblings(self, policy: AdaptiveDraftLength, target_context: int) -> None:
        """Under greedy decoding, offer the runner-up token of drafted positions as
        siblings where ``policy.choose_siblings`` says verifying them pays (the target
        must score token trees; the engine checks that before it calls this)."""
        self.follow_confidence(policy)
        self.siblings = True
        self.target_context = target_context

    def follow_confidence(self, policy: AdaptiveDraftLength) -> None:
        """Stop each draft where ``policy.keep_drafting`` says one more token does not
        pay, judged from this model's probabilities of the tokens it drafts."""
        self.policy = policy
        policy.follow_confidence = True

    def cached_state(self) -> CachedState:
        """This sequence's draft cache and its ids, for a prefix cache to keep."""
        return CachedState(self.model, list(self.cached), self.cache)

    def adopt_cache(self, state: CachedState) -> None:
        """Start from a finished sequence's draft cache (the next :meth:`propose` keeps
        the part its context agrees with); ignored if another model filled it."""
        if state.model is not self.model or state.cache.length != len(state.tokens):
            return
        attach = getattr(self.model, "attach_cache", None)  # a pooled model (the server's)
        if attach is None:
            self.cache = state.cache
        else:
            release = getattr(self.cache, "release", None)
            if release is not None:
                release()  # this proposer's empty slot, before the copy takes one
            self.cache = attach(state.cache)
        self.cached = list(state.tokens)

    def _align(self, logits: torch.Tensor) -> torch.Tensor:  # [vocab_draft] -> [vocab_target]
        width = logits.shape[-1]
        if width == self.vocab_size:
            return logits
        if width > self.vocab_size:
            return logits[: self.vocab_size]
        pad = torch.full((self.vocab_size - width,), float("-inf"), dtype=logits.dtype)
        return torch.cat([logits, pad])

    def propose(
        self,
        context: Sequence[int],
        k: int,
        *,
        params: SamplingParams,
        generator: torch.Generator,
        hint: Sequence[int] = (),
    ) -> Draft:
        """Draft up to ``k`` tokens after ``context``.

        ``hint`` is a guess at the draft model's next tokens, e.g. a prompt lookup's
        continuation. While this sequence's hints have mostly agreed with
        what the model drafted (``hint_agreement``), the hint is fed along with the catch-up
        tokens in one pass: the model's token after each hint token is read off that pass
        for as long as the hint agrees with it, and drafting goes on step by step from the
        first disagreement. A pass over many rows costs a few steps (the 0.5B int4 draft
        here: 17 rows about 90 ms, one step 20-25 ms), so a copied stretch of 16 tokens is
        drafted for about a quarter of what 16 steps cost. The drafted tokens are the
        model's own either way (up to float rounding between the two kinds of pass): under
        greedy decoding its argmax; under sampling a hint token is kept as often as the
        model's probability of it (:func:`sample_preferring`), so each drafted token is
        still a sample from the distribution reported in ``Draft.probs``.
        """
        if k <= 0:
            return Draft(tokens=[])
        # 1. Keep the cached prefix that the verified context still agrees with;
        #    at least the last context token is fed again to get fresh logits.
        keep = min(common_prefix_length(self.cached, context), len(context) - 1)
        self.cache.crop(keep)
        del self.cached[keep:]
        # 2. Catch up (usually one token, two after a fully accepted draft), and with a
        #    trusted hint, feed its tokens too: row i + 1 then follows hint[:i + 1].
        hint = list(hint[: k - 1])
        fed_hint = hint if self.hint_agreement >= HINT_MIN_AGREEMENT else []
        if len(fed_hint) < HINT_MIN_TOKENS:
            fed_hint = []
        new = [*context[keep:], *fed_hint]
        include_ids(self.model, new)
        rows = self.model.forward(self.cache, new, num_logits=len(fed_hint) + 1)  # [m + 1, vd]
        self.cached.extend(new)
        base = len(context)  # the cache's length before the first hint token
        on_hint = bool(fed_hint)  # the cache holds fed_hint after the context
        logits = rows[0]
        # 3. Draft k tokens one by one.
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        confidences: list[float] = []  # the draft's probability of each drafted token
        runners_up: list[tuple[int, float]] = []  # (token, probability) per position
        siblings = self.siblings and params.greedy and self.policy is not None
        hinted = 0
        for i in range(k):
            row = self._align(logits)  # [vocab]
            if siblings:
                best = row.topk(2)
                token = int(best.indices[0])
                top = torch.exp(best.values - torch.logsumexp(row, -1)).tolist()
                confidences.append(top[0])
                runners_up.append((int(best.indices[1]), top[1]))
            elif params.greedy:
                token = int(row.argmax().item())
                if self.policy is not None:
                    confidences.append(float(torch.exp(row[token] - torch.logsumexp(row, -1))))
            else:
                p_draft = warp(row[None], params)[0]  # [vocab]
                if on_hint and i < len(fed_hint):
                    token = sample_preferring(p_draft, fed_hint[i], generator)
                else:
                    token = sample(p_draft, generator)
                probs.append(p_draft)
                confidences.append(float(p_draft[token]))
            tokens.append(token)
            if on_hint:
                hinted += 1
            if self.policy is not None and not self.policy.keep_drafting(confidences):
                break
            if i + 1 < k:
                if on_hint and i < len(fed_hint) and token == fed_hint[i]:
                    logits = rows[i + 1]  # already scored: the cache holds this token
                    continue
                if on_hint:  # leave the hint: drop its rows from this token on
                    self.cache.crop(base + i)
                    del self.cached[base + i :]
                    on_hint = False
                logits = self.model.forward(self.cache, [token], num_logits=1)[-1]
                self.cached.append(token)
        if on_hint:  # keep the cache one token behind the draft, as after step-by-step drafting
            self.cache.crop(base + len(tokens) - 1)
            del self.cached[base + len(tokens) - 1 :]
        if hint:
            self._observe_hint(hint, tokens)
        chosen: tuple[tuple[int, int], ...] = ()
        if siblings and self.policy is not None:
            room = self.sibling_room(len(context), len(tokens))
            picks = self.policy.choose_siblings(confidences, [p for _, p in runners_up], room)
            chosen = tuple((i, runners_up[i][0]) for i in picks)
        return Draft(
            tokens=tokens,
            probs=torch.stack(probs) if probs else None,
            siblings=chosen,
            hinted=hinted,
        )

    def _observe_hint(self, hint: Sequence[int], tokens: Sequence[int]) -> None:
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

    def sibling_room(self, context_length: int, drafted: int) -> int:
        """How many sibling rows fit in the target's context after this draft (the
        engine sets ``target_context``; without it, none)."""
        return max(0, self.target_context - context_length - drafted - 1)


class PromptLookupDrafter:
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

    def start(self) -> PromptLookupDrafter:
        return self  # stateless

    def propose(
        self,
        context: Sequence[int],
        k: int,
        *,
        params: SamplingParams,
        generator: torch.Generator,
    ) -> Draft:
        del params, generator  # deterministic
        if k <= 0 or len(context) < 2:
            return Draft(tokens=[])
        ids = np.asarray(context, dtype=np.int64)
        length = len(ids)
        # Earlier positions holding the last token; latest first.
        ends = np.flatnonzero(ids[:-1] == ids[-1])[::-1]
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            tail = ids[length - n :]
            for end in ends:
                start = end - n + 1
                if start >= 0 and np.array_equal(ids[start : end + 1], tail):
                    return Draft(tokens=ids[end + 1 : end + 1 + k].tolist(), free=True)
        return Draft(tokens=[])


class HybridDrafter:
    """Prompt lookup where the context repeats itself, the draft model elsewhere.

    A lookup draft costs nothing. Without a policy, whenever the context's last
    ``min_ngram`` tokens occurred before, their continuation is proposed
    (one-hot); otherwise the draft model drafts. Under the adaptive policy
    (:meth:`_HybridProposer.attach_policy`, done by the engine for
    ``num_draft_tokens="auto"``) each pass takes the source with the higher
    predicted speedup, from separate running acceptance rates of lookup and
    model drafts: in prose, where n-gram matches mislead, the model wins; in
    code that repeats its prompt, the free lookup does. Each pass's proposal is
    valid on its own, so verification stays exact. The draft model catches up
    on skipped tokens the next time it is asked.
    """

    def __init__(self, model_drafter: DraftModelDrafter, *, max_ngram: int = 3, min_ngram: int = 2):
        self.model_drafter = model_drafter
        self.lookup = PromptLookupDrafter(max_ngram=max_ngram, min_ngram=min_ngram)
        self.model = model_drafter.model
        self.name = f"prompt lookup, else {model_drafter.name}"

    def start(self) -> _HybridProposer:
        return _HybridProposer(self.lookup, self.model_drafter.start())


class _HybridProposer:
    def __init__(self, lookup: PromptLookupDrafter, model: _DraftModelProposer) -> None:
        self.lookup = lookup
        self.model = model
        self.policy: AdaptiveDraftLength | None = None

    def attach_policy(self, policy: AdaptiveDraftLength) -> None:
        """Let ``policy`` pick the source and the length of every draft (``k`` is then a cap)."""
        self.policy = policy

    def follow_confidence(self, policy: AdaptiveDraftLength) -> None:
        """Let the draft model's drafts stop by its confidence (see the model proposer's)."""
        self.model.follow_confidence(policy)

    def propose_siblings(self, policy: AdaptiveDraftLength, target_context: int) -> None:
        """Let the draft model's drafts carry siblings (see the model proposer's)."""
        self.model.propose_siblings(policy, target_context)

    def cached_state(self) -> CachedState:
        return self.model.cached_state()

    def adopt_cache(self, state: CachedState) -> None:
        self.model.adopt_cache(state)

    def route(
        self,
        context: Sequence[int],
        k: int,
        *,
        params: SamplingParams,
        generator: torch.Generator,
    ) -> tuple[Draft | None, int]:
        """This pass's source: ``(lookup draft, 0)`` when the prompt lookup wins, else
        ``(None, n)``: the draft model (``self.model``) drafts n tokens (n may be 0).

        A batching scheduler calls this and runs the model drafts of many sequences
        together (:func:`verispec.batching.propose_batch`); :meth:`propose` is both steps.
        """
        k_model = k if self.policy is None else min(self.policy.choose(), k)
        draft = self._winning_lookup(context, k, k_model, params=params, generator=generator)
        return (draft, 0) if draft is not None else (None, k_model)

    def takes_lookup(
        self,
        context: Sequence[int],
        k: int,
        *,
        params: SamplingParams,
        generator: torch.Generator,
    ) -> bool:
        """Whether :meth:`route` with cap ``k`` would take a (free) prompt-lookup draft
        this pass. No side effects (the policy's probe count stays), so a batching
        scheduler can ask before it decides the batch's draft length and leave the draft
        model's cost out for this sequence."""
        if k <= 0:
            return False
        k_model = k if self.policy is None else min(self.policy.best_model_k(), k)
        draft = self._winning_lookup(context, k, k_model, params=params, generator=generator)
        return draft is not None

    def _winning_lookup(
        self,
        context: Sequence[int],
        k: int,
        k_model: int,
        *,
        params: SamplingParams,
        generator: torch.Generator,
    ) -> Draft | None:
        """The prompt-lookup draft (at most k tokens, cut to its best length under a
        policy) when one is found and, under a policy, beats k_model draft-model tokens."""
        draft = self.lookup.propose(context, k, params=params, generator=generator)
        if not draft.tokens:
            return None
        if self.policy is None:
            return draft
        k_free, free_speedup = self.policy.choose_free(len(draft.tokens))
        # The draft model's prospect at the length its running acceptance rate supports
        # (with follow_confidence, k_model is only a cap that its drafts stop short of).
        k_expected = min(k_model, self.policy.best_model_k())
        if k_free > 0 and free_speedup >= self.policy.model_speedup(k_expected):
            return Draft(tokens=draft.tokens[:k_free], free=True)
        return None

    def propose(
        self,
        context: Sequence[int],
        k: int,
        *,
        params: SamplingParams,
        generator: torch.Generator,
    ) -> Draft:
        draft, k_model = self.route(context, k, params=params, generator=generator)
        if draft is not None:
            return draft
        hint: list[int] = []
        if k_model > 1:
            hint = self.lookup.propose(context, k_model, params=params, generator=generator).tokens
        return self.model.propose(context, k_model, params=params, generator=generator, hint=hint)
