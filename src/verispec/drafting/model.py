"""A draft model drafts: every sequence asked together in lock-step, one batched pass
per draft step, with prompt-lookup hints read off one pass, drafts stopped by the
model's confidence under a policy, and runner-up tokens offered as siblings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from verispec.drafting.base import NO_DRAFT, Draft, Drafter, DraftRequest, Proposer
from verispec.models import LanguageModel, check_tokenizers_compatible
from verispec.prefix import CachedState, common_prefix_length
from verispec.sampling import sample, warp

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
