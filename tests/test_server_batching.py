"""Ragged batching and the scheduler, without HTTP: batched = alone."""

from __future__ import annotations

import collections
import itertools
import threading

import numpy as np
import pytest
import torch
from helpers import TableModel, tiny_llama
from server_support import chat_tokenizer, noisy_copy

import verispec.batching as batching
from verispec import DraftModelDrafter, PromptLookupDrafter, generate
from verispec.batching import KVPool, PooledModel, batched_forward, pooled, propose_batch
from verispec.costs import AdaptiveDraftLength, CostModel
from verispec.drafters import HybridDrafter
from verispec.engine import start_sequence
from verispec.sampling import SamplingParams, warp
from verispec.server.policy import (
    AcceptanceEstimate,
    BatchCostPolicy,
    BatchCosts,
    FixedDraftLength,
    measure_batch_costs,
)
from verispec.server.scheduler import GenerationRequest, Scheduler, Update, _free

PROMPTS = [
    [5, 17, 99, 3, 5, 17, 42, 8, 5, 17],
    [1],
    [200, 201, 202, 203, 200, 201],
    list(range(30, 70)),
    [7, 7, 7, 7, 7, 7, 7, 7],
    [120, 3, 44],
]


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=0, tokenizer=chat_tokenizer())


@pytest.fixture(scope="module")
def lookup_prompts(target) -> list[list[int]]:
    """PROMPTS with the first and third remade so that prompt lookup matches right after
    the prompt pass: each is ``[x, t, a, b, x]`` where the target's first token is t, so
    the context then ends with the bigram ``x, t`` seen at its start."""
    found: list[list[int]] = []
    for x, (a, b) in itertools.product(range(5, 60), [(99, 3), (42, 8)]):
        for t in range(target.vocab_size):
            prompt = [x, t, a, b, x]
            if int(target.forward(target.new_cache(), prompt, num_logits=1)[0].argmax()) == t:
                found.append(prompt)
                break
        if len(found) == 2:
            return [found[0], PROMPTS[1], found[1], *PROMPTS[3:]]
    raise AssertionError("no prompt whose first token the prompt predicts")


def _prefilled(model, prompts):
    caches = [model.new_cache() for _ in prompts]
    for cache, prompt in zip(caches, prompts, strict=True):
        model.forward(cache, prompt)
    return caches


def test_batched_logits_equal_per_sequence_logits(target) -> None:
    pm = pooled(target, slots=8)
    hole = pm.new_cache()  # slot 0 stays busy: the batch reads slots 1.. (not a prefix)
    news = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11], [12], [13, 14, 15, 16]]
    caches = _prefilled(pm, PROMPTS)
    reference = [
        target.forward(c, n) for c, n in zip(_prefilled(target, PROMPTS), news, strict=True)
    ]
    got = batched_forward(pm, caches, news)
    for ref, out in zip(reference, got, strict=True):
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    # Roll back different amounts (ragged acceptance), then a second ragged pass.
    for cache, n in zip(caches, [0, 1, 2, 0, 1, 3], strict=True):
        cache.crop(cache.length - n)
    news2 = [[3], [3, 4, 5], [7], [8, 8], [9, 9, 9, 9, 9], [1]]
    got2 = batched_forward(pm, caches, news2)
    for prompt, new, crop, new2, out in zip(
        PROMPTS, news, [0, 1, 2, 0, 1, 3], news2, got2, strict=True
    ):
        fresh = target.forward(target.new_cache(), prompt + new[: len(new) - crop] + new2)
        torch.testing.assert_close(out, fresh[-len(new2) :], atol=1e-4, rtol=0)
    hole.release()


