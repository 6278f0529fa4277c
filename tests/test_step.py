"""The one decode step (``verispec.engine.step``) on batches, and the scheduler around it.

Whatever the batch, every sequence's greedy output equals plain decoding of it alone,
for every drafter; sampled sequences side by side follow the target's distribution.
"""

from __future__ import annotations

import collections
import importlib.util
import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TableModel, tiny_llama
from server_support import chat_tokenizer, noisy_copy

from verispec import (
    CostModel,
    Draft,
    DrafterError,
    DraftModelDrafter,
    DraftRequest,
    PromptLookupDrafter,
    StatelessDrafter,
    generate,
)
from verispec.drafting import drafter_menu
from verispec.engine import prompt_pass, start_sequence, step
from verispec.sampling import SamplingParams, warp
from verispec.server.scheduler import GenerationRequest, Scheduler, Update

ROOT = Path(__file__).resolve().parent.parent
# Verifying up to 32 positions costs what one does: -k auto drafts long wherever it pays.
FLAT = CostModel(c_verify=(1.0,) * 33, c_draft=0.05)
PROMPTS = [
    [5, 17, 99, 3, 5, 17, 42, 8, 5, 17],
    [1],
    [200, 201, 202, 203, 200, 201],
    list(range(30, 70)),
    [7, 7, 7, 7, 7, 7, 7, 7],
    [120, 3, 44],
    [9, 8, 7, 9, 8],
    list(range(100, 112)) * 2,
]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=0, tokenizer=chat_tokenizer())


@pytest.fixture(scope="module")
def menu(target):
    menu = drafter_menu(target, noisy_copy(target))
    # A user's drafter (the README's example): the target's own greedy continuations of
    # two prompts, so that it is often right.
    phrases = [p + generate(target, None, p, max_new_tokens=12).token_ids for p in PROMPTS[:2]]
    menu["phrases"] = load_example("phrase_drafter").PhraseDrafter(phrases)
    return menu


def run_batch(target, drafter, prompts, lengths, *, k="auto", costs=FLAT, params=None):
    """Generate every prompt side by side through ``step``; the sequences."""
    params = params or SamplingParams()
    seqs = [
        start_sequence(
            target,
            drafter,
            prompt,
            params=params,
            max_new_tokens=n,
            num_draft_tokens=k,
            costs=costs,
        )
        for prompt, n in zip(prompts, lengths, strict=True)
    ]
    prompt_pass(target, seqs)
    while running := [s for s in seqs if s.finish_reason is None]:
        step(target, running)
    return seqs


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("drafter_name", ["model", "prompt-lookup", "hybrid", "none", "phrases"])
@pytest.mark.parametrize("k", [3, "auto"])
def test_greedy_batches_equal_each_sequence_alone(target, menu, batch, drafter_name, k) -> None:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    lengths = [(7 * i) % 23 + 1 for i in range(batch)]
    seqs = run_batch(target, menu[drafter_name], prompts, lengths, k=k)
    for seq, prompt, n in zip(seqs, prompts, lengths, strict=True):
        alone = generate(target, None, prompt, max_new_tokens=n)
        assert seq.generated == alone.token_ids, (drafter_name, prompt)
    drafted = sum(s.stats.drafted for s in seqs)
    accepted = sum(s.stats.accepted for s in seqs)
    if drafter_name != "none" and batch > 1:
        assert drafted > 0 and accepted > 0
    if drafter_name == "hybrid" and batch == 16 and k == 3:  # both sources in one batch
        free = sum(s.stats.free_drafted for s in seqs)
        assert drafted > free > 0


def test_draft_model_runs_in_lockstep_across_the_batch(target) -> None:
    """One batched draft-model pass per draft step for the whole batch, not one per
    sequence: the passes equal those of the longest draft, not their sum."""
    calls = []

    class Counting(type(target)):  # the same model, counting its batched passes
        def forward_batch(self, caches, tokens, **kw):
            calls.append(len(caches))
            return super().forward_batch(caches, tokens, **kw)

    draft = noisy_copy(target)
    draft.__class__ = Counting
    drafter = DraftModelDrafter(draft, target=target)
    seqs = run_batch(target, drafter, PROMPTS[:4], [12] * 4, k=4, costs=None)
    assert max(calls) == 4  # the four sequences drafted together
    passes = sum(s.stats.target_passes for s in seqs)
    assert len(calls) < passes * 4  # fewer draft passes than sequence-steps


