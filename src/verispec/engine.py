"""The decode loop: draft -> verify -> accept -> roll back -> emit.

The engine knows token ids, not text. One :class:`SequenceState` holds
everything a sequence owns (tokens, target cache, drafter state, random
generator, statistics), so a scheduler can step many sequences; nothing here
is global.

The first pass is the prompt pass: it scores the whole prompt and picks the
first new token from its last row (as plain decoding in transformers or
llama.cpp does), so no extra one-token pass stands between the prompt and the
first token.

Invariant: after it, the target cache holds every token but the last one. Each
pass feeds ``[last token, d_1 .. d_k]`` and gets k + 1 rows of logits; after
verification keeps ``d_1 .. d_n`` plus one recovered or bonus token, the cache
is cropped to the context plus the n accepted drafts, and the new last token
is again the one not yet fed.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Literal

import torch

from verispec.costs import AdaptiveDraftLength, CostModel
from verispec.drafters import Draft, Drafter, Proposer
from verispec.errors import InvalidArgumentError, PromptTooLongError
from verispec.models import LanguageModel, ModelCache
from verispec.prefix import CachedState, PrefixCache, PrefixEntry
from verispec.sampling import SamplingParams, warp
from verispec.stats import GenerationStats
from verispec.verify import greedy_verify, rejection_sample

MAX_DRAFT_TOKENS = 64
NO_DRAFT = Draft(tokens=[])  # a pass that verifies no draft (the prompt pass, k = 0)


@dataclass(frozen=True)
class StepEvent:
    """What one target pass added to the sequence."""

    tokens: list[int]  # new tokens, in order (may be cut short by EOS / max tokens)
    from_draft: list[bool]  # per token: proposed by the drafter and accepted
    num_drafted: int
    num_accepted: int
    finish_reason: str | None  # "eos", "length" or None (more to come)


@dataclass
class SequenceState:
    """One sequence being generated: all of its state, nothing shared."""

    tokens: list[int]  # prompt + generated so far
    prompt_length: int
    max_new_tokens: int
    params: SamplingParams
    cache: ModelCache
    proposer: Proposer | None
    generator: torch.Generator
    stats: GenerationStats = field(default_factory=GenerationStats)
    policy: AdaptiveDraftLength | None = None  # chooses k per pass when drafting is adaptive
    last_draft_free: bool = False  # the last pass's draft cost nothing (a prompt lookup)
    last_draft_hinted: bool = False  # the last pass's draft read tokens off a hint pass
    proposer_chooses: bool = False  # the proposer asks the policy itself (k is only a cap)
    finish_reason: str | None = None
    started_at: float = field(default_factory=time.perf_counter)
    prefix_cache: PrefixCache | None = None  # where the caches go when the sequence is done

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_length :]


DraftLength = int | Literal["auto"]  # a fixed k, or "auto" (cost model + running acceptance)


def check_generation_args(*, max_new_tokens: int, num_draft_tokens: DraftLength) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
        raise InvalidArgumentError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_draft_tokens == "auto":
        return
    if not isinstance(num_draft_tokens, int) or isinstance(num_draft_tokens, bool):
        raise InvalidArgumentError(
            f"num_draft_tokens must be an integer or 'auto', got {num_draft_tokens!r}"
        )
    if not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
        raise InvalidArgumentError(
            f"num_draft_tokens must be between 1 and {MAX_DRAFT_TOKENS}, got {num_draft_tokens}"
        )


def start_sequence(
    target: LanguageModel,
    drafter: Drafter | None,
    prompt_ids: list[int],
    *,
    params: SamplingParams,
    max_new_tokens: int,
    prefix_cache: PrefixCache | None = None,
) -> SequenceState:
    """Validate and set up a sequence; its prompt pass (:func:`prompt_step`, or a
    scheduler's batched one finished by ``finish_step(..., prompt=True)``) comes next.

    With ``prefix_cache``, the sequence starts from the cached entry sharing the
    longest prefix with the prompt (its cache cropped to that prefix, keeping at
    least the last prompt token to score), so its prompt pass scores only the
    rest: ``seq.tokens[seq.cache.length:]``. :func:`release_sequence` puts the
    caches back when the sequence is done."""
    if not prompt_ids:
        raise InvalidArgumentError("the prompt is empty")
    if len(prompt_ids) >= target.max_context:
        raise PromptTooLongError(
            f"the prompt has {len(prompt_ids)} tokens; {target.name} has a context window of "
            f"{target.max_context} tokens"
        )
    bad = [t for t in prompt_ids if not 0 <= t < target.vocab_size]
    if bad:
        raise InvalidArgumentError(f"prompt token id {bad[0]} is outside [0, {target.vocab_size})")
    found = prefix_cache.take(target, prompt_ids) if prefix_cache is not None else None
    proposer = drafter.start() if drafter is not None else None
    if found is None:
        cache = target.new_cache()
    else:
        entry, shared = found
        entry.target.cache.crop(min(shared, len(prompt_ids) - 1))
        # A pooled model (the server's) keeps cached prefixes outside its slots.
        attach = getattr(target, "attach_cache", None)
        cache = entry.target.cache if attach is None else attach(entry.target.cache)
        adopt = getattr(proposer, "adopt_cache", None)  # a draft model's proposer
        if entry.draft is not None and adopt is not None:
            adopt(entry.draft)  # it keeps what the context still agrees with
    seq = SequenceState(
        tokens=list(prompt_ids),
        prompt_length=len(prompt_ids),
        max_new_tokens=max_new_tokens,
        params=params,
        cache=cache,
        proposer=proposer,
        generator=params.make_generator(),
        prefix_cache=prefix_cache,
    )
    seq.stats.prompt_tokens = len(prompt_ids)
    seq.stats.cached_prompt_tokens = cache.length
    return seq


def uncached_prompt(seq: SequenceState) -> list[int]:
    """What a new sequence's prompt pass scores: the prompt past its reused prefix
    (all of it without a prefix cache)."""
    return seq.tokens[seq.cache.length :]


def release_sequence(seq: SequenceState, target: LanguageModel) -> None:
    """Give a done (or dropped) sequence's caches to its prefix cache, if it has one.

    Call only between passes (the caches then hold exactly the tokens behind
    them); a sequence whose pass failed midway must not be released."""
    pool, seq.prefix_cache = seq.prefix_cache, None  # at most once
    if pool is None:
        return
    cache = seq.cache
    # Keep every token but the last, as plain decoding's cache holds them: a speculative
    # pass that ended at an EOS inside an accepted run has fed more (the EOS and the
    # drafts after it), and a prefix one position longer would change how the next
    # prompt pass splits its work (and, in the last bits, its numbers) from plain
    # decoding's through the same cache.
    cache.crop(min(cache.length, len(seq.tokens) - 1))
    tokens = list(seq.tokens[: cache.length])
    draft = None
    state = getattr(seq.proposer, "cached_state", None)  # a draft model's proposer
    if state is not None:
        draft = _detached(state())
    pool.put(PrefixEntry(target=_detached(CachedState(target, tokens, cache)), draft=draft))


def _detached(state: CachedState) -> CachedState:
    """``state`` with a pooled model's cache copied out of its slot (which is freed)."""
    detach = getattr(state.model, "detach_cache", None)
    if detach is None:
        return state
    return CachedState(state.model, state.tokens, detach(state.cache))


def prompt_step(target: LanguageModel, seq: SequenceState) -> StepEvent:
    """The prompt pass: score the whole prompt and emit the first new token from its
    last row. It counts as a target pass that verified no draft; its time is the
    prompt pass's (``time_prefill``, measured from the sequence's start)."""
    started = time.perf_counter()
    logits = target.forward(seq.cache, uncached_prompt(seq), num_logits=1)  # [1, vocab]
    return finish_step(target, seq, NO_DRAFT, logits, started=started, prompt=True)


def draft_budget(target: LanguageModel, seq: SequenceState, num_draft_tokens: int) -> int:
    """How many tokens ``seq`` may draft: never past max_new_tokens or the context window."""
    remaining = seq.max_new_tokens - len(seq.generated)
    room = target.max_context - len(seq.tokens) - 1
    return max(0, min(num_draft_tokens, remaining - 1, room))


def step(target: LanguageModel, seq: SequenceState, num_draft_tokens: int) -> StepEvent:
    """One target pass for one sequence."""
    # 1. How many tokens to draft.
    k = draft_budget(target, seq, num_draft_tokens)
    t0 = time.perf_counter()
    draft = NO_DRAFT
    if seq.proposer is not None and k > 0:
        draft = seq.proposer.propose(seq.tokens, k, params=seq.params, generator=seq.generator)
    seq.last_draft_free = draft.free
    seq.last_draft_hinted = draft.hinted > 0
    t1 = time.perf_counter()
    seq.stats.time_draft += t1 - t0
    # 2. Score the last token and the draft in one target pass (with siblings: a tree
    #    whose extra rows each follow the draft token before the one they replace).
    tokens = [seq.tokens[-1], *draft.tokens]
    if draft.siblings:
        parents = [*range(-1, len(draft.tokens)), *(i for i, _ in draft.siblings)]
        tokens += [token for _, token in draft.siblings]
        logits = target.forward(seq.cache, tokens, parents=parents)  # type: ignore[call-arg]
    else:
        logits = target.forward(seq.cache, tokens)  # [k' + 1, vocab]
    return finish_step(target, seq, draft, logits, started=t1)


def finish_step(
    target: LanguageModel,
    seq: SequenceState,
    draft: Draft,
    logits: torch.Tensor,  # [k' + 1 (+ siblings), vocab]: the pass over [last, *draft.tokens]
    *,
    started: float,  # perf_counter() when the target pass began (for time_verify)
    prompt: bool = False,  # the prompt pass (logits: its last row; draft: none)
) -> StepEvent:
    """Steps 3-5 of a pass: verify, roll back, emit. A scheduler that scores many
    sequences in one batched target pass calls this once per sequence, and with
    ``prompt=True`` for each sequence of a batched prompt pass."""
    stats = seq.stats
    remaining = seq.max_new_tokens - len(seq.generated)
    # 3. Verify.
    if seq.params.greedy:
        verdict = greedy_verify(draft.tokens, logits, draft.siblings)
    else:
        if draft.siblings:
            raise InvalidArgumentError("siblings are verified under greedy decoding only")
        p_target = warp(logits, seq.params)  # [k' + 1, vocab]
        verdict = rejection_sample(draft.tokens, draft.probs, p_target, seq.generator)
    # 4. Roll the target cache back to the context plus the accepted drafts (and a kept
    #    sibling, moved from its row to the place of the draft token it replaces).
    base = len(seq.tokens)  # the pass's row r sits at position base - 1 + r
    kept = base + verdict.num_accepted
    if verdict.sibling is not None:
        seq.cache.move(base - 1 + verdict.sibling_row, kept)  # type: ignore[attr-defined]
        kept += 1
    seq.cache.crop(kept)
    t2 = time.perf_counter()
    # 5. Emit, honouring EOS and the length limits exactly.
    new = verdict.tokens(draft.tokens)
    finish = None
    for i, token in enumerate(new):
        if token in target.eos_token_ids:
            new, finish = new[: i + 1], "eos"
            break
    if finish is None and (
        len(seq.generated) + len(new) >= seq.max_new_tokens
        or len(seq.tokens) + len(new) >= target.max_context
    ):
        finish = "length"
    new = new[:remaining]
    seq.tokens.extend(new)
    seq.finish_reason = finish
    stats.record_pass(
        drafted=len(draft.tokens),
        accepted=verdict.num_accepted,
        emitted=len(new),
        free=draft.free,
        hinted=draft.hinted,
        siblings=len(draft.siblings),
        sibling_kept=verdict.sibling is not None,
    )
    stats.time_total = time.perf_counter() - seq.started_at
    if prompt:
        stats.time_prefill = stats.time_total
    else:
        stats.time_verify += t2 - started
    if stats.target_passes == 1:
        stats.time_to_first_token = stats.time_total
    from_draft = verdict.num_accepted + (verdict.sibling is not None)  # the first ones
    return StepEvent(
        tokens=new,
        from_draft=[i < from_draft for i in range(len(new))],
        num_drafted=len(draft.tokens),
        num_accepted=verdict.num_accepted,
        finish_reason=finish,
    )


def speculate(
    target: LanguageModel,
    drafter: Drafter | None,
    prompt_ids: list[int],
    *,
    params: SamplingParams | None = None,
    max_new_tokens: int = 256,
    num_draft_tokens: DraftLength = 4,
    costs: CostModel | None = None,
    prefix_cache: PrefixCache | None = None,
    siblings: bool = True,
) -> Generator[tuple[StepEvent, SequenceState], None, None]:
    """Generate from ``prompt_ids``, yielding one event per target pass.

    ``drafter=None`` is plain decoding through the same loop and kernels.
    ``num_draft_tokens="auto"`` picks k per pass from ``costs`` (required then)
    and the sequence's running acceptance rate, drafting nothing where
    speculation does not pay; a draft model's drafts then run up to the longest
    measured length and stop where its own confidence says one more token does
    not pay (:meth:`AdaptiveDraftLength.keep_drafting`).
    Stops at EOS or ``max_new_tokens``; closing the generator early simply
    drops the sequence (its caches belong to it alone). With ``prefix_cache``
    (:class:`verispec.prefix.PrefixCache`) the prompt pass reuses the cached
    prefix the prompt shares, and the sequence's caches go back to it when it
    ends (finished, or closed between passes). Under greedy decoding with
    ``"auto"``, a draft model's drafts also carry siblings (its runner-up tokens,
    verified in the same pass as a token tree) where the cost model says the extra
    rows pay, if the target can score trees (``supports_tree``); ``siblings=False``
    verifies chains only.
    """
    params = params or SamplingParams()
    check_generation_args(max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens)
    # Validation and the prompt pass happen now, not at the first next().
    if num_draft_tokens == "auto" and costs is None and drafter is not None:
        raise InvalidArgumentError("num_draft_tokens='auto' needs a cost model (costs=...)")
    seq = start_sequence(
        target,
        drafter,
        prompt_ids,
        params=params,
        max_new_tokens=max_new_tokens,
        prefix_cache=prefix_cache,
    )
    first = prompt_step(target, seq)
    if num_draft_tokens == "auto" and costs is not None:
        seq.policy = AdaptiveDraftLength(costs)
        attach = getattr(seq.proposer, "attach_policy", None)
        if attach is not None:  # a proposer that chooses among sources (HybridDrafter)
            attach(seq.policy)
            seq.proposer_chooses = True
        follow = getattr(seq.proposer, "follow_confidence", None)
        if follow is not None:  # a draft model's drafts stop where its confidence drops
            follow(seq.policy)
        tree = getattr(seq.proposer, "propose_siblings", None)
        if tree is not None and siblings and params.greedy and supports_tree(target):
            tree(seq.policy, target.max_context)
    fixed_k = num_draft_tokens if isinstance(num_draft_tokens, int) else 0
    return _run(target, seq, fixed_k, first)


def _run(
    target: LanguageModel, seq: SequenceState, fixed_k: int, first: StepEvent
) -> Generator[tuple[StepEvent, SequenceState], None, None]:
    between_passes = True  # the caches hold exactly the tokens behind them
    try:
        yield first, seq
        while seq.finish_reason is None:
            between_passes = False
            event = _next_pass(target, seq, fixed_k)
            between_passes = True
            yield event, seq
    finally:
        if between_passes:
            release_sequence(seq, target)


def _next_pass(target: LanguageModel, seq: SequenceState, fixed_k: int) -> StepEvent:
    """Choose k, run one pass, and feed what it showed to the policy."""
    if seq.policy is None:
        k = fixed_k
    elif seq.proposer_chooses:
        k = seq.policy.costs.max_k
    else:
        k = seq.policy.choose()
    draft_before, verify_before = seq.stats.time_draft, seq.stats.time_verify
    event = step(target, seq, k)
    if seq.policy is not None:
        seq.policy.observe(event.num_drafted, event.num_accepted, free=seq.last_draft_free)
        seq.policy.observe_time(  # a hinted draft's time is not a step's (Draft.hinted)
            0 if seq.last_draft_free or seq.last_draft_hinted else event.num_drafted,
            seq.stats.time_draft - draft_before,
            seq.stats.time_verify - verify_before,
        )
    return event


def supports_tree(target: LanguageModel) -> bool:
    """Whether ``target`` scores token trees (``forward(..., parents=)``) and its caches
    move positions (:class:`verispec.models.HFModel` with the lean runner)."""
    return bool(getattr(target, "supports_tree", False))