def test_slots_stay_compact_and_capacity_grows(target) -> None:
    pool = KVPool(target, slots=2, capacity=8)
    a, b = pool.new_cache(), pool.new_cache()
    with pytest.raises(RuntimeError, match="in use"):
        pool.new_cache()
    pool.keys[0][1, :, :3] = 7.0
    b.length = 3
    a.release()
    a.release()  # idempotent
    assert (b.slot, pool.in_use) == (0, 1)  # b moved into the hole, with its keys
    assert bool((pool.keys[0][0, :, :3] == 7.0).all())
    c = pool.new_cache()
    assert c.slot == 1
    del b  # dropped without release(): the finalizer frees its slot
    assert (c.slot, pool.in_use) == (0, 1)
    pool.keys[0][0, :, :5] = 1.0
    pool.reserve(20)
    assert pool.capacity >= 20 and bool((pool.keys[0][0, :, :5] == 1.0).all())


def test_models_that_cannot_be_batched_run_one_by_one() -> None:
    table = TableModel(11, seed=0)
    assert pooled(table, slots=4) is table
    caches = [table.new_cache(), table.new_cache()]
    rows = batched_forward(table, caches, [[1, 2], [3]])
    assert [r.shape[0] for r in rows] == [2, 1]
    assert [c.length for c in caches] == [2, 1]


def test_batched_drafts_equal_sequential_drafts(target) -> None:
    draft = noisy_copy(target)
    pooled_draft = pooled(draft, slots=8)
    batched = [DraftModelDrafter(pooled_draft, target=target).start() for _ in PROMPTS]
    alone = [DraftModelDrafter(draft, target=target).start() for _ in PROMPTS]
    params = [SamplingParams()] * len(PROMPTS)
    gens = [torch.Generator() for _ in PROMPTS]
    ks = [4, 1, 0, 3, 4, 2]
    contexts = [list(p) for p in PROMPTS]
    for _ in range(3):  # successive calls reconcile each cache with a grown context
        got = propose_batch(batched, contexts, ks, params, gens)
        for proposer, context, k, draft_out in zip(alone, contexts, ks, got, strict=True):
            want = proposer.propose(
                context, k, params=SamplingParams(), generator=torch.Generator()
            )
            assert draft_out.tokens == want.tokens
        contexts = [c + d.tokens[:1] + [9] for c, d in zip(contexts, got, strict=True)]


# Every pass costs one target step whatever its length; a draft-model step costs 0.2 of
# one. A prompt lookup then beats the draft model wherever it finds a continuation.
LOOKUP_WINS = CostModel(c_verify=(1.0,) * 9, c_draft=0.2, target_step_seconds=1.0)


@pytest.mark.parametrize("adaptive", [False, True])
def test_batched_hybrid_drafts_equal_sequential_drafts(target, adaptive, monkeypatch) -> None:
    widths = []  # sequences per draft-model pass

    def counting(model, caches, tokens, **kw):
        widths.append(len(caches))
        return batched_forward(model, caches, tokens, **kw)

    monkeypatch.setattr(batching, "batched_forward", counting)
    draft = noisy_copy(target)
    pooled_draft = pooled(draft, slots=8)
    batched = [
        HybridDrafter(DraftModelDrafter(pooled_draft, target=target)).start() for _ in PROMPTS
    ]
    alone = [HybridDrafter(DraftModelDrafter(draft, target=target)).start() for _ in PROMPTS]
    if adaptive:  # the policy picks each pass's source and model draft length
        for proposer in batched + alone:
            proposer.attach_policy(AdaptiveDraftLength(LOOKUP_WINS))
    params = [SamplingParams()] * len(PROMPTS)
    gens = [torch.Generator() for _ in PROMPTS]
    ks = [4, 1, 0, 3, 4, 2]
    contexts = [list(p) for p in PROMPTS]
    sources = set()
    for _ in range(3):
        got = propose_batch(batched, contexts, ks, params, gens)
        for proposer, context, k, draft_out in zip(alone, contexts, ks, got, strict=True):
            want = proposer.propose(
                context, k, params=SamplingParams(), generator=torch.Generator()
            )
            assert (draft_out.tokens, draft_out.free) == (want.tokens, want.free)
            if draft_out.tokens:
                sources.add("lookup" if draft_out.free else "model")
        contexts = [c + d.tokens[:1] + [9] for c, d in zip(contexts, got, strict=True)]
    assert sources == {"lookup", "model"}
    assert max(widths) > 1  # the model drafts of several hybrid sequences ran as one batch
    assert pooled_draft.pool.in_use == len(PROMPTS)  # one draft cache per hybrid sequence


