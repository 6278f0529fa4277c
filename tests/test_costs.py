"""The cost model and the adaptive draft length (verispec.policy)."""

from __future__ import annotations

import pytest
from helpers import TableModel, plain_greedy, tiny_llama

from verispec.drafting import DraftModelDrafter, PromptLookupDrafter
from verispec.generate import generate
from verispec.models import HFModel
from verispec.policy import AcceptanceRate, DraftPolicy, pass_cost, plan_batch
from verispec.policy.costs import CostModel, cached_costs, expected_tokens

FLAT = CostModel(c_verify=(1.0,) * 17, c_draft=0.05)  # verification as cheap as one step
STEEP = CostModel(c_verify=tuple(1.0 + 0.5 * k for k in range(17)), c_draft=0.3)
# Up to 9 positions as cheap as one (a GPU's pass), then half a step per position more.
KNEE = CostModel(c_verify=tuple(1.0 + 0.5 * max(0, k - 8) for k in range(17)), c_draft=0.05)


def _policy(costs: CostModel, alpha: float = 0.6, **kwargs) -> DraftPolicy:
    """What the old AdaptiveDraftLength(costs, alpha=...) was: a policy whose draft-model
    acceptance starts at ``alpha``."""
    decay = kwargs.pop("decay", 0.9)
    return DraftPolicy(costs, model=AcceptanceRate(alpha=alpha, decay=decay), **kwargs)


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
    policy = _policy(STEEP, alpha=0.9)
    k_high = policy.choose()
    assert k_high >= 1
    for _ in range(30):
        policy.observe(drafted=4, accepted=0)
    assert policy.alpha < 0.1
    choices = [policy.choose() for _ in range(16)]
    assert choices.count(0) >= 14 and 1 in choices  # mostly off, with periodic probes


def test_observe_counts_only_tested_positions() -> None:
    policy = _policy(FLAT, alpha=0.5, decay=0.5)
    policy.observe(drafted=8, accepted=1)  # one hit then one miss; six positions untested
    assert policy.alpha == pytest.approx(0.5 * (0.5 * 0.5 + 0.5) + 0.0)
    # Free (lookup) drafts move their own rate, not the draft model's.
    policy.observe(drafted=3, accepted=3, free=True)
    assert policy.alpha == pytest.approx(0.375)
    # Their prior 0.5 and the default decay 0.9 (the model's decay is its own): three hits.
    assert policy.free.alpha == pytest.approx(1 - 0.5 * 0.9**3)


def test_keep_drafting_follows_the_draft_models_confidence() -> None:
    policy = _policy(FLAT, alpha=0.6, follow_confidence=True)
    assert policy.choose() == FLAT.max_k  # drafting pays: the cap, cut short by confidence
    assert policy.keep_drafting([0.99, 0.99, 0.98])
    # An unsure token in a text where drafts mostly fail: one more is not worth a step.
    policy.model.alpha = 0.1
    assert not policy.keep_drafting([0.99, 0.02])
    assert policy.keep_drafting([0.99, 0.9])
    assert not policy.keep_drafting([0.99] * FLAT.max_k)  # the cap
    for _ in range(40):
        policy.observe(drafted=4, accepted=0)
    assert policy.choose() == 0  # mostly off (probes aside), as without confidences


def test_confidences_are_calibrated_by_what_was_accepted() -> None:
    policy = _policy(FLAT, follow_confidence=True)
    assert policy.acceptance_at(0.35) == pytest.approx(0.35)  # the prior: face value
    for _ in range(12):
        policy.observe(drafted=1, accepted=1, confidences=[0.35])
    assert policy.acceptance_at(0.35) > 0.8
    assert policy.acceptance_at(0.95) == pytest.approx(0.95)  # other tenths untouched
    # A free (lookup) draft's verdict says nothing about the draft model's confidences.
    before = policy.acceptance_at(0.15)
    policy.observe(drafted=1, accepted=0, free=True, confidences=[0.15])
    assert policy.acceptance_at(0.15) == before
    # Nor does a draft whose confidences are not one per drafted token.
    policy.observe(drafted=2, accepted=0, confidences=[0.15])
    assert policy.acceptance_at(0.15) == before
    # Only tested positions count: after the first rejection nothing was verified.
    policy.observe(drafted=3, accepted=0, confidences=[0.15, 0.95, 0.95])
    assert policy.acceptance_at(0.15) < before
    assert policy.acceptance_at(0.95) == pytest.approx(0.95)


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
    with mock.patch.object(DraftPolicy, "observe_time"):  # costs as FLAT says
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
    policy = _policy(FLAT, alpha=0.8)
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

    sources, generated = [], []
    with mock.patch.object(DraftPolicy, "observe_time"):
        for event, seq in speculate(
            target, drafter, prompt, max_new_tokens=n, num_draft_tokens=k, costs=FLAT
        ):
            generated = seq.generated
            if event.num_drafted:
                sources.append("free" if event.draft.free else "model")
    return generated, sources


