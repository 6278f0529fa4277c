"""The decode step: one target pass for a batch of sequences.

:func:`step` advances any number of sequences by one target pass: every
sequence's drafter proposes (all sequences of a drafter at once, so a draft
model steps them in lock-step), one batched target forward scores every
``[last token, *draft]`` (ragged, trees where the target takes them), each
sequence is verified on its own (:mod:`verispec.verify`), its cache rolled back
to what it kept, and its new tokens emitted. :func:`speculate` (behind
``generate`` and ``stream``) is :func:`step` with a batch of one; the server's
scheduler calls it with its running batch and only adds admission,
cancellation and delivery. The engine knows token ids, not text.

The first pass is the prompt pass (:func:`prompt_pass`): it scores the whole
prompt and picks the first new token from its last row (as plain decoding in
transformers or llama.cpp does).

Invariant: after it, the target cache holds every token but the last one. Each
pass feeds ``[last token, d_1 .. d_k]`` and gets k + 1 rows of logits; after
verification keeps ``d_1 .. d_n`` plus one recovered or bonus token, the cache
is cropped to the context plus the n accepted drafts, and the new last token
is again the one not yet fed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from verispec.drafting import NO_DRAFT, Draft, Drafter, DraftRequest, Proposer
from verispec.errors import DrafterError, InvalidArgumentError, PromptTooLongError
from verispec.models import LanguageModel
from verispec.policy import DraftPolicy, plan_batch
from verispec.policy.costs import CostModel
from verispec.prefix import CachedState, PrefixCache, PrefixEntry
from verispec.sampling import SamplingParams, warp
from verispec.stats import GenerationStats
from verispec.verify import greedy_verify, rejection_sample

MAX_DRAFT_TOKENS = 64
DraftLength = int | Literal["auto"]  # a fixed k, or "auto" (cost model + running acceptance)
log = logging.getLogger("verispec.engine")


@dataclass(frozen=True)
class StepEvent:
    """What one target pass added to one sequence."""

    tokens: list[int]  # new tokens, in order (may be cut short by EOS / max tokens)
    from_draft: list[bool]  # per token: proposed by the drafter and accepted
    num_drafted: int
    num_accepted: int
    finish_reason: str | None  # "eos", "length", "error" or None (more to come)
    draft: Draft = NO_DRAFT  # what was verified
    logits: torch.Tensor | None = None  # [k' + 1 (+ siblings), vocab]: the pass's rows
    error: str | None = None  # why the sequence failed (finish_reason "error")


@dataclass(eq=False)
class SequenceState:
    """One sequence being generated: all of its state, nothing shared."""

    tokens: list[int]  # prompt + generated so far
    prompt_length: int
    max_new_tokens: int
    params: SamplingParams
    cache: Any  # the target's cache of this sequence (LanguageModel.new_cache)
    drafter: Drafter[Any] | None
    proposer: Proposer | None
    generator: torch.Generator
    num_draft_tokens: int = 0  # the fixed draft length when there is no policy
    policy: DraftPolicy | None = None  # chooses k per pass under -k auto
    tree: bool = False  # drafts may carry siblings (greedy, a target that scores trees)
    stats: GenerationStats = field(default_factory=GenerationStats)
    finish_reason: str | None = None
    error: str | None = None
    started_at: float = field(default_factory=time.perf_counter)
    prefix_cache: PrefixCache | None = None  # where the caches go when the sequence is done

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_length :]


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
    drafter: Drafter[Any] | None,
    prompt_ids: list[int],
    *,
    params: SamplingParams,
    max_new_tokens: int,
    num_draft_tokens: DraftLength = 4,
    costs: CostModel | None = None,
    siblings: bool = True,
    prefix_cache: PrefixCache | None = None,
) -> SequenceState:
    """Validate and set up a sequence; its prompt pass (:func:`prompt_pass`) comes next.

    ``num_draft_tokens="auto"`` gives the sequence a :class:`~verispec.policy.DraftPolicy`
    over ``costs`` (required then). Under greedy decoding with ``"auto"``, drafts may
    carry siblings (token trees) if the target scores trees; ``siblings=False`` keeps
    them to chains. With ``prefix_cache``, the sequence starts from the cached entry
    sharing the longest prefix with the prompt (its cache cropped to that prefix,
    keeping at least the last prompt token to score), so its prompt pass scores only
    the rest; :func:`release_sequence` puts the caches back when it is done."""
    check_generation_args(max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens)
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
    policy = None
    if num_draft_tokens == "auto" and drafter is not None:
        if costs is None:
            raise InvalidArgumentError("num_draft_tokens='auto' needs a cost model (costs=...)")
        policy = DraftPolicy(costs)
    proposer = drafter.start() if drafter is not None else None
    if policy is not None and proposer is not None:
        policy.follow_confidence = proposer.stops_by_confidence
    found = prefix_cache.take(target, prompt_ids) if prefix_cache is not None else None
    if found is None:
        cache = target.new_cache()
    else:
        entry, shared = found
        cache = entry.target.cache
        cache.crop(min(shared, len(prompt_ids) - 1))
        if entry.draft is not None and proposer is not None:
            proposer.adopt_cache(entry.draft)  # it keeps what the context still agrees with
    seq = SequenceState(
        tokens=list(prompt_ids),
        prompt_length=len(prompt_ids),
        max_new_tokens=max_new_tokens,
        params=params,
        cache=cache,
        drafter=drafter,
        proposer=proposer,
        generator=params.make_generator(),
        num_draft_tokens=num_draft_tokens if isinstance(num_draft_tokens, int) else 0,
        policy=policy,
        tree=policy is not None and siblings and params.greedy and target.supports_tree,
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
    kept = CachedState(target, list(seq.tokens[: cache.length]), cache)
    draft = seq.proposer.cached_state() if seq.proposer is not None else None
    pool.put(PrefixEntry(target=kept, draft=draft))


def prompt_pass(target: LanguageModel, seqs: Sequence[SequenceState]) -> list[StepEvent]:
    """The prompt passes of new sequences, in one batched pass: each scores its prompt
    (past a reused prefix) and emits its first token from the last row. Each counts as
    a target pass that verified no draft; its time is ``time_prefill``, measured from
    the sequence's start."""
    started = time.perf_counter()
    logits = target.forward_batch(
        [s.cache for s in seqs], [uncached_prompt(s) for s in seqs], num_logits=[1] * len(seqs)
    )
    return [
        finish_step(target, seq, NO_DRAFT, rows, started=started, prompt=True)
        for seq, rows in zip(seqs, logits, strict=True)
    ]