def _collect_updates(scheduler, requests, *, stop: bool = True) -> list[list[Update]]:
    """Submit requests, run until each has finished or failed; every request's updates.
    ``stop=False`` leaves the scheduler running for more requests."""
    results: dict[int, list[Update]] = {i: [] for i in range(len(requests))}
    done = threading.Semaphore(0)

    def deliver_for(i):
        def deliver(update: Update) -> None:
            results[i].append(update)
            if update.finish_reason is not None or update.error is not None:
                done.release()

        return deliver

    if not scheduler.alive:
        scheduler.start()
    try:
        for i, request in enumerate(requests):
            request.deliver = deliver_for(i)
            scheduler.submit(request)
        for _ in requests:
            assert done.acquire(timeout=60)
    finally:
        if stop:
            scheduler.stop()
    return [results[i] for i in range(len(requests))]


def _run_scheduler(scheduler, requests, *, stop: bool = True):
    """Submit requests, run to completion, return (text, finish, stats, ids) per request."""
    out = []
    for updates in _collect_updates(scheduler, requests, stop=stop):
        assert updates[-1].error is None, updates[-1].error
        text, ids = "".join(u.text for u in updates), [t for u in updates for t in u.token_ids]
        out.append((text, updates[-1].finish_reason, updates[-1].stats, ids))
    return out


def _request(prompt, *, max_tokens=24, stop=(), drafter=None, num_draft_tokens=None, **sampling):
    return GenerationRequest(
        prompt_ids=list(prompt),
        params=SamplingParams(**sampling),
        max_tokens=max_tokens,
        stop=list(stop),
        deliver=lambda update: None,
        drafter=drafter,
        num_draft_tokens=num_draft_tokens,
    )


@pytest.mark.parametrize("drafter_kind", ["model", "prompt-lookup", "hybrid", "none"])
def test_greedy_batch_equals_each_request_alone(target, lookup_prompts, drafter_kind) -> None:
    drafter = {
        "model": DraftModelDrafter(noisy_copy(target), target=target),
        "prompt-lookup": PromptLookupDrafter(),
        "hybrid": HybridDrafter(DraftModelDrafter(noisy_copy(target), target=target)),
        "none": None,
    }[drafter_kind]
    lengths = [24, 5, 17, 30, 1, 12]
    scheduler = Scheduler(target, drafter, max_batch=4, max_queue=16, num_draft_tokens=3)
    results = _run_scheduler(
        scheduler,
        [_request(p, max_tokens=n) for p, n in zip(lookup_prompts, lengths, strict=True)],
    )
    drafted = free = 0
    for prompt, n, (text, finish, stats, _) in zip(lookup_prompts, lengths, results, strict=True):
        alone = generate(target, None, prompt, max_new_tokens=n)
        assert text == alone.text
        assert finish == ("length" if alone.finish_reason == "length" else "stop")
        assert stats.new_tokens == len(alone.token_ids)
        drafted += stats.drafted
        free += stats.free_drafted
    if drafter_kind == "model":
        assert drafted > 0 and free == 0
    if drafter_kind == "hybrid":  # both sources: lookup where the context repeats, else the model
        assert drafted > free > 0
    pools = [scheduler.target, getattr(scheduler.drafter, "model", None)]
    assert all(p.pool.in_use == 0 for p in pools if isinstance(p, PooledModel))