def test_stats_of_a_batch_of_one_equal_the_library(target, menu) -> None:
    """``generate`` is ``step`` on a batch of one: the same passes, drafts and acceptance."""
    for name in ("model", "hybrid", "prompt-lookup"):
        (seq,) = run_batch(target, menu[name], [PROMPTS[3]], [30], k=4, costs=None)
        alone = generate(target, menu[name], PROMPTS[3], max_new_tokens=30, num_draft_tokens=4)
        assert seq.generated == alone.token_ids
        for field in ("target_passes", "drafted", "accepted", "free_drafted", "hinted_drafted"):
            assert getattr(seq.stats, field) == getattr(alone.stats, field), (name, field)


def test_siblings_are_verified_in_batches(target) -> None:
    """Token trees through the batched pass: siblings proposed and kept, output exact."""
    drafter = DraftModelDrafter(noisy_copy(target, noise=0.03), target=target)
    prompts = PROMPTS[:6]
    seqs = run_batch(target, drafter, prompts, [24] * 6)
    assert sum(s.stats.siblings for s in seqs) > 0
    for seq, prompt in zip(seqs, prompts, strict=True):
        assert seq.generated == generate(target, None, prompt, max_new_tokens=24).token_ids


def _draft_probs(draft: TableModel, context: list[int]) -> torch.Tensor:
    return torch.softmax(draft.logits_after(context), -1)


class SampledTableDrafter(StatelessDrafter):
    """Samples from a table model's distribution; ``lie=True`` reports another one
    (the negative control: rejection sampling then corrects with the wrong q)."""

    name = "table drafter"

    def __init__(self, draft: TableModel, *, lie: bool = False) -> None:
        self.draft, self.lie = draft, lie

    def propose(self, request: DraftRequest) -> Draft:
        context, tokens, probs = list(request.context), [], []
        for _ in range(request.k):
            p = _draft_probs(self.draft, context)
            token = int(torch.multinomial(p, 1, generator=request.generator))
            reported = torch.full_like(p, 1.0 / len(p)) if self.lie else p
            tokens.append(token)
            probs.append(reported)
            context.append(token)
        return Draft(tokens=tokens, probs=torch.stack(probs))


@pytest.mark.parametrize("lie", [False, True])
def test_sampling_in_batches_of_four_follows_the_target_distribution(lie) -> None:
    """Sequences sampled four at a time through ``step`` (ragged acceptance) are
    distributed as the target's own sampling: the total variation distance of N
    sequences of 3 tokens stays below the 99.9th percentile of exact sampling's (so an
    exact sampler fails 1 time in 1000). The negative control, a drafter that reports a
    uniform q while sampling another, must exceed it."""
    vocab, length, samples, prompt = 4, 3, 4000, [1, 2]
    target = TableModel(vocab, seed=11)
    drafter = SampledTableDrafter(TableModel(vocab, seed=12), lie=lie)
    params = SamplingParams(temperature=1.0)
    exact = {}
    for seq in itertools.product(range(vocab), repeat=length):
        logits = target.forward(target.new_cache(), prompt + list(seq))[len(prompt) - 1 : -1]
        exact[seq] = float(warp(logits, params)[range(length), list(seq)].prod())
    outputs = []
    for first in range(0, samples, 4):
        seqs = [
            start_sequence(
                target,
                drafter,
                prompt,
                params=SamplingParams(temperature=1.0, seed=first + i),
                max_new_tokens=length,
                num_draft_tokens=2,
            )
            for i in range(4)
        ]
        prompt_pass(target, seqs)
        while running := [s for s in seqs if s.finish_reason is None]:
            step(target, running)
        outputs.extend(tuple(s.generated) for s in seqs)
    counts = collections.Counter(outputs)
    keys = list(exact)
    probs = np.array([exact[k] for k in keys])
    probs /= probs.sum()
    freq = np.array([counts[k] for k in keys]) / samples
    tv = 0.5 * np.abs(freq - probs).sum()
    sims = np.random.default_rng(0).multinomial(samples, probs, size=2000) / samples
    threshold = np.quantile(0.5 * np.abs(sims - probs).sum(axis=1), 0.999)
    if lie:
        assert tv > threshold, (tv, threshold)
    else:
        assert tv < threshold, (tv, threshold)


