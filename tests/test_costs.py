"""The cost model and the adaptive draft length."""

from __future__ import annotations

import pytest
from helpers import TableModel, plain_greedy, tiny_llama

from verispec.costs import AdaptiveDraftLength, CostModel, cached_costs, expected_tokens
from verispec.drafters import DraftModelDrafter
from verispec.generate import generate
from verispec.verify import greedy_verify  # noqa: F401  (the policy never touches verification)

FLAT = CostModel(c_verify=(1.0,) * 17, c_draft=0.05)  # verification as cheap as one step
STEEP = CostModel(c_verify=tuple(1.0 + 0.5 * k for k in range(17)), c_draft=0.3)


def test_expected_tokens_formula() -> None:
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_best_k_grows_with_alpha_and_is_zero_when_speculation_cannot_pay() -> None:
    ks = [FLAT.best_k(a) for a in (0.3, 0.6, 0.8, 0.95)]
    assert ks == sorted(ks) and ks[-1] > ks[0] >= 1
    assert STEEP.best_k(0.2) == 0
    assert STEEP.best_k(0.1) == 0
    # With alpha = 0 no draft length beats plain decoding, whatever the costs.
    assert FLAT.best_k(0.0) == 0


def test_policy_learns_alpha_and_probes_when_off() -> None:
    policy = AdaptiveDraftLength(STEEP, alpha=0.9)
    k_high = policy.choose()
    assert k_high >= 1
    for _ in range(30):
        policy.observe(drafted=4, accepted=0)
    assert policy.alpha < 0.1
    choices = [policy.choose() for _ in range(16)]
    assert choices.count(0) >= 14 and 1 in choices  # mostly off, with periodic probes


def test_observe_counts_only_tested_positions() -> None:
    policy = AdaptiveDraftLength(FLAT, alpha=0.5, decay=0.5)
    policy.observe(drafted=8, accepted=1)  # one hit then one miss; six positions untested
    assert policy.alpha == pytest.approx(0.5 * (0.5 * 0.5 + 0.5) + 0.0)


def test_keep_drafting_follows_the_draft_models_confidence() -> None:
    policy = AdaptiveDraftLength(FLAT, alpha=0.6, follow_confidence=True)
    assert policy.choose() == FLAT.max_k  # drafting pays: the cap, cut short by confidence
    assert policy.keep_drafting([0.99, 0.99, 0.98])
    # An unsure token in a text where drafts mostly fail: one more is not worth a step.
    policy.alpha = 0.1
    assert not policy.keep_drafting([0.99, 0.02])
    assert policy.keep_drafting([0.99, 0.9])
    assert not policy.keep_drafting([0.99] * FLAT.max_k)  # the cap
    for _ in range(40):
        policy.observe(drafted=4, accepted=0)
    assert policy.choose() == 0  # mostly off (probes aside), as without confidences


def test_confidences_are_calibrated_by_what_was_accepted() -> None:
    policy = AdaptiveDraftLength(FLAT, follow_confidence=True)
    assert policy.acceptance_at(0.35) == pytest.approx(0.35)  # the prior: face value
    for _ in range(12):
        policy.keep_drafting([0.35])
        policy.observe(drafted=1, accepted=1)
    assert policy.acceptance_at(0.35) > 0.8
    assert policy.acceptance_at(0.95) == pytest.approx(0.95)  # other tenths untouched
    # A free (lookup) draft's verdict says nothing about the draft model's confidences.
    before = policy.acceptance_at(0.15)
    policy.keep_drafting([0.15])
    policy.observe(drafted=1, accepted=0, free=True)
    assert policy.acceptance_at(0.15) == before


def test_auto_draft_length_is_lossless_and_backs_off_from_a_useless_drafter() -> None:
    target, useless = TableModel(7, seed=3), TableModel(7, seed=99)
    prompt = [1, 2, 3]
    reference = plain_greedy(target, prompt, 60)
    result = generate(
        target,
        DraftModelDrafter(useless, target=target),
        prompt,
        max_new_tokens=60,
        num_draft_tokens="auto",
        costs=STEEP,
    )
    assert result.token_ids == reference
    # A fixed k = 4 drafter would draft 4 per pass; the policy mostly stops drafting.
    assert result.stats.drafted < 0.5 * result.stats.target_passes


def test_auto_with_a_perfect_drafter_drafts_long() -> None:
    """The table model drafting for itself is always right but rarely sure (its top
    probabilities: median 0.47, 90th percentile 0.81): taken at face value they would
    stop most drafts after a token or two; the policy learns from the verdicts that
    such tokens are accepted (without that calibration this test fails)."""
    from unittest import mock

    target = TableModel(7, seed=3)
    with mock.patch.object(AdaptiveDraftLength, "observe_time"):  # costs as FLAT says
        result = generate(
            target,
            DraftModelDrafter(target, target=target),
            [1, 2, 3],
            max_new_tokens=60,
            num_draft_tokens="auto",
            costs=FLAT,
        )
    assert result.token_ids == plain_greedy(target, [1, 2, 3], 60)
    assert result.stats.mean_accepted_length > 4