@pytest.mark.parametrize("drafter_kind", ["model", "hybrid", "none"])
def test_continued_conversations_reuse_their_cached_prefixes(target, drafter_kind) -> None:
    """Turn 2 of two conversations, submitted together with a fresh prompt: each continued
    one starts from its own first turn's caches (the draft model's too) and every output
    equals the request alone; kept prefixes hold no KV slot."""
    draft = DraftModelDrafter(noisy_copy(target), target=target)
    drafter = {"model": draft, "hybrid": HybridDrafter(draft), "none": None}[drafter_kind]
    scheduler = Scheduler(
        target, drafter, max_batch=4, max_queue=16, num_draft_tokens=3, prefix_cache=3
    )
    firsts = [PROMPTS[0], PROMPTS[3]]
    turn1 = _run_scheduler(scheduler, [_request(p, max_tokens=10) for p in firsts], stop=False)
    seconds = [p + ids + [9, 9, 4] for p, (_, _, _, ids) in zip(firsts, turn1, strict=True)]
    fresh = PROMPTS[2]
    turn2 = _run_scheduler(scheduler, [_request(p, max_tokens=14) for p in [*seconds, fresh]])
    for prompt, (text, _, stats, ids) in zip([*seconds, fresh], turn2, strict=True):
        alone = generate(target, None, prompt, max_new_tokens=14)
        assert ids == alone.token_ids and text == alone.text
        if prompt is fresh:
            assert stats.cached_prompt_tokens == 0
        else:  # the first turn's prompt and answer, but its last token (never fed)
            assert stats.cached_prompt_tokens == len(prompt) - 3 - 1
            if drafter_kind != "none":
                assert stats.drafted > 0
    assert len(scheduler.prefix) == 3
    pools = [scheduler.target, getattr(scheduler.drafter, "model", None)]
    assert all(p.pool.in_use == 0 for p in pools if isinstance(p, PooledModel))


def test_kv_pool_detach_and_attach_round_trip(target) -> None:
    model = pooled(target, slots=2)
    assert isinstance(model, PooledModel)
    cache = model.new_cache()
    model.forward(cache, PROMPTS[3])
    want = model.forward(cache, [5, 6])  # scored on top of the prompt
    cache.crop(len(PROMPTS[3]))
    kept = model.detach_cache(cache)
    assert model.pool.in_use == 0 and kept.length == len(PROMPTS[3])
    other = model.new_cache()
    model.forward(other, [1, 2, 3])  # a neighbour in slot 0
    back = model.attach_cache(kept)
    assert back.slot == 1 and back.length == len(PROMPTS[3])
    torch.testing.assert_close(model.forward(back, [5, 6]), want, atol=1e-5, rtol=0)
    back.release()
    kept.crop(4)
    again = model.attach_cache(kept)
    assert again.length == 4 and model.pool.in_use == 2


def _draft_model_server(target) -> Scheduler:
    """A scheduler with a (noisy copy) draft model, batches of 4, draft length 8."""
    drafter = DraftModelDrafter(noisy_copy(target), target=target)
    return Scheduler(target, drafter, max_batch=4, max_queue=16, num_draft_tokens=8)


