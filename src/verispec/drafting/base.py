"""Drafters: cheap proposers of the next few tokens, behind one declared protocol.

A :class:`Drafter` is shared by many sequences (it holds weights or settings);
``start()`` gives a :class:`Proposer` that owns one sequence's drafting state
(e.g. the draft model's KV cache). Each target pass, the engine hands every
sequence's proposer a :class:`DraftRequest` (the verified context, the most
tokens to propose, the sampling parameters, and under ``-k auto`` the
sequence's :class:`~verispec.policy.DraftPolicy`) and gets a :class:`Draft`
back: the tokens and, when they were sampled, the distributions they were
sampled from. Deterministic drafters (prompt lookup, or any drafter under
greedy decoding) return ``probs=None``; verification treats them as one-hot.

The engine asks a drafter for all of its sequences at once
(:meth:`Drafter.propose_batch`), so a draft model runs one batched pass per
draft step for the whole batch; the default asks each proposer on its own.
Every capability beyond ``propose`` has a default here, so the engine calls
methods and never looks a hook up by name:

========================  ===============================================  ==========
capability                what it means                                    default
========================  ===============================================  ==========
``propose(request)``      up to ``request.k`` tokens after the context     (required)
``propose_batch``         drafts for many proposers of this drafter        one by one
``chooses_length``        asks ``request.policy`` for its own length;      False
                          ``request.k`` is then only a cap
``stops_by_confidence``   stops each draft where the policy's              False
                          ``keep_drafting`` says one more token won't pay
``cached_state()``        its cache, for a prefix cache to keep            None
``adopt_cache(state)``    start from a finished sequence's cache           ignored
``draft_model``           the model whose step the cost model times        None
========================  ===============================================  ==========

Proposers need no notification of what was accepted: each request carries the
full verified context and a proposer reconciles its own state with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from verispec.models import LanguageModel
from verispec.policy import DraftPolicy
from verispec.prefix import CachedState
from verispec.sampling import SamplingParams


@dataclass(frozen=True)
class Draft:
    tokens: list[int]  # [k'] with k' <= k (k' may be 0: nothing to propose)
    probs: torch.Tensor | None = None  # [k', vocab] sampling distributions of the tokens, or None
    free: bool = False  # True when proposing cost (next to) nothing, e.g. a prompt lookup
    # (i, s): token s is verified as an alternative to tokens[i] in the same pass (a token
    # tree, greedy decoding only; see verispec.verify)
    siblings: tuple[tuple[int, int], ...] = ()
    # How many of ``tokens`` the draft model read off one pass over a prompt-lookup hint
    # instead of a step each (see HybridDrafter): their cost says nothing of a step's.
    hinted: int = 0
    # The draft model's probability of each token, when a policy asked for them (the
    # policy calibrates its acceptance estimate per confidence from these).
    confidences: tuple[float, ...] = ()


@dataclass(frozen=True)
class DraftRequest:
    """What one sequence asks of its proposer for one target pass."""

    context: Sequence[int]  # the verified tokens: prompt + generated so far
    k: int  # the most tokens to propose (never past max tokens or the context window)
    params: SamplingParams
    generator: torch.Generator  # the sequence's own, for sampled drafts
    policy: DraftPolicy | None = None  # the sequence's adaptive policy under -k auto
    tree_room: int = 0  # sibling rows the target may verify beside the draft (0: chains)
    hint: Sequence[int] = ()  # a guess at the next tokens (a prompt lookup's), for a draft model


NO_DRAFT = Draft(tokens=[])


class Proposer:
    """One sequence's drafting state. Subclasses implement :meth:`propose`."""

    chooses_length = False  # True: asks request.policy for its own length (k is a cap)
    stops_by_confidence = False  # True: stops drafts by the policy's keep_drafting

    def propose(self, request: DraftRequest) -> Draft:
        """Up to ``request.k`` tokens to follow ``request.context``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement propose()")

    def cached_state(self) -> CachedState | None:
        """This sequence's cache and the ids behind it, for a prefix cache to keep."""
        return None

    def adopt_cache(self, state: CachedState) -> None:
        """Start from a finished sequence's cache (kept by a prefix cache)."""
        del state


P = TypeVar("P", bound=Proposer)


class Drafter(Generic[P]):
    """Shared by the sequences it drafts for; ``start()`` gives one sequence its proposer."""

    name: str = "drafter"
    draft_model: LanguageModel | None = None  # the model whose step the cost model times

    def start(self) -> P:
        raise NotImplementedError(f"{type(self).__name__} does not implement start()")

    def propose_batch(
        self, proposers: Sequence[P], requests: Sequence[DraftRequest]
    ) -> list[Draft]:
        """Drafts for several sequences of this drafter (one request each)."""
        return [p.propose(r) for p, r in zip(proposers, requests, strict=True)]


class StatelessDrafter(Proposer, Drafter[Proposer]):
    """A drafter that keeps no per-sequence state is its own proposer: subclass this and
    implement :meth:`Proposer.propose` (see the README's phrase drafter)."""

    def start(self) -> Proposer:
        return self
