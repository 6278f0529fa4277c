"""Verification of a draft against the target: pure functions over tensors.

Glossary
--------
draft tokens
    The k tokens ``d_1 .. d_k`` a drafter proposed after the current context.
p_target
    The target's (warped) distributions at the k+1 positions it scored in one
    pass: row i is the target's distribution for the token after
    ``context + d_1 .. d_i`` (row 0: right after the context, row k: after the
    whole draft). Shape ``[k + 1, vocab]``.
p_draft
    The drafter's distributions the draft tokens were sampled from, row i for
    ``d_{i+1}``. Shape ``[k, vocab]``. ``None`` for a deterministic drafter
    (prompt lookup): its proposal is treated as one-hot.
accepted
    The longest prefix ``d_1 .. d_n`` of the draft that verification keeps.
recovered
    When ``d_{n+1}`` is rejected, the token the target puts in its place: the
    argmax under greedy decoding, a sample from the residual
    ``max(0, p_target - p_draft)`` (normalised) under sampling.
bonus
    When all k draft tokens are accepted, the target's row k gives one more
    token for free.
siblings
    Optional alternatives ``(i, s)`` to draft token ``d_{i+1}``, scored in the
    same pass as extra rows after the draft's (a token tree: each sees the
    context, ``d_1 .. d_i`` and itself). Greedy decoding only: when ``d_{i+1}`` is
    the first rejected token and ``s`` is the target's argmax in its place, ``s``
    is kept and its own row gives the next token.

Every verification therefore yields ``n + 1`` new tokens: n accepted plus one
recovered or bonus token. Rejection sampling (Leviathan et al. 2023, Chen et
al. 2023) makes the result distributed exactly as sampling from the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from verispec.sampling import sample


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one draft."""

    num_accepted: int  # n: draft tokens kept
    next_token: int  # the recovered token (n < k) or the bonus token (n == k)
    sibling: int | None = None  # a kept sibling of d_{n+1} (then next_token follows it)
    sibling_row: int = -1  # the pass's row that scored the kept sibling

    def tokens(self, draft_tokens: list[int]) -> list[int]:
        """The ``n + 1`` tokens this verification adds to the sequence (``n + 2`` when a
        sibling was kept)."""
        kept = [] if self.sibling is None else [self.sibling]
        return [*draft_tokens[: self.num_accepted], *kept, self.next_token]


def greedy_verify(
    draft_tokens: list[int],  # [k]
    target_logits: torch.Tensor,  # [k + 1 + len(siblings), vocab]
    siblings: Sequence[tuple[int, int]] = (),  # (i, s): s is an alternative to d_{i+1}
) -> Verdict:
    """Keep draft tokens while they equal the target's argmax.

    Example: target argmax per row ``[5, 7, 2, 9]`` and draft ``[5, 7, 4]``:
    ``d_1, d_2`` match, ``d_3`` does not, so 2 are accepted and 2 is recovered.
    With the sibling ``(2, 2)`` (row 4 of the pass, argmax 8), the recovered 2 is
    the sibling: it is kept and its row's argmax 8 follows it.
    """
    k = len(draft_tokens)
    target_choice = target_logits.argmax(dim=-1).tolist()  # [k + 1 + siblings]
    n = 0
    for draft, choice in zip(draft_tokens, target_choice, strict=False):
        if draft != choice:
            break
        n += 1
    if n < k:
        for m, (i, token) in enumerate(siblings):
            if i == n and token == target_choice[n]:
                row = k + 1 + m
                return Verdict(n, int(target_choice[row]), sibling=token, sibling_row=row)
    return Verdict(num_accepted=n, next_token=int(target_choice[n]))


def acceptance_probability(
    draft_tokens: list[int],  # [k]
    p_draft: torch.Tensor | None,  # [k, vocab], None = one-hot
    p_target: torch.Tensor,  # [k + 1, vocab] (only the first k rows are used)
) -> torch.Tensor:  # [k]
    """``min(1, p_target[i, d_i] / p_draft[i, d_i])`` for each draft position i."""
    k = len(draft_tokens)
    idx = torch.tensor(draft_tokens, dtype=torch.long)
    rows = torch.arange(k)
    target_at_draft = p_target[rows, idx]  # [k]
    if p_draft is None:
        return target_at_draft.clamp(max=1.0)
    draft_at_draft = p_draft[rows, idx]  # [k]; > 0 since d_i was sampled from it
    return (target_at_draft / draft_at_draft.clamp_min(1e-30)).clamp(max=1.0)


def residual_distribution(
    p_target_row: torch.Tensor,  # [vocab]
    p_draft_row: torch.Tensor | None,  # [vocab], None = one-hot on draft_token
    draft_token: int,
) -> torch.Tensor:  # [vocab]
    """The replacement distribution at a rejection: ``max(0, p_target - p_draft)`` normalised."""
    if p_draft_row is None:
        residual = p_target_row.clone()
        residual[draft_token] = 0.0
    else:
        residual = (p_target_row - p_draft_row).clamp_min(0.0)
    total = residual.sum()
    # A rejection has probability 0 when the residual is empty; guard rounding anyway.
    return residual / total if total > 0 else p_target_row


def rejection_sample(
    draft_tokens: list[int],  # [k]
    p_draft: torch.Tensor | None,  # [k, vocab], or None for a one-hot (deterministic) draft
    p_target: torch.Tensor,  # [k + 1, vocab]
    generator: torch.Generator,
) -> Verdict:
    """Lossless speculative sampling.

    Draft token ``d_i`` is accepted with probability
    ``min(1, p_target[i, d_i] / p_draft[i, d_i])``. At the first rejection the
    replacement is drawn from ``max(0, p_target[i] - p_draft[i])``
    normalised; if nothing is rejected a bonus token is drawn from
    ``p_target[k]``. With ``p_draft = None`` the draft is one-hot: accept with
    probability ``p_target[i, d_i]``, and on rejection draw from ``p_target[i]``
    with ``d_i`` removed.
    """
    k = len(draft_tokens)
    if k:
        accept_prob = acceptance_probability(draft_tokens, p_draft, p_target)  # [k]
        uniforms = torch.rand(k, generator=generator, dtype=accept_prob.dtype)  # [k]
        rejected = (uniforms >= accept_prob).nonzero()  # u in [0, 1): P(u < a) = a
        if rejected.numel():
            i = int(rejected[0].item())
            row_draft = p_draft[i] if p_draft is not None else None
            dist = residual_distribution(p_target[i], row_draft, draft_tokens[i])
            token = sample(dist, generator)
            return Verdict(num_accepted=i, next_token=token)
    bonus = sample(p_target[k], generator)
    return Verdict(num_accepted=k, next_token=bonus)