def test_hybrid_requests_under_the_cost_policy_equal_plain_decoding(
    target, lookup_prompts, monkeypatch
) -> None:
    """Requests pick hybrid on a draft-model server with -k auto: each gets its own
    adaptive policy that picks lookup or the draft model per pass (a fixed-k hybrid request
    gets none), side by side with the other drafters; greedy output equals plain decoding."""
    scheduler = _draft_model_server(target)
    hybrid, model = scheduler.drafters["hybrid"], scheduler.drafters["model"]
    assert isinstance(hybrid, HybridDrafter) and isinstance(model.model, PooledModel)
    assert hybrid.model is model.model  # one draft-model pool for both
    # Passes cost the same at any length, draft-model steps 0.2 of one (as LOOKUP_WINS).
    costs = BatchCosts([1, 64], [1.0, 1.0], draft_batch=[1, 8], draft_seconds=[0.2, 0.2])
    scheduler.policy = BatchCostPolicy(costs, max_k=8)
    assert scheduler.policy.sequence_costs() == LOOKUP_WINS
    monkeypatch.setattr(scheduler.policy, "observe", lambda **kw: None)  # keep these costs
    observed: list[tuple[int, int, bool, int]] = []
    observe = AdaptiveDraftLength.observe

    def record(self, drafted, accepted, *, free=False):
        observed.append((drafted, accepted, free, id(self)))
        observe(self, drafted, accepted, free=free)

    monkeypatch.setattr(AdaptiveDraftLength, "observe", record)
    picks = [("hybrid", None), ("model", None), ("hybrid", 3), ("hybrid", None), (None, None),
             ("prompt-lookup", None)]  # fmt: skip
    lengths = [24, 5, 17, 30, 12, 12]
    requests = [
        _request(p, max_tokens=n, drafter=d, num_draft_tokens=k)
        for p, n, (d, k) in zip(lookup_prompts, lengths, picks, strict=True)
    ]
    results = _run_scheduler(scheduler, requests)
    for prompt, n, (text, _, stats, _) in zip(lookup_prompts, lengths, results, strict=True):
        assert text == generate(target, None, prompt, max_new_tokens=n).text
        assert stats.free_drafted <= stats.drafted
    assert results[2][2].free_drafted > 0  # the fixed-k hybrid took lookups where it could
    assert len({policy for *_, policy in observed}) == 2  # the two auto hybrid requests only
    drafted = {free for d, _, free, _ in observed if d > 0}
    assert drafted == {True, False}  # the policies picked both sources
    assert model.model.pool.in_use == 0 and scheduler.target.pool.in_use == 0
    # A retired hybrid sequence gives its draft-model slot back at once (not when collected).
    seq = start_sequence(
        scheduler.target, hybrid, [1, 2], params=SamplingParams(), max_new_tokens=4
    )
    assert model.model.pool.in_use == 1
    _free(seq)
    assert model.model.pool.in_use == 0 and scheduler.target.pool.in_use == 0


def test_cost_policy_lets_a_hybrid_draft_by_lookup_where_the_model_does_not_pay(
    target, monkeypatch
) -> None:
    """Draft-model steps cost 5 target passes, so under -k auto a model draft never pays;
    hybrid requests still draft by prompt lookup wherever their context repeats, because
    the batch policy charges a sequence that will take a lookup no draft-model time."""
    scheduler = _draft_model_server(target)
    costs = BatchCosts([1, 64], [1.0, 1.0], draft_batch=[1, 8], draft_seconds=[5.0, 5.0])
    scheduler.policy = BatchCostPolicy(costs, max_k=8)
    monkeypatch.setattr(scheduler.policy, "observe", lambda **kw: None)  # keep these costs
    prompts, lengths = PROMPTS[:3], [24, 12, 20]
    requests = [
        _request(p, max_tokens=n, drafter="hybrid") for p, n in zip(prompts, lengths, strict=True)
    ]
    results = _run_scheduler(scheduler, requests)
    for prompt, n, (text, _, stats, _) in zip(prompts, lengths, results, strict=True):
        assert text == generate(target, None, prompt, max_new_tokens=n).text
        assert stats.drafted == stats.free_drafted  # the draft model never drafts
    assert sum(stats.free_drafted for _, _, stats, _ in results) > 0
    # The same costs without a lookup on the table: no speculation at all.
    assert scheduler.policy.choose([AcceptanceEstimate()], [8], [False]) == [0]
    assert scheduler.policy.choose([AcceptanceEstimate()], [8], [True]) != [0]
    lookup_only = scheduler.policy.choose([AcceptanceEstimate()] * 2, [8, 8], [True, False])
    assert lookup_only[0] > 0 and lookup_only[1] == 0  # the model sequence pads, drafts nothing