def test_hybrid_auto_leaves_a_misleading_lookup_for_the_model() -> None:
    from verispec.drafting import HybridDrafter

    target = TableModel(7, seed=3)

    class MisleadingLookup(PromptLookupDrafter):
        """Always has a "match", always wrong: the target's greedy next token plus one."""

        def lookup(self, context, k):
            wrong = (int(target.logits_after(list(context)).argmax()) + 1) % 7
            return [wrong] * k

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
    from verispec.drafting import HybridDrafter

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
    from verispec.models.kernels import optimize
    from verispec.policy.costs import MAX_CALIBRATED_K, calibrated_length

    assert MAX_CALIBRATED_K == 32
    assert calibrated_length(tiny_llama(seed=0)) == 32
    # An int8 target attends query by query (bit-exact rows) for passes up to 17 positions.
    exact = tiny_llama(seed=0)
    applied = optimize(exact.hf, device="cpu", precision="int8")
    exact = HFModel(hf=exact.hf, tokenizer=None, name="int8", runner="lean", fused=applied.fused)
    assert exact.lean is not None and exact.lean.exact_rows
    assert calibrated_length(exact) == 16
    # The same model on transformers' forward has no such limit.
    assert calibrated_length(HFModel(hf=exact.hf, tokenizer=None, name="hf", runner="hf")) == 32


def test_a_batch_of_one_keeps_its_own_draft_length() -> None:
    for costs in (FLAT, STEEP, KNEE):
        policy = _policy(costs, alpha=0.8)
        for k in (0, 1, 6, 16):
            assert plan_batch(costs, [policy], [k]) == k


def test_a_batch_whose_pass_grows_steeply_with_rows_drafts_shorter() -> None:
    """Under both cost models a sequence alone drafts the same length; in one shared
    pass four such drafts cost nothing more with flat costs but many steps past the
    knee, so the batch is capped there and not with flat costs."""
    policies = {costs: [_policy(costs, alpha=0.8) for _ in range(4)] for costs in (FLAT, KNEE)}
    ks = {costs: [p.choose() for p in ps] for costs, ps in policies.items()}
    assert ks[FLAT] == ks[KNEE] and len(set(ks[FLAT])) == 1 and ks[FLAT][0] >= 4
    alone = ks[FLAT][0]
    assert plan_batch(FLAT, policies[FLAT], ks[FLAT]) == alone
    cap = plan_batch(KNEE, policies[KNEE], ks[KNEE])
    assert 1 <= cap < alone
    # Two sequences stay closer to the knee than four: a cap between.
    pair = plan_batch(KNEE, policies[KNEE][:2], ks[KNEE][:2])
    assert cap <= pair < alone
    # Sequences that draft nothing need no cap.
    assert plan_batch(KNEE, policies[KNEE], [0, 0, 0, 0]) == 0


def test_pass_cost_extends_the_measured_costs_along_their_last_slope() -> None:
    costs = CostModel(c_verify=(1.0, 1.5, 2.5), c_draft=0.1)  # up to 3 rows measured
    assert [pass_cost(costs, rows) for rows in (1, 2, 3)] == [1.0, 1.5, 2.5]
    assert pass_cost(costs, 4) == pytest.approx(3.5)  # the last slope: 1.0 per row
    assert pass_cost(costs, 10) == pytest.approx(2.5 + 1.0 * 7)
    assert pass_cost(FLAT, 100) == 1.0  # flat to the end: flat beyond
    assert pass_cost(STEEP, 17 + 3) == pytest.approx(STEEP.c_verify[-1] + 0.5 * 3)
    falling = CostModel(c_verify=(1.0, 2.0, 1.8), c_draft=0.1)  # noise: never cheaper
    assert pass_cost(falling, 9) == pytest.approx(1.8)
    assert pass_cost(CostModel(c_verify=(1.0,), c_draft=0.1), 5) == pytest.approx(5.0)
