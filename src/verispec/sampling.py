"""Sampling parameters and the logits -> probabilities warp.

The same :func:`warp` is applied to the target's and the drafter's logits, so
that rejection sampling compares like with like: the speculative output then
follows exactly the distribution the target would sample from with these
parameters alone (temperature, then top-k, then top-p, as in transformers and
vLLM).

``temperature == 0`` means greedy decoding: no probabilities are needed and
verification takes the argmax fast path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from verispec.errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. Validated at construction."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature != self.temperature:
            raise InvalidArgumentError(f"temperature must be a number, got {self.temperature!r}")
        if self.temperature < 0:
            raise InvalidArgumentError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InvalidArgumentError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise InvalidArgumentError(f"seed must be a non-negative integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self) -> torch.Generator:
        """A CPU generator seeded from ``seed`` (or from fresh entropy when unset)."""
        gen = torch.Generator(device="cpu")
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


# top-p first looks for the nucleus among this many most likely tokens (a partial
# top-k is ~40x cheaper than sorting a 150k vocabulary) and sorts everything only
# when their mass stays below p.
TOP_P_CANDIDATES = 256


def warp(
    logits: torch.Tensor,  # [n, vocab] any float dtype
    params: SamplingParams,
) -> torch.Tensor:  # [n, vocab] float32, rows sum to 1
    """Turn logits into the sampling distribution defined by ``params``.

    Temperature scales the logits; top-k keeps the k largest; top-p keeps the
    smallest set of most likely tokens whose mass reaches p (the token that
    crosses p is kept). Masked tokens get probability exactly 0.
    """
    if params.greedy:
        raise InvalidArgumentError("warp() is for sampling; greedy decoding uses argmax")
    scores = logits.float() / params.temperature
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]  # [n, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [n, vocab]
    if params.top_p >= 1.0:
        return probs
    top, order = torch.topk(probs, min(TOP_P_CANDIDATES, vocab), dim=-1)  # [n, c], descending
    out = _nucleus(probs, top, order, params.top_p)
    wide = (top.sum(-1) < params.top_p).nonzero().squeeze(-1)  # rows whose nucleus is wider
    if wide.numel() and top.shape[-1] < vocab:
        top, order = torch.sort(probs[wide], dim=-1, descending=True)
        out[wide] = _nucleus(probs[wide], top, order, params.top_p)
    return out


def _nucleus(
    probs: torch.Tensor,  # [n, vocab]
    top: torch.Tensor,  # [n, c] the c largest probabilities per row, descending
    order: torch.Tensor,  # [n, c] their token ids
    top_p: float,
) -> torch.Tensor:  # [n, vocab]: the nucleus renormalised, zeros elsewhere
    mass_before = torch.cumsum(top, dim=-1) - top  # mass of the better tokens
    keep = mass_before < top_p
    keep[..., 0] = True  # the most likely token is never dropped
    kept = torch.where(keep, top, torch.zeros_like(top))
    out = torch.zeros_like(probs).scatter_(-1, order, kept)
    return out / out.sum(-1, keepdim=True)


def sample(
    probs: torch.Tensor,  # [vocab], non-negative, not all zero
    generator: torch.Generator,
) -> int:
    """Draw one token id from a probability vector (need not be normalised).

    Inverse-CDF sampling in float64 over the tokens with non-zero probability:
    after top-p or top-k these are few, which makes this ~20x cheaper than
    ``torch.multinomial`` over a whole vocabulary.
    """
    support = probs.nonzero().squeeze(-1)  # [m]
    cdf = torch.cumsum(probs[support].double(), dim=0)  # [m]
    u = torch.rand(1, generator=generator, dtype=torch.float64) * cdf[-1]
    i = int(torch.searchsorted(cdf, u, right=True).clamp(max=len(cdf) - 1).item())
    return int(support[i].item())