def test_stop_strings_and_seeded_sampling_in_a_batch(target) -> None:
    alone = generate(target, None, PROMPTS[0], max_new_tokens=20)
    start = next(i for i in range(3, 18) if alone.text[i : i + 2].isascii())
    stop = alone.text[start : start + 2]
    requests = [
        _request(PROMPTS[0], max_tokens=20, stop=[stop]),
        _request(PROMPTS[3], temperature=0.9, top_k=50, seed=7),
        _request(PROMPTS[3], temperature=0.9, top_k=50, seed=7),
        _request(PROMPTS[3], temperature=0.9, top_k=50, seed=8),
    ]
    drafter = DraftModelDrafter(noisy_copy(target), target=target)
    results = _run_scheduler(Scheduler(target, drafter, max_batch=4), requests)
    assert results[0][0] == alone.text[: alone.text.find(stop)] and results[0][1] == "stop"
    assert results[1][0] == results[2][0]  # same seed, same text, even side by side
    assert results[1][0] != results[3][0]


def _estimates(*alphas: float, fill: float = 1.0) -> list[AcceptanceEstimate]:
    return [AcceptanceEstimate(alpha=a, fill=fill) for a in alphas]


def test_sampling_in_a_batch_follows_the_target_distribution() -> None:
    """Sequences sampled side by side (ragged acceptance, batched draft model) are
    distributed exactly as the target's own sampling: total variation distance of
    N sequences of 3 tokens below the 99.9th percentile of exact sampling's."""
    vocab, length, samples, prompt = 5, 3, 1500, [1, 2, 0, 1]
    target = tiny_llama(seed=3, vocab_size=vocab)
    draft = tiny_llama(seed=3, vocab_size=vocab)
    with torch.no_grad():
        for p in draft.hf.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    params = SamplingParams(temperature=1.0)
    exact = {}
    for seq in itertools.product(range(vocab), repeat=length):
        logits = target.forward(target.new_cache(), prompt + list(seq))[len(prompt) - 1 : -1]
        exact[seq] = float(warp(logits, params)[range(length), list(seq)].prod())
    scheduler = Scheduler(
        target, DraftModelDrafter(draft, target=target), max_batch=16, max_queue=samples,
        num_draft_tokens=2,
    )  # fmt: skip
    requests = [
        _request(prompt, max_tokens=length, temperature=1.0, seed=i) for i in range(samples)
    ]
    results = _run_scheduler(scheduler, requests)
    assert sum(r[2].drafted for r in results) > sum(r[2].accepted for r in results) > 0
    counts = collections.Counter(tuple(r[3]) for r in results)
    keys = list(exact)
    probs = np.array([exact[k] for k in keys])
    probs /= probs.sum()
    freq = np.array([counts[k] for k in keys]) / samples
    tv = 0.5 * np.abs(freq - probs).sum()
    sims = np.random.default_rng(0).multinomial(samples, probs, size=2000) / samples
    threshold = np.quantile(0.5 * np.abs(sims - probs).sum(axis=1), 0.999)
    assert tv < threshold, (tv, threshold)


def test_cost_policy_drafts_where_it_pays() -> None:
    # A pass of up to 4 rows costs the same as one; beyond that each row costs a full pass.
    costs = BatchCosts(target_rows=[1, 4, 8], target_seconds=[1.0, 1.0, 5.0])
    policy = BatchCostPolicy(costs, max_k=8)
    assert policy.choose(_estimates(0.9), [8]) == [3]  # 1 + .9 + .81 + .73 tokens in one pass
    assert policy.choose(_estimates(0.9, 0.1), [8, 8]) == [1, 1]  # one k per (padded) batch
    assert policy.choose(_estimates(0.9, 0.9), [8, 0]) == [1, 0]
    assert policy.choose(_estimates(0.9, 0.9, 0.9, 0.9), [8] * 4) == [0] * 4  # nothing pays
    assert policy.choose(_estimates(0.9), [0]) == [0]
    assert policy.choose(_estimates(0.9, fill=0.02), [8]) == [0]  # lookups that find nothing
    assert FixedDraftLength(4).choose(_estimates(0.1, 0.9), [2, 8]) == [2, 4]