def test_costs_are_measured_once_and_cached(tmp_path) -> None:
    model = tiny_llama(seed=0)
    first = cached_costs("tiny", tmp_path, model, model, max_k=3)
    assert len(first.c_verify) == 4 and first.c_verify[0] == 1.0
    assert all(b >= a for a, b in zip(first.c_verify, first.c_verify[1:], strict=False))
    assert first.c_draft > 0
    again = cached_costs("tiny", tmp_path, None, None, max_k=3)  # type: ignore[arg-type]
    assert again == first


def test_policy_learns_the_real_draft_cost() -> None:
    policy = AdaptiveDraftLength(FLAT, alpha=0.8)
    k_cheap = policy.choose()
    policy.observe_time(4, draft_seconds=9.0, verify_seconds=0.1)  # first drafting pass: skipped
    assert policy.c_draft == FLAT.c_draft
    for _ in range(20):  # each draft token costs as much as a target step
        policy.observe_time(4, draft_seconds=0.4, verify_seconds=0.1)
    assert policy.c_draft == pytest.approx(1.0, rel=0.01)
    assert policy.choose() < k_cheap


def _sources(target, drafter, prompt: list[int], n: int, k):
    """Greedy speculation; returns the tokens and per-pass draft sources (free / model).

    The draft costs what FLAT says: table models draft as slowly as they verify, and
    the policy would learn that from the clock (observe_time), which is not under test.
    """
    from unittest import mock

    from verispec.engine import speculate

    sources, seq = [], None
    with mock.patch.object(AdaptiveDraftLength, "observe_time"):
        for event, seq in speculate(
            target, drafter, prompt, max_new_tokens=n, num_draft_tokens=k, costs=FLAT
        ):
            if event.num_drafted:
                sources.append("free" if seq.last_draft_free else "model")
    assert seq is not None
    return seq.generated, sources


def test_hybrid_auto_leaves_a_misleading_lookup_for_the_model() -> None:
    from verispec.drafters import Draft, HybridDrafter

    target = TableModel(7, seed=3)

    class MisleadingLookup:
        """Always has a "match", always wrong: the target's greedy next token plus one."""

        def propose(self, context, k, *, params, generator):
            wrong = (int(target.logits_after(list(context)).argmax()) + 1) % 7
            return Draft(tokens=[wrong] * k, free=True)

    # The draft model is the target itself: always right.
    hybrid = HybridDrafter(DraftModelDrafter(target, target=target))
    hybrid.lookup = MisleadingLookup()  # type: ignore[assignment]
    prompt = [1, 2, 3]
    reference = plain_greedy(target, prompt, 80)
    tokens, naive = _sources(target, hybrid, prompt, 80, 4)  # fixed k: lookup whenever it can
    assert tokens == reference and naive == ["free"] * len(naive)
    tokens, chosen = _sources(target, hybrid, prompt, 80, "auto")
    assert tokens == reference
    # The policy learns that lookup drafts fail and the model's succeed.
    assert chosen.count("free") <= 6 and chosen[-5:] == ["model"] * 5, chosen


def test_hybrid_auto_prefers_a_free_lookup_that_works() -> None:
    from verispec.drafters import HybridDrafter

    # Greedy decoding of a second-order Markov model soon cycles, so two-token n-gram
    # lookups are right from then on; the draft model here is useless.
    target, useless = TableModel(7, seed=3), TableModel(7, seed=99)
    hybrid = HybridDrafter(DraftModelDrafter(useless, target=target), max_ngram=2, min_ngram=2)
    tokens, chosen = _sources(target, hybrid, [1, 2, 3], 80, "auto")
    assert tokens == plain_greedy(target, [1, 2, 3], 80)
    # Before the output starts repeating there is no match and the model drafts; from
    # the first match on, the free lookup wins every pass.
    first = chosen.index("free")
    assert chosen[first:] == ["free"] * (len(chosen) - first) and len(chosen) - first >= 5


def test_draft_length_is_calibrated_beyond_16_unless_rows_must_be_exact() -> None:
    from types import SimpleNamespace

    from verispec.costs import MAX_CALIBRATED_K, calibrated_length

    assert MAX_CALIBRATED_K == 32
    assert calibrated_length(tiny_llama(seed=0)) == 32
    # An int8 target attends query by query (bit-exact rows) for passes up to 17 positions.
    exact = SimpleNamespace(lean=SimpleNamespace(exact_rows=True))
    assert calibrated_length(exact) == 16  # type: ignore[arg-type]
