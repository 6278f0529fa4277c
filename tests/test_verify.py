"""Verification: greedy rule and the exact distribution of the rejection sampler."""

from __future__ import annotations

import pytest
import torch

from verispec.sampling import SamplingParams, warp
from verispec.verify import (
    acceptance_probability,
    greedy_verify,
    rejection_sample,
    residual_distribution,
)


def _logits_with_argmax(choices: list[int], vocab: int = 10) -> torch.Tensor:
    logits = torch.zeros(len(choices), vocab)
    for row, c in enumerate(choices):
        logits[row, c] = 5.0
    return logits


def test_greedy_verify_docstring_example() -> None:
    verdict = greedy_verify([5, 7, 4], _logits_with_argmax([5, 7, 2, 9]))
    assert (verdict.num_accepted, verdict.next_token) == (2, 2)
    assert verdict.tokens([5, 7, 4]) == [5, 7, 2]


def test_greedy_verify_full_accept_gives_bonus_and_empty_draft_gives_one_token() -> None:
    full = greedy_verify([1, 2], _logits_with_argmax([1, 2, 3]))
    assert (full.num_accepted, full.next_token) == (2, 3)
    empty = greedy_verify([], _logits_with_argmax([8]))
    assert (empty.num_accepted, empty.next_token) == (0, 8)


def _exact_first_token_distribution(
    p_target: torch.Tensor, p_draft: torch.Tensor | None, one_hot: int | None
) -> torch.Tensor:
    """Closed form of what verification emits at position 0, summed over drafts.

    P(out = x) = sum_d q(d) [a_d * 1{x = d} + (1 - a_d) * r_d(x)], with a_d the
    acceptance probability and r_d the residual the code uses.
    """
    vocab = p_target.shape[-1]
    out = torch.zeros(vocab, dtype=torch.float64)
    drafts = range(vocab) if one_hot is None else [one_hot]
    for d in drafts:
        q_d = 1.0 if one_hot is not None else float(p_draft[0, d])  # type: ignore[index]
        if q_d == 0.0:
            continue
        a = float(acceptance_probability([d], p_draft, p_target)[0])
        r = residual_distribution(p_target[0], None if p_draft is None else p_draft[0], d)
        out += q_d * (1 - a) * r.double()
        out[d] += q_d * a
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=4),
        SamplingParams(temperature=1.3, top_p=0.8),
    ],
    ids=["plain", "top-k", "top-p"],
)
def test_rejection_sampler_emits_target_distribution_closed_form(
    seed: int, params: SamplingParams
) -> None:
    gen = torch.Generator().manual_seed(seed)
    vocab = 12
    p_target = warp(torch.randn(2, vocab, generator=gen) * 2, params)  # [k + 1, vocab]
    p_draft = warp(torch.randn(1, vocab, generator=gen) * 2, params)  # [k, vocab]
    exact = _exact_first_token_distribution(p_target, p_draft, None)
    torch.testing.assert_close(exact, p_target[0].double(), atol=1e-6, rtol=0)
    for d in range(vocab):  # one-hot drafts (prompt lookup), whatever token they propose
        exact = _exact_first_token_distribution(p_target, None, d)
        torch.testing.assert_close(exact, p_target[0].double(), atol=1e-6, rtol=0)


def test_wrong_residual_breaks_the_closed_form() -> None:
    """Negative control: sampling the replacement from p_target itself is biased."""
    gen = torch.Generator().manual_seed(0)
    p_target = torch.softmax(torch.randn(2, 8, generator=gen) * 2, -1)
    p_draft = torch.softmax(torch.randn(1, 8, generator=gen) * 2, -1)
    out = torch.zeros(8, dtype=torch.float64)
    for d in range(8):
        a = float(acceptance_probability([d], p_draft, p_target)[0])
        out += float(p_draft[0, d]) * (1 - a) * p_target[0].double()
        out[d] += float(p_draft[0, d]) * a
    assert (out - p_target[0].double()).abs().sum() > 1e-2


def test_rejection_sampler_matches_the_closed_form_empirically() -> None:
    """The sampler really uses those probabilities: 40k draws, TV < 0.02.

    With 12 outcomes and n = 40,000 the expected TV distance of an exact sampler
    is about 0.5 * sum sqrt(p(1-p) / n) * sqrt(2/pi) < 0.01; 0.02 leaves
    headroom while a sampler that skipped the residual (TV about 0.1 here) fails.
    """
    gen = torch.Generator().manual_seed(3)
    vocab, n = 12, 40_000
    p_target = torch.softmax(torch.randn(2, vocab, generator=gen) * 2, -1)
    p_draft = torch.softmax(torch.randn(1, vocab, generator=gen) * 2, -1)
    drafts = torch.multinomial(p_draft[0], n, replacement=True, generator=gen).tolist()
    counts = torch.zeros(vocab)
    for d in drafts:
        verdict = rejection_sample([d], p_draft, p_target, gen)
        first = d if verdict.num_accepted == 1 else verdict.next_token
        counts[first] += 1
    tv = 0.5 * (counts / n - p_target[0]).abs().sum()
    assert tv < 0.02


def test_full_accept_draws_bonus_from_last_row() -> None:
    gen = torch.Generator().manual_seed(0)
    p_target = torch.zeros(3, 5)
    p_target[0, 1] = p_target[1, 2] = p_target[2, 4] = 1.0
    verdict = rejection_sample([1, 2], None, p_target, gen)
    assert (verdict.num_accepted, verdict.next_token) == (2, 4)


def test_zero_target_probability_is_always_rejected() -> None:
    gen = torch.Generator().manual_seed(0)
    p_target = torch.tensor([[0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    for _ in range(50):
        verdict = rejection_sample([0], None, p_target, gen)
        assert verdict.num_accepted == 0 and verdict.next_token in (1, 2)
