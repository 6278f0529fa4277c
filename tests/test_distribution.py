"""End-to-end losslessness under sampling: the distribution of whole generated
sequences equals the target's, exactly enumerated on a small-vocabulary model.

Method: a second-order Markov table model (vocab 5) is the target; a different
one is the draft, so drafts are often rejected. We generate N = 12,000
sequences of 3 tokens and compare the empirical distribution over the 125
possible sequences with the exact one (product of the target's warped
conditionals) by total variation distance. The threshold is the 99.9th
percentile of the TV distance of N exact multinomial draws, simulated from the
exact distribution itself, so a correct sampler fails with probability 0.001
(and the seeds are fixed, so the test is deterministic). A deliberately wrong
acceptance rule (replacement drawn from p_target instead of the residual) must
exceed the same threshold: that shows the test has the power to catch a bug.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import TableModel

import verispec.engine as engine
import verispec.verify as verify
from verispec.drafting import DraftModelDrafter, HybridDrafter, PromptLookupDrafter
from verispec.generate import generate
from verispec.sampling import SamplingParams, warp

VOCAB, LENGTH, SAMPLES = 5, 3, 12_000
PROMPT = [1, 2, 0, 1]


def _exact(
    model: TableModel, params: SamplingParams, length: int = LENGTH
) -> dict[tuple[int, ...], float]:
    exact = {}
    for seq in itertools.product(range(VOCAB), repeat=length):
        tokens, prob = list(PROMPT), 1.0
        for t in seq:
            prob *= float(warp(model.logits_after(tokens)[None], params)[0, t])
            tokens.append(t)
        exact[seq] = prob
    return exact


def _tv_threshold(probs: np.ndarray, n: int) -> float:
    rng = np.random.default_rng(0)
    sims = rng.multinomial(n, probs, size=2000) / n
    return float(np.quantile(0.5 * np.abs(sims - probs).sum(axis=1), 0.999))


def _empirical_tv(
    target, drafter, params: SamplingParams, k, *, length: int = LENGTH, costs=None
) -> tuple[float, float]:
    exact = _exact(target, params, length)
    keys = list(exact)
    probs = np.array([exact[s] for s in keys])
    probs /= probs.sum()
    counts = dict.fromkeys(keys, 0)
    for i in range(SAMPLES):
        out = generate(
            target,
            drafter,
            PROMPT,
            max_new_tokens=length,
            num_draft_tokens=k,
            costs=costs,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=i,
        )
        counts[tuple(out.token_ids)] += 1
    freq = np.array([counts[s] for s in keys]) / SAMPLES
    return float(0.5 * np.abs(freq - probs).sum()), _tv_threshold(probs, SAMPLES)


PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.8, top_k=3, top_p=0.9),
]


@pytest.mark.parametrize("params", PARAMS, ids=["t1", "t0.8-topk3-topp0.9"])
def test_draft_model_speculation_is_distribution_exact(params: SamplingParams) -> None:
    target, draft = TableModel(VOCAB, seed=10), TableModel(VOCAB, seed=11)
    drafter = DraftModelDrafter(draft, target=target)
    tv, threshold = _empirical_tv(target, drafter, params, k=2)
    assert tv < threshold, f"TV {tv:.4f} >= threshold {threshold:.4f}"


def test_prompt_lookup_speculation_is_distribution_exact() -> None:
    target = TableModel(VOCAB, seed=10)
    tv, threshold = _empirical_tv(target, PromptLookupDrafter(max_ngram=2), PARAMS[0], k=2)
    assert tv < threshold, f"TV {tv:.4f} >= threshold {threshold:.4f}"


def test_hybrid_speculation_is_distribution_exact() -> None:
    """Lookup (one-hot) and model (sampled) drafts mixed pass by pass."""
    target, draft = TableModel(VOCAB, seed=10), TableModel(VOCAB, seed=11)
    drafter = HybridDrafter(DraftModelDrafter(draft, target=target), max_ngram=2, min_ngram=2)
    tv, threshold = _empirical_tv(target, drafter, PARAMS[0], k=2)
    assert tv < threshold, f"TV {tv:.4f} >= threshold {threshold:.4f}"


def test_hinted_drafts_are_distribution_exact(
    monkeypatch: pytest.MonkeyPatch, model_only_hybrid
) -> None:
    """The draft model drafts every pass with the prompt lookup's continuation as a hint,
    always fed (sampled hint tokens kept as often as the draft's probability allows,
    ``sample_preferring``). Four tokens (625 sequences), the same threshold rule."""
    from verispec.drafting import model as drafters_module

    monkeypatch.setattr(drafters_module, "HINT_MIN_AGREEMENT", 0.0)
    monkeypatch.setattr(drafters_module, "HINT_MIN_TOKENS", 1)
    kept: list[bool] = []
    real = drafters_module.sample_preferring

    def counted(probs, guess, generator):
        token = real(probs, guess, generator)
        kept.append(token == guess)
        return token

    monkeypatch.setattr(drafters_module, "sample_preferring", counted)
    target, draft = TableModel(VOCAB, seed=10), TableModel(VOCAB, seed=11)
    drafter = model_only_hybrid(DraftModelDrafter(draft, target=target), max_ngram=2, min_ngram=1)
    tv, threshold = _empirical_tv(target, drafter, PARAMS[0], 3, length=4)
    assert tv < threshold, f"TV {tv:.4f} >= threshold {threshold:.4f}"
    # Hint tokens were both kept and replaced often (the rule was really exercised).
    assert min(kept.count(True), kept.count(False)) > 1000, (kept.count(True), len(kept))


def test_drafts_stopped_by_confidence_are_distribution_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under the adaptive policy a draft stops where the draft model's probability of
    its own sampled token says one more does not pay, so the draft length depends on
    the tokens drafted. Four tokens (625 sequences, same method and threshold rule):
    after the first token two may be drafted, so drafts of both lengths occur."""
    from verispec.policy import DraftPolicy
    from verispec.policy.costs import CostModel

    flat = CostModel(c_verify=(1.0,) * 9, c_draft=0.3)
    monkeypatch.setattr(DraftPolicy, "observe_time", lambda *a, **k: None)
    decisions: list[bool] = []
    keep = DraftPolicy.keep_drafting

    def counted(self, confidences):
        decisions.append(keep(self, confidences))
        return decisions[-1]

    monkeypatch.setattr(DraftPolicy, "keep_drafting", counted)
    target, draft = TableModel(VOCAB, seed=10), TableModel(VOCAB, seed=11)
    drafter = DraftModelDrafter(draft, target=target)
    tv, threshold = _empirical_tv(target, drafter, PARAMS[0], "auto", length=4, costs=flat)
    assert tv < threshold, f"TV {tv:.4f} >= threshold {threshold:.4f}"
    # Both outcomes of the stopping rule happened often (not a fixed length in disguise).
    assert min(decisions.count(True), decisions.count(False)) > 1000, decisions.count(True)


def test_wrong_acceptance_rule_fails_the_same_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: on rejection, sample from p_target instead of the residual."""

    def wrong_residual(p_target_row, p_draft_row, draft_token):
        return p_target_row

    monkeypatch.setattr(verify, "residual_distribution", wrong_residual)
    assert engine.rejection_sample is verify.rejection_sample  # the patched module is in use
    target, draft = TableModel(VOCAB, seed=10), TableModel(VOCAB, seed=11)
    tv, threshold = _empirical_tv(target, DraftModelDrafter(draft, target=target), PARAMS[0], k=2)
    assert tv > threshold, f"the biased sampler passed: TV {tv:.4f} < {threshold:.4f}"


def test_exact_distribution_sums_to_one() -> None:
    total = sum(_exact(TableModel(VOCAB, seed=10), PARAMS[1]).values())
    assert abs(total - 1.0) < 1e-5
    assert torch.get_default_dtype() == torch.float32
