"""Drafters: cheap proposers of the next few tokens, behind one declared protocol
(:mod:`verispec.drafting.base`): a draft model (:mod:`~verispec.drafting.model`),
prompt lookup (:mod:`~verispec.drafting.lookup`) and the hybrid of both
(:mod:`~verispec.drafting.hybrid`)."""

from __future__ import annotations

from typing import Any

from verispec.drafting.base import (
    NO_DRAFT,
    Draft,
    Drafter,
    DraftRequest,
    Proposer,
    StatelessDrafter,
)
from verispec.drafting.hybrid import HybridDrafter, HybridProposer
from verispec.drafting.lookup import PromptLookupDrafter
from verispec.drafting.model import DraftModelDrafter, DraftModelProposer, sample_preferring
from verispec.models import LanguageModel

__all__ = [
    "NO_DRAFT",
    "Draft",
    "DraftModelDrafter",
    "DraftModelProposer",
    "DraftRequest",
    "Drafter",
    "HybridDrafter",
    "HybridProposer",
    "PromptLookupDrafter",
    "Proposer",
    "StatelessDrafter",
    "drafter_menu",
    "sample_preferring",
]


def drafter_menu(
    target: LanguageModel, draft_model: LanguageModel | None, *, ngram: int = 3
) -> dict[str, Drafter[Any] | None]:
    """The drafters by the names the command line and the server use: ``none`` (plain
    decoding), ``prompt-lookup`` and, with a draft model, ``model`` and ``hybrid``."""
    menu: dict[str, Drafter[Any] | None] = {
        "none": None,
        "prompt-lookup": PromptLookupDrafter(max_ngram=ngram),
    }
    if draft_model is not None:
        model = DraftModelDrafter(draft_model, target=target)
        menu["model"] = model
        menu["hybrid"] = HybridDrafter(model, max_ngram=ngram)
    return menu