class BadDrafter(StatelessDrafter):
    """Misbehaves on sequences whose context contains ``trigger``."""

    def __init__(self, how: str, trigger: int) -> None:
        self.how, self.trigger = how, trigger
        self.name = f"bad ({how})"

    def propose(self, request: DraftRequest) -> Draft:
        if self.trigger not in request.context:
            return Draft(tokens=[])
        if self.how == "raises":
            raise RuntimeError("the drafter broke")
        if self.how == "out of vocabulary":
            return Draft(tokens=[10**6])
        return Draft(tokens=[1] * (request.k + 1))  # more than asked


@pytest.mark.parametrize("how", ["raises", "out of vocabulary", "too many"])
def test_a_bad_drafter_fails_only_its_sequences(target, how) -> None:
    drafter = BadDrafter(how, trigger=120)  # PROMPTS[5] holds 120
    with pytest.raises(DrafterError, match="bad"):
        generate(target, drafter, PROMPTS[5], max_new_tokens=8)
    seqs = run_batch(target, drafter, PROMPTS[3:7], [8] * 4, k=2, costs=None)
    for seq, prompt in zip(seqs, PROMPTS[3:7], strict=True):
        if 120 in prompt:
            assert seq.finish_reason == "error" and "bad" in (seq.error or "")
        else:
            assert seq.generated == generate(target, None, prompt, max_new_tokens=8).token_ids


# -- the scheduler: admission, delivery and cancellation around the same step ----------


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


@pytest.mark.parametrize("drafter_name", ["model", "prompt-lookup", "hybrid", "none", "phrases"])
def test_scheduled_greedy_requests_equal_each_alone(target, menu, drafter_name) -> None:
    lengths = [24, 5, 17, 30, 1, 12]
    scheduler = Scheduler(
        target, menu, default=drafter_name, max_batch=4, num_draft_tokens="auto", costs=FLAT
    )
    prompts = PROMPTS[:6]
    results = _run_scheduler(
        scheduler, [_request(p, max_tokens=n) for p, n in zip(prompts, lengths, strict=True)]
    )
    for prompt, n, (text, finish, stats, _) in zip(prompts, lengths, results, strict=True):
        alone = generate(target, None, prompt, max_new_tokens=n)
        assert text == alone.text
        assert finish == ("length" if alone.finish_reason == "length" else "stop")
        assert stats.new_tokens == len(alone.token_ids)
    if drafter_name != "none":
        assert sum(r[2].drafted for r in results) > 0


def test_a_bad_drafter_ends_only_its_request(target, menu) -> None:
    drafters = {**menu, "bad": BadDrafter("raises", trigger=120)}
    scheduler = Scheduler(target, drafters, default="model", max_batch=4, num_draft_tokens=3)
    prompts = PROMPTS[3:7]
    got = _collect_updates(scheduler, [_request(p, max_tokens=10, drafter="bad") for p in prompts])
    for updates, prompt in zip(got, prompts, strict=True):
        if 120 in prompt:
            assert "drafter 'bad (raises)' failed" in (updates[-1].error or "")
        else:
            assert updates[-1].error is None
            ids = [t for u in updates for t in u.token_ids]
            assert ids == generate(target, None, prompt, max_new_tokens=10).token_ids