def draft_budget(target: LanguageModel, seq: SequenceState, num_draft_tokens: int) -> int:
    """How many tokens ``seq`` may draft: never past max_new_tokens or the context window."""
    remaining = seq.max_new_tokens - len(seq.generated)
    room = target.max_context - len(seq.tokens) - 1
    return max(0, min(num_draft_tokens, remaining - 1, room))


def draft_length(target: LanguageModel, seq: SequenceState) -> int:
    """This pass's draft length for ``seq``: its policy's choice (a proposer that picks
    its own length gets the cap), else its fixed k; within its budget."""
    if seq.proposer is None:
        return 0
    if seq.policy is None:
        k = seq.num_draft_tokens
    elif seq.proposer.chooses_length:
        k = seq.policy.cap
    else:
        k = seq.policy.choose()
    return draft_budget(target, seq, k)


def step(target: LanguageModel, seqs: Sequence[SequenceState]) -> list[StepEvent]:
    """One target pass for every sequence of ``seqs`` (none finished).

    A sequence whose drafter fails (raises, or breaks the protocol) ends with
    ``finish_reason="error"`` and the error in its event; the others go on."""
    # 1. How many tokens each sequence drafts (a batch's sequences share one pass).
    ks = [draft_length(target, s) for s in seqs]
    policies = [s.policy for s in seqs if s.policy is not None]
    if len(seqs) > 1 and policies:
        planned = [k for s, k in zip(seqs, ks, strict=True) if s.policy is not None]
        cap = plan_batch(policies[0].costs, policies, planned)
        ks = [min(k, cap) if s.policy is not None else k for s, k in zip(seqs, ks, strict=True)]
    # 2. Propose: each drafter for all of its sequences at once.
    t0 = time.perf_counter()
    drafts = _propose(target, seqs, ks)
    t1 = time.perf_counter()
    events: list[StepEvent | None] = [None] * len(seqs)
    live: list[int] = []
    for i, (seq, draft) in enumerate(zip(seqs, drafts, strict=True)):
        seq.stats.time_draft += t1 - t0
        if isinstance(draft, str):
            seq.finish_reason, seq.error = "error", draft
            events[i] = StepEvent([], [], 0, 0, "error", error=draft)
        else:
            live.append(i)
    # 3. Score every sequence's last token and draft in one target pass (with siblings: a
    #    tree whose extra rows each follow the draft token before the one they replace).
    inputs, parents = [], []
    for i in live:
        draft = drafts[i]
        assert not isinstance(draft, str)
        inputs.append([seqs[i].tokens[-1], *draft.tokens, *(s for _, s in draft.siblings)])
        parents.append(
            [*range(-1, len(draft.tokens)), *(j for j, _ in draft.siblings)]
            if draft.siblings
            else None
        )
    if live:
        logits = target.forward_batch(
            [seqs[i].cache for i in live],
            inputs,
            parents=parents if any(p is not None for p in parents) else None,
        )
        t2 = time.perf_counter()
        # 4. Verify, roll back and emit, each sequence on its own.
        for i, rows in zip(live, logits, strict=True):
            seq, draft = seqs[i], drafts[i]
            assert not isinstance(draft, str)
            event = finish_step(target, seq, draft, rows, started=t1)
            if seq.policy is not None:
                seq.policy.observe(
                    event.num_drafted,
                    event.num_accepted,
                    free=draft.free,
                    confidences=draft.confidences,
                )
                # a hinted draft's time is not a step's (Draft.hinted)
                seq.policy.observe_time(
                    0 if draft.free or draft.hinted else event.num_drafted, t1 - t0, t2 - t1
                )
            events[i] = event
    return [e for e in events if e is not None]


