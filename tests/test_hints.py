"""Hinted drafting: the draft model scores a prompt lookup's continuation in one pass and
keeps it as far as it agrees with its own tokens (``DraftRequest.hint``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import TableModel, plain_greedy
from test_tree import _pair

from verispec.drafting import DraftModelDrafter, DraftRequest
from verispec.drafting import model as drafters_module
from verispec.generate import generate
from verispec.models import HFModel
from verispec.policy.costs import CostModel
from verispec.sampling import SamplingParams

GREEDY = SamplingParams()
# Verification a little dearer per position, drafting cheap: long model drafts pay.
COSTS = CostModel(c_verify=tuple(1.0 + 0.05 * k for k in range(17)), c_draft=0.05)
CONTEXT = list(range(5, 45))


def _proposer(draft: Any, target: HFModel, *, trusted: bool) -> Any:
    proposer = DraftModelDrafter(draft, target=target).start()
    if trusted:
        proposer.hint_agreement = 1.0
    return proposer


def _draft(proposer: Any, k: int, hint: list[int] = (), context: list[int] = CONTEXT) -> Any:
    gen = torch.Generator().manual_seed(0)
    return proposer.propose(DraftRequest(context, k, GREEDY, gen, hint=hint))


@pytest.mark.parametrize("wrong_at", [None, 0, 3], ids=["right", "wrong-first", "wrong-fourth"])
def test_a_hinted_draft_equals_the_step_by_step_draft(counting, wrong_at: int | None) -> None:
    target, draft_model = _pair()
    k = 8
    plain = _draft(_proposer(draft_model, target, trusted=False), k)
    hint = list(plain.tokens[: k - 1])
    if wrong_at is not None:
        hint[wrong_at] = (hint[wrong_at] + 1) % target.vocab_size
    counted = counting(draft_model)
    proposer = _proposer(counted, target, trusted=True)
    hinted = _draft(proposer, k, hint)
    assert hinted.tokens == plain.tokens
    assert counted.fed[0] == len(CONTEXT) + len(hint)  # the context and the whole hint
    if wrong_at is None:
        # Every token read off the one pass: k - 1 hint rows and the row after them.
        assert len(counted.fed) == 1 and hinted.hinted == k
    else:
        # Rows up to the disagreement, then one step per remaining token.
        assert hinted.hinted == wrong_at + 1
        assert counted.fed[1:] == [1] * (k - wrong_at - 1)
    # The cache holds the context and all drafted tokens but the last, as step by step.
    assert proposer.cached == CONTEXT + plain.tokens[:-1]
    assert proposer.cache.length == len(proposer.cached)
    fresh = draft_model.new_cache()
    after = [*CONTEXT, *plain.tokens]
    expected = draft_model.forward(fresh, after, num_logits=1)[-1]
    got = draft_model.forward(proposer.cache, [plain.tokens[-1]], num_logits=1)[-1]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_hints_are_fed_only_while_they_agree_with_the_draft_model(counting) -> None:
    target, draft_model = _pair()
    counted = counting(draft_model)
    proposer = _proposer(counted, target, trusted=False)
    own = _draft(_proposer(draft_model, target, trusted=False), 8).tokens
    assert proposer.hint_agreement < drafters_module.HINT_MIN_AGREEMENT  # not trusted at first
    _draft(proposer, 8, own[:7])
    assert counted.fed[0] == len(CONTEXT)  # watched, not fed
    assert proposer.hint_agreement > drafters_module.HINT_MIN_AGREEMENT
    counted.fed.clear()
    _draft(proposer, 8, own[:7])
    assert counted.fed == [8]  # now fed: one pass for the whole draft
    wrong = [(t + 1) % target.vocab_size for t in own[:7]]
    for _ in range(4):  # hints that disagree at once stop being fed
        _draft(proposer, 8, wrong)
    counted.fed.clear()
    _draft(proposer, 8, wrong)
    assert proposer.hint_agreement < drafters_module.HINT_MIN_AGREEMENT
    assert counted.fed[0] == 1
    # Hints too short to pay are not fed either.
    proposer.hint_agreement = 1.0
    counted.fed.clear()
    _draft(proposer, 8, own[:1])
    assert counted.fed[0] == 1


def _counting_table(seed: int) -> TableModel:
    """A second-order Markov table over 16 tokens whose likeliest next token is mostly the
    current one plus 1 (random elsewhere): greedy output soon runs through all 16 tokens
    in a cycle, so the context repeats itself and lookup hints are long and right."""
    model = TableModel(16, seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    for cur in range(16):
        for prev in range(16):
            if torch.rand((), generator=gen) < 0.8:
                model.table[prev, cur, (cur + 1) % 16] += 8.0
    return model


def test_hybrid_greedy_with_hints_equals_plain_greedy(model_only_hybrid) -> None:
    # The draft model drafts every pass (a free lookup never wins the route here), with
    # the lookup's continuation as its hint: hinted drafts, accepted or not, across a
    # whole generation.
    target = _counting_table(1)
    draft = _counting_table(1)
    draft.table += 0.5 * torch.randn(draft.table.shape, generator=torch.Generator().manual_seed(2))
    drafter = model_only_hybrid(DraftModelDrafter(draft, target=target))
    hinted = rejected = 0
    for seed in range(3):
        ids = torch.randint(0, 16, (6,), generator=torch.Generator().manual_seed(seed)).tolist()
        result = generate(target, drafter, ids, max_new_tokens=64, num_draft_tokens=8)
        assert result.token_ids == plain_greedy(target, ids, 64)
        hinted += result.stats.hinted_drafted
        rejected += result.stats.drafted - result.stats.accepted
    assert hinted > 0 and rejected > 0  # hints were really fed; drafts were also rejected


def test_sample_preferring_keeps_the_distribution() -> None:
    """Empirical frequencies of 40,000 draws within 4.5 binomial standard deviations of
    the probabilities (a false alarm about once in 10^5 per token); the rule keeps the
    guess exactly as often as its probability."""
    probs = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1, 0.0])
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    for guess in (2, 5):  # a likely guess, and one the distribution excludes
        counts = torch.zeros(6)
        for _ in range(n):
            counts[drafters_module.sample_preferring(probs, guess, gen)] += 1
        sigma = (probs * (1 - probs) / n).sqrt()
        assert bool(((counts / n - probs).abs() <= 4.5 * sigma + 1e-9).all()), counts / n
    certain = torch.tensor([0.0, 1.0, 0.0])
    assert drafters_module.sample_preferring(certain, 1, gen) == 1


def test_sampled_hybrid_feeds_hints_too(model_only_hybrid) -> None:
    target = _counting_table(1)
    drafter = model_only_hybrid(DraftModelDrafter(_counting_table(1), target=target))
    result = generate(
        target, drafter, [3, 9, 1, 4], max_new_tokens=64, num_draft_tokens=8,
        temperature=0.3, seed=0,
    )  # fmt: skip
    assert result.stats.hinted_drafted > 0
