"""Greedy losslessness and the off-by-one cases of the decode loop, on tiny random models."""

from __future__ import annotations

import pytest
import torch
from helpers import TableModel, plain_greedy, tiny_llama

from verispec.drafting import (
    Draft,
    DraftModelDrafter,
    DraftRequest,
    HybridDrafter,
    PromptLookupDrafter,
    StatelessDrafter,
)
from verispec.engine import speculate
from verispec.errors import InvalidArgumentError, PromptTooLongError
from verispec.generate import generate
from verispec.sampling import SamplingParams

PROMPT = [5, 17, 99, 3, 5, 17, 42, 8, 5, 17]


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=0)


class HostileDrafter(StatelessDrafter):
    """Proposes, at every position, a token the target's greedy choice is not."""

    name = "hostile"

    def __init__(self, target) -> None:
        self.target = target

    def propose(self, request: DraftRequest) -> Draft:
        tokens = list(request.context)
        out = []
        for _ in range(request.k):
            best = int(self.target.forward(self.target.new_cache(), tokens)[-1].argmax())
            wrong = (best + 1) % self.target.vocab_size
            out.append(wrong)
            tokens.append(wrong)
        return Draft(tokens=out)


def _run(target, drafter, k: int, n: int = 40):
    return generate(target, drafter, PROMPT, max_new_tokens=n, num_draft_tokens=k)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_perfect_drafter_accepts_everything_and_matches_plain(target, k: int) -> None:
    reference = plain_greedy(target, PROMPT, 40)
    result = _run(target, DraftModelDrafter(target, target=target), k)
    assert result.token_ids == reference
    assert result.stats.acceptance_rate == 1.0
    # Every pass yields k + 1 tokens except where the length limit trims the draft.
    assert result.stats.target_passes <= -(-40 // (k + 1)) + 1


@pytest.mark.parametrize("k", [1, 4])
def test_hostile_drafter_accepts_nothing_and_matches_plain(target, k: int) -> None:
    reference = plain_greedy(target, PROMPT, 25)
    result = _run(target, HostileDrafter(target), k, n=25)
    assert result.token_ids == reference
    assert result.stats.accepted == 0 and result.stats.drafted > 0
    assert result.stats.target_passes == 25


@pytest.mark.parametrize("k", [2, 5])
def test_other_model_and_prompt_lookup_drafters_match_plain(target, k: int) -> None:
    reference = plain_greedy(target, PROMPT, 40)
    draft = tiny_llama(seed=1)
    model_drafter = DraftModelDrafter(draft, target=target)
    drafters = (model_drafter, PromptLookupDrafter(max_ngram=2), HybridDrafter(model_drafter))
    for drafter in drafters:
        result = _run(target, drafter, k)
        assert result.token_ids == reference, drafter.name
        if isinstance(drafter, PromptLookupDrafter):  # lookup drafts are free
            assert result.stats.free_drafted == result.stats.drafted > 0
    assert _run(target, None, 4).token_ids == reference


def test_draft_model_one_behind_after_full_accept(target) -> None:
    """After a fully accepted draft the draft cache lacks d_k and the bonus; it catches up."""
    drafter = DraftModelDrafter(target, target=target)
    events = list(speculate(target, drafter, PROMPT, max_new_tokens=9, num_draft_tokens=3))
    proposer = events[-1][1].proposer
    seq = events[-1][1]
    assert [len(e.tokens) for e, _ in events] == [1, 4, 4]  # the prompt pass gives one
    # The draft cache holds exactly the verified prefix it was last fed, and agrees with it.
    assert proposer.cached == seq.tokens[: len(proposer.cached)]
    assert proposer.cache.length == len(proposer.cached)


def test_crop_then_refeed_equals_fresh_prefill(target) -> None:
    tokens = [*PROMPT, 7, 9, 11, 13]
    cache = target.new_cache()
    target.forward(cache, [*tokens, 1, 2, 3])
    cache.crop(len(tokens) - 2)
    refed = target.forward(cache, tokens[-2:])
    fresh = target.forward(target.new_cache(), tokens)
    torch.testing.assert_close(refed, fresh[-2:], atol=1e-5, rtol=1e-5)


def _table_model_reaching_eos_late() -> TableModel:
    """A table model whose greedy run first meets its EOS token at position >= 3."""
    for seed in range(100):
        free = TableModel(8, seed=seed)
        run = plain_greedy(free, [0, 1], 30)
        late = [t for i, t in enumerate(run) if i >= 3 and t not in run[:i]]
        if late:
            return TableModel(8, seed=seed, eos=frozenset({late[0]}))
    raise AssertionError("no seed gives a late EOS")


def test_eos_inside_an_accepted_run_ends_there() -> None:
    model = _table_model_reaching_eos_late()
    reference = plain_greedy(model, [0, 1], 30)
    drafter = DraftModelDrafter(model, target=model)  # perfect: EOS arrives inside a full accept
    result = generate(model, drafter, [0, 1], max_new_tokens=30, num_draft_tokens=8)
    assert result.token_ids == reference
    assert result.token_ids[-1] in model.eos_token_ids and result.finish_reason == "eos"
    assert result.stats.target_passes == 2  # the prompt pass, then EOS inside the first run


@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_max_new_tokens_is_exact(target, n: int) -> None:
    result = generate(
        target,
        DraftModelDrafter(target, target=target),
        PROMPT,
        max_new_tokens=n,
        num_draft_tokens=4,
    )
    assert len(result.token_ids) == n and result.finish_reason == "length"
    assert result.stats.new_tokens == n


def test_context_window_is_never_exceeded() -> None:
    model = TableModel(5, seed=0)
    model.max_context = 20
    result = generate(
        model,
        DraftModelDrafter(model, target=model),
        [1] * 15,
        max_new_tokens=50,
        num_draft_tokens=8,
    )
    assert len(result.token_ids) == 5 and result.finish_reason == "length"
    with pytest.raises(PromptTooLongError, match="context window of 20"):
        generate(model, None, [1] * 20, max_new_tokens=5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"num_draft_tokens": 0}, "num_draft_tokens"),
        ({"num_draft_tokens": 1000}, "num_draft_tokens"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_arguments_raise_typed_errors(target, kwargs, match) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        generate(target, None, PROMPT, **kwargs)
    with pytest.raises(InvalidArgumentError, match="empty"):
        generate(target, None, [])


def test_statistics_add_up(target) -> None:
    draft = tiny_llama(seed=1)
    result = generate(
        target,
        DraftModelDrafter(draft, target=target),
        PROMPT,
        max_new_tokens=30,
        num_draft_tokens=4,
    )
    s = result.stats
    assert s.new_tokens == len(result.token_ids) == 30
    assert (
        s.new_tokens == s.accepted + s.target_passes
    )  # n accepted + 1 per pass (no truncation here)
    assert sum(s.drafted_by_position) == s.drafted and sum(s.accepted_by_position) == s.accepted
    # Every target pass is counted at its draft length; a draft model pays for all of them.
    assert sum(s.passes_by_draft_length) == s.target_passes
    assert sum(j * n for j, n in enumerate(s.passes_by_draft_length)) == s.drafted
    assert s.free_drafted == 0
    assert s.time_total >= s.time_draft + s.time_verify


def test_sampling_with_a_seed_repeats(target) -> None:
    draft = tiny_llama(seed=1)
    drafter = DraftModelDrafter(draft, target=target)
    kwargs = dict(max_new_tokens=20, num_draft_tokens=3, temperature=0.9, top_p=0.9, seed=11)
    a = generate(target, drafter, PROMPT, **kwargs)
    b = generate(target, drafter, PROMPT, **kwargs)
    assert a.token_ids == b.token_ids
    assert SamplingParams(temperature=0.9).greedy is False


def test_the_prompt_pass_gives_the_first_token(target, counting) -> None:
    """No one-token pass stands between the prompt and the first token: plain decoding of
    n tokens is one pass over the whole prompt, then n - 1 one-token passes."""
    counted = counting(target)
    result = generate(counted, None, PROMPT, max_new_tokens=5)
    assert counted.fed == [len(PROMPT), 1, 1, 1, 1]
    assert result.token_ids == plain_greedy(target, PROMPT, 5)
    stats = result.stats
    assert stats.target_passes == 5 and stats.passes_by_draft_length == [5]
    assert 0 < stats.time_prefill == stats.time_to_first_token <= stats.time_total
    counted.fed.clear()
    one = generate(counted, None, [7], max_new_tokens=1)  # a one-token prompt, one new token
    assert counted.fed == [1] and one.finish_reason == "length" and len(one.token_ids) == 1
    # Speculative decoding drafts after the prompt pass's token: [t1, d1, d2] next.
    counted.fed.clear()
    drafter = DraftModelDrafter(tiny_llama(seed=0), target=counted)
    generate(counted, drafter, PROMPT, max_new_tokens=4, num_draft_tokens=2)
    assert counted.fed[:2] == [len(PROMPT), 3]