def _propose(
    target: LanguageModel, seqs: Sequence[SequenceState], ks: Sequence[int]
) -> list[Draft | str]:
    """Every sequence's draft (or why its drafter failed), asking each drafter once for
    all of its sequences."""
    drafts: list[Draft | str] = [NO_DRAFT] * len(seqs)
    groups: dict[int, list[int]] = {}
    for i, (seq, k) in enumerate(zip(seqs, ks, strict=True)):
        if seq.drafter is not None and k > 0:
            groups.setdefault(id(seq.drafter), []).append(i)
    for members in groups.values():
        drafter = seqs[members[0]].drafter
        assert drafter is not None
        requests = [_request(target, seqs[i], ks[i]) for i in members]
        try:
            got: list[Draft | str] = list(
                drafter.propose_batch([seqs[i].proposer for i in members], requests)
            )
            if len(got) != len(members):
                raise DrafterError(f"returned {len(got)} drafts for {len(members)} sequences")
        except Exception as exc:
            if len(members) == 1:  # nothing to tell apart: this sequence's drafter failed
                log.exception("drafter %r failed", drafter.name)
                got = [_failure(drafter, exc)]
            else:  # find which sequences fail: ask each on its own
                log.warning("drafter %r failed on a batch (%s); one by one", drafter.name, exc)
                got = [
                    _propose_one(drafter, seqs[i], r)
                    for i, r in zip(members, requests, strict=True)
                ]
        for i, request, draft in zip(members, requests, got, strict=True):
            drafts[i] = (
                draft if isinstance(draft, str) else _checked(drafter, draft, request, target)
            )
    return drafts


def _propose_one(drafter: Drafter[Any], seq: SequenceState, request: DraftRequest) -> Draft | str:
    try:
        return drafter.propose_batch([seq.proposer], [request])[0]
    except Exception as exc:
        log.exception("drafter %r failed", drafter.name)
        return _failure(drafter, exc)


def _failure(drafter: Drafter[Any], exc: Exception) -> str:
    return f"drafter {drafter.name!r} failed: {type(exc).__name__}: {exc}"


def _checked(
    drafter: Drafter[Any], draft: Draft, request: DraftRequest, target: LanguageModel
) -> Draft | str:
    """``draft`` if it keeps the protocol, else why not (naming the drafter)."""
    problem = None
    if not isinstance(draft, Draft):
        problem = f"returned {type(draft).__name__}, not a Draft"
    elif len(draft.tokens) > request.k:
        problem = f"proposed {len(draft.tokens)} tokens where at most {request.k} were asked"
    elif bad := [
        t for t in draft.tokens if not isinstance(t, int) or not 0 <= t < target.vocab_size
    ]:
        problem = f"proposed token id {bad[0]!r}, outside [0, {target.vocab_size})"
    elif draft.probs is not None and tuple(draft.probs.shape) != (
        len(draft.tokens),
        target.vocab_size,
    ):
        problem = (
            f"returned probs of shape {tuple(draft.probs.shape)} for {len(draft.tokens)} tokens"
        )
    elif draft.siblings and (request.tree_room <= 0 or len(draft.siblings) > request.tree_room):
        problem = "proposed siblings where the request allows none"
    if problem is None:
        return draft
    message = f"drafter {drafter.name!r} {problem}"
    log.error(message)
    return message


