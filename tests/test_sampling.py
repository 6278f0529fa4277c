from __future__ import annotations

import pytest
import torch

from verispec.errors import InvalidArgumentError
from verispec.sampling import TOP_P_CANDIDATES, SamplingParams, sample, warp


def test_temperature_scales_logits() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    probs = warp(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(probs, torch.softmax(logits / 0.5, -1))


def test_top_k_keeps_k_largest() -> None:
    probs = warp(torch.tensor([[0.1, 3.0, 2.0, -1.0]]), SamplingParams(temperature=1.0, top_k=2))
    assert (probs[0] > 0).tolist() == [False, True, True, False]
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))


def test_top_p_keeps_the_token_that_crosses_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = warp(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert (probs[0] > 0).tolist() == [True, True, False, False]
    torch.testing.assert_close(probs[0, :2], torch.tensor([0.625, 0.375]))
    probs = warp(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert (probs[0] > 0).tolist() == [True, True, False, False]
    probs = warp(logits, SamplingParams(temperature=1.0, top_p=0.81))
    assert (probs[0] > 0).tolist() == [True, True, True, False]


def test_top_p_never_empties_a_row() -> None:
    probs = warp(torch.tensor([[10.0, 0.0, 0.0]]), SamplingParams(temperature=1.0, top_p=0.01))
    assert probs[0].tolist() == [1.0, 0.0, 0.0]
    tiny = warp(torch.tensor([[1.0, 2.0, 0.0]]), SamplingParams(temperature=1.0, top_p=1e-45))
    assert tiny[0].tolist() == [0.0, 1.0, 0.0]  # a top_p that rounds to 0 in float32


def _nucleus_by_sorting(probs: torch.Tensor, top_p: float) -> torch.Tensor:  # [vocab] bool
    ranked, order = torch.sort(probs, descending=True)
    keep = (torch.cumsum(ranked, 0) - ranked) < top_p
    keep[0] = True
    return torch.zeros_like(keep).scatter(0, order, keep)


def test_top_p_finds_the_nucleus_among_candidates_and_beyond_them() -> None:
    # Row 0 is peaked (its nucleus lies in the first candidates); row 1 is nearly flat,
    # so its nucleus holds far more than TOP_P_CANDIDATES tokens (the sorting fallback).
    vocab = 20 * TOP_P_CANDIDATES
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, vocab, generator=gen)
    logits[0] *= 8.0
    params = SamplingParams(temperature=1.0, top_p=0.9)
    probs = warp(logits, params)
    sizes = (probs > 0).sum(-1).tolist()
    assert sizes[0] < TOP_P_CANDIDATES < sizes[1]
    for row in range(2):
        full = torch.softmax(logits[row], -1)
        assert torch.equal(probs[row] > 0, _nucleus_by_sorting(full, 0.9))
        kept = full * (probs[row] > 0)
        torch.testing.assert_close(probs[row], kept / kept.sum())


def test_sample_follows_the_distribution_and_never_draws_a_zero() -> None:
    probs = torch.zeros(1000)
    probs[[3, 500, 999]] = torch.tensor([0.2, 0.5, 0.3])
    gen = torch.Generator().manual_seed(1)
    draws = [sample(probs, gen) for _ in range(4000)]
    assert set(draws) <= {3, 500, 999}
    # Binomial standard deviation at n = 4000 is at most 0.008; 0.03 is about 4 of them.
    for token, p in ((3, 0.2), (500, 0.5), (999, 0.3)):
        assert abs(draws.count(token) / 4000 - p) < 0.03
    assert sample(torch.tensor([0.0, 2.0, 0.0]), gen) == 1  # unnormalised weights work


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -3}, "seed"),
    ],
)
def test_bad_parameters_name_the_problem(kwargs: dict, name: str) -> None:
    with pytest.raises(InvalidArgumentError, match=name):
        SamplingParams(**kwargs)


def test_seeded_generators_repeat() -> None:
    a = SamplingParams(temperature=1.0, seed=7).make_generator()
    b = SamplingParams(temperature=1.0, seed=7).make_generator()
    assert torch.rand(3, generator=a).tolist() == torch.rand(3, generator=b).tolist()