@pytest.mark.parametrize("drafter_name", ["model", "hybrid", "none"])
def test_continued_conversations_reuse_their_cached_prefixes(target, menu, drafter_name) -> None:
    """Turn 2 of two conversations, submitted together with a fresh prompt: each continued
    one starts from its own first turn's caches (the draft model's too) and every output
    equals the request alone."""
    scheduler = Scheduler(
        target, menu, default=drafter_name, max_batch=4, num_draft_tokens=3, prefix_cache=3
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
            if drafter_name != "none":
                assert stats.drafted > 0
    assert scheduler.prefix is not None and len(scheduler.prefix) == 3


def test_stop_strings_and_seeded_sampling_in_a_batch(target, menu) -> None:
    alone = generate(target, None, PROMPTS[0], max_new_tokens=20)
    start = next(i for i in range(3, 18) if alone.text[i : i + 2].isascii())
    stop = alone.text[start : start + 2]
    requests = [
        _request(PROMPTS[0], max_tokens=20, stop=[stop]),
        _request(PROMPTS[3], temperature=0.9, top_k=50, seed=7),
        _request(PROMPTS[3], temperature=0.9, top_k=50, seed=7),
        _request(PROMPTS[3], temperature=0.9, top_k=50, seed=8),
    ]
    results = _run_scheduler(Scheduler(target, menu, default="model", max_batch=4), requests)
    assert results[0][0] == alone.text[: alone.text.find(stop)] and results[0][1] == "stop"
    assert results[1][0] == results[2][0]  # same seed, same text, even side by side
    assert results[1][0] != results[3][0]


class FailingPrompts(TableModel):
    """A table model whose batched passes fail when a prompt holds ``poison``."""

    def __init__(self, *args, poison: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.poison = poison

    def forward_batch(self, caches, tokens, **kw):
        if any(self.poison in t and len(t) > 100 for t in tokens):
            raise RuntimeError("out of memory (simulated)")
        return super().forward_batch(caches, tokens, **kw)


def test_a_failing_prompt_pass_fails_only_its_requests() -> None:
    """An error in a prompt pass reaches the requests of that pass as an error; the worker
    keeps serving the others (prompts far apart in length get passes of their own)."""
    target = FailingPrompts(16, seed=2, poison=15)
    menu = {"none": None, "prompt-lookup": PromptLookupDrafter()}
    scheduler = Scheduler(target, menu, default="prompt-lookup", max_batch=4)
    prompts = [[1, 2, 3], [15] * 3000, [4, 5, 6, 7]]
    target.max_context = 4096
    got = _collect_updates(scheduler, [_request(p, max_tokens=6) for p in prompts])
    assert "prompt pass failed" in (got[1][-1].error or "")
    for i in (0, 2):
        assert got[i][-1].error is None
        ids = [t for u in got[i] for t in u.token_ids]
        assert ids == generate(target, None, prompts[i], max_new_tokens=6).token_ids


def test_hybrid_in_a_scheduled_batch_uses_lookup_and_model(target, menu) -> None:
    """The server's hybrid routes per sequence and pass as the library's does."""
    scheduler = Scheduler(target, menu, default="hybrid", max_batch=8, num_draft_tokens=4)
    prompts = [PROMPTS[4], PROMPTS[3], PROMPTS[0], PROMPTS[5]]  # [4]: lookup finds repeats
    results = _run_scheduler(scheduler, [_request(p, max_tokens=20) for p in prompts])
    free = sum(r[2].free_drafted for r in results)
    drafted = sum(r[2].drafted for r in results)
    assert drafted > free > 0


def test_the_readme_drafter_and_a_bad_drafter_served_over_http(target, menu) -> None:
    """The README's phrase drafter as a server's drafter: the official client's greedy
    output equals plain decoding. A drafter that raises ends just its request, with an
    error in OpenAI's shape (an error event in a stream); other requests go on."""
    from openai import APIError, OpenAI
    from server_support import serve

    from verispec.server.app import create_app

    drafters = {"none": None, "phrases": menu["phrases"]}
    scheduler = Scheduler(target, drafters, default="phrases", max_batch=4, num_draft_tokens=4)
    with serve(create_app(scheduler, model_name="m"), scheduler) as server:
        client = OpenAI(base_url=server.base_url, api_key="none")
        for prompt in PROMPTS[:3]:
            reply = client.completions.create(
                model="m", prompt=prompt, max_tokens=12, temperature=0
            )
            plain = generate(target, None, prompt, max_new_tokens=12)
            assert reply.choices[0].text == plain.text
            assert reply.model_extra["speculation"]["target_passes"] <= 12
        assert (
            sum(
                client.completions.create(
                    model="m", prompt=p, max_tokens=12, temperature=0
                ).model_extra["speculation"]["accepted"]
                for p in PROMPTS[:2]
            )
            > 0
        )  # its phrases are the target's own continuations of these prompts
    bad = {"none": None, "bad": BadDrafter("raises", trigger=120)}
    scheduler = Scheduler(target, bad, default="bad", max_batch=4, num_draft_tokens=2)
    with serve(create_app(scheduler, model_name="m"), scheduler) as server:
        client = OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
        with pytest.raises(APIError, match="drafter 'bad \\(raises\\)' failed"):
            client.completions.create(model="m", prompt=PROMPTS[5], max_tokens=8)
        stream = client.completions.create(model="m", prompt=PROMPTS[5], max_tokens=8, stream=True)
        with pytest.raises(APIError, match="drafter 'bad"):
            list(stream)
        fine = client.completions.create(model="m", prompt=PROMPTS[3], max_tokens=8, temperature=0)
        assert fine.choices[0].text == generate(target, None, PROMPTS[3], max_new_tokens=8).text