def _request(target: LanguageModel, seq: SequenceState, k: int) -> DraftRequest:
    return DraftRequest(
        context=seq.tokens,
        k=k,
        params=seq.params,
        generator=seq.generator,
        policy=seq.policy,
        tree_room=max(0, target.max_context - len(seq.tokens) - 1) if seq.tree else 0,
    )


def finish_step(
    target: LanguageModel,
    seq: SequenceState,
    draft: Draft,
    logits: torch.Tensor,  # [k' + 1 (+ siblings), vocab]: the pass over [last, *draft.tokens]
    *,
    started: float,  # perf_counter() when the target pass began (for time_verify)
    prompt: bool = False,  # the prompt pass (logits: its last row; draft: none)
) -> StepEvent:
    """Verify one sequence's pass, roll its cache back, emit its tokens."""
    stats = seq.stats
    remaining = seq.max_new_tokens - len(seq.generated)
    # Verify.
    if seq.params.greedy:
        verdict = greedy_verify(draft.tokens, logits, draft.siblings)
    else:
        if draft.siblings:
            raise InvalidArgumentError("siblings are verified under greedy decoding only")
        p_target = warp(logits, seq.params)  # [k' + 1, vocab]
        verdict = rejection_sample(draft.tokens, draft.probs, p_target, seq.generator)
    # Roll the target cache back to the context plus the accepted drafts (and a kept
    # sibling, moved from its row to the place of the draft token it replaces).
    base = len(seq.tokens)  # the pass's row r sits at position base - 1 + r
    kept = base + verdict.num_accepted
    if verdict.sibling is not None:
        seq.cache.move(base - 1 + verdict.sibling_row, kept)
        kept += 1
    seq.cache.crop(kept)
    t2 = time.perf_counter()
    # Emit, honouring EOS and the length limits exactly.
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
        draft=draft,
        logits=logits,
    )


def speculate(
    target: LanguageModel,
    drafter: Drafter[Any] | None,
    prompt_ids: list[int],
    *,
    params: SamplingParams | None = None,
    max_new_tokens: int = 256,
    num_draft_tokens: DraftLength = 4,
    costs: CostModel | None = None,
    prefix_cache: PrefixCache | None = None,
    siblings: bool = True,
) -> Generator[tuple[StepEvent, SequenceState], None, None]:
    """Generate from ``prompt_ids``, yielding one event per target pass: :func:`step`
    with a batch of one.

    ``drafter=None`` is plain decoding through the same step and kernels.
    ``num_draft_tokens="auto"`` picks k per pass from ``costs`` (required then)
    and the sequence's running acceptance rate, drafting nothing where
    speculation does not pay (see :func:`start_sequence` for siblings and
    ``prefix_cache``). Stops at EOS or ``max_new_tokens``; closing the generator
    early simply drops the sequence (its caches go to the prefix cache if it
    stopped between passes). A failing drafter raises
    :class:`~verispec.errors.DrafterError`.
    """
    seq = start_sequence(
        target,
        drafter,
        prompt_ids,
        params=params or SamplingParams(),
        max_new_tokens=max_new_tokens,
        num_draft_tokens=num_draft_tokens,
        costs=costs,
        siblings=siblings,
        prefix_cache=prefix_cache,
    )
    # Validation and the prompt pass happen now, not at the first next().
    first = prompt_pass(target, [seq])[0]
    return _run(target, seq, first)


def _run(
    target: LanguageModel, seq: SequenceState, first: StepEvent
) -> Generator[tuple[StepEvent, SequenceState], None, None]:
    between_passes = True  # the caches hold exactly the tokens behind them
    try:
        yield first, seq
        while seq.finish_reason is None:
            between_passes = False
            (event,) = step(target, [seq])
            between_passes = True
            if event.error is not None:
                raise DrafterError(event.error)
            yield event, seq
    finally:
        if between_passes:
            release_sequence(seq, target)
