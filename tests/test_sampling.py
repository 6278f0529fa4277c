from __future__ import annotations

import pytest
import torch

from verispec.errors import InvalidArgumentError
from verispec.sampling import SamplingParams, warp


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