def test_acceptance_estimates() -> None:
    estimate = AcceptanceEstimate()
    estimate.observe(asked=4, drafted=4, accepted=4)
    assert estimate.alpha > 0.6 and estimate.fill == 1.0
    estimate.observe(asked=4, drafted=0, accepted=0)
    assert estimate.fill < 1.0
    before = estimate.alpha
    estimate.observe(asked=4, drafted=4, accepted=0)  # one observation: the first rejection
    assert estimate.alpha < before
    low = AcceptanceEstimate(alpha=0.1, fill=0.1)
    for _ in range(100):
        low.observe(asked=0, drafted=0, accepted=0)  # undrafted passes: back to the priors
    assert low.alpha == pytest.approx(0.6, abs=0.01) and low.fill == pytest.approx(1.0, abs=0.01)


def test_costs_learn_from_timed_passes() -> None:
    costs = BatchCosts(target_rows=[1, 4, 8], target_seconds=[1.0, 1.0, 5.0])
    policy = BatchCostPolicy(costs, max_k=4)
    assert policy.choose(_estimates(0.9), [8]) == [3]
    for _ in range(20):  # 4-row passes turn out to cost 4 s, not 1 s: drafting no longer pays
        policy.observe(rows=4, seconds=4.0, draft_lengths=[3], draft_seconds=0.0)
    assert costs.target(4) == pytest.approx(4.0, rel=0.05)
    assert costs.target(1) == 1.0
    assert policy.choose(_estimates(0.9), [8]) == [0]
    draft = BatchCosts([1, 2], [1.0, 1.0], draft_batch=[1, 2], draft_seconds=[0.1, 0.1])
    assert draft.draft([2, 1]) == pytest.approx(0.2)
    draft.learn(rows=2, seconds=1.0, draft_lengths=[2, 1], draft_seconds=0.4)
    assert draft.draft([2, 1]) > 0.2


def test_measured_costs_cover_the_batch(target) -> None:
    pm = pooled(target, slots=4)
    costs = measure_batch_costs(pm, pooled(target, slots=4), max_batch=4, max_k=2)
    assert costs.target_rows[0] == 1 and costs.target_rows[-1] == 12
    assert costs.target_seconds == sorted(costs.target_seconds)
    assert costs.draft_batch == [1, 2, 4]
    assert pm.pool.in_use == 0


def test_a_failing_first_token_fails_only_its_request(target, monkeypatch) -> None:
    """An error while a new sequence's prompt pass or first token is handled reaches that
    request as an error; the worker keeps serving the others."""
    import verispec.server.scheduler as scheduler_module

    real_forward, real_finish = scheduler_module.batched_forward, scheduler_module.finish_step

    def forward(model, caches, tokens, **kw):
        if kw.get("num_logits") == 1 and PROMPTS[3] in tokens:
            raise RuntimeError("out of memory (simulated)")
        return real_forward(model, caches, tokens, **kw)

    def finish(target_, seq, draft, rows, **kw):
        if kw.get("prompt") and seq.tokens == PROMPTS[0]:
            raise ValueError("bad first token (simulated)")
        return real_finish(target_, seq, draft, rows, **kw)

    monkeypatch.setattr(scheduler_module, "batched_forward", forward)
    monkeypatch.setattr(scheduler_module, "finish_step", finish)
    groups = scheduler_module._prefill_groups  # one prompt pass per sequence here
    monkeypatch.setattr(scheduler_module, "_prefill_groups", lambda items: groups(items, 1))
    scheduler = Scheduler(target, None, max_batch=4, max_queue=16, num_draft_tokens=3)
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[5], PROMPTS[2]]
    got = _collect_updates(scheduler, [_request(p, max_tokens=6) for p in prompts])
    assert "bad first token" in (got[0][-1].error or "")
    assert "prompt pass failed" in (got[1][-1].error or "")
    for i, prompt in ((2, PROMPTS[5]), (3, PROMPTS[2])):
        assert got[i][-1].error is None
        assert (
            "".join(u.text for u in got[i]) == generate(target, None, prompt, max_new_tokens=6).text
        )
    assert scheduler.target.pool.in_use == 0
