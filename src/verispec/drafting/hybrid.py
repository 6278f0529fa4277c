"""The hybrid drafter: prompt lookup or the draft model, per sequence and pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from verispec.drafting.base import NO_DRAFT, Draft, Drafter, DraftRequest, Proposer
from verispec.drafting.lookup import PromptLookupDrafter
from verispec.drafting.model import DraftModelDrafter, DraftModelProposer
from verispec.prefix import CachedState


class HybridProposer(Proposer):
    """A sequence's lookup (stateless) and its own draft-model proposer."""

    chooses_length = True
    stops_by_confidence = True

    def __init__(self, model: DraftModelProposer) -> None:
        self.model = model

    def cached_state(self) -> CachedState:
        return self.model.cached_state()

    def adopt_cache(self, state: CachedState) -> None:
        self.model.adopt_cache(state)


class HybridDrafter(Drafter[HybridProposer]):
    """Prompt lookup where the context repeats itself, the draft model elsewhere.

    A lookup draft costs nothing. Without a policy, whenever the context's last
    ``min_ngram`` tokens occurred before, their continuation is proposed
    (one-hot); otherwise the draft model drafts. Under the adaptive policy
    (``request.policy``) each pass takes the source with the higher predicted
    speedup, from separate running acceptance rates of lookup and model drafts:
    in prose, where n-gram matches mislead, the model wins; in code that repeats
    its prompt, the free lookup does. Where the model drafts, the lookup's
    continuation goes along as a hint (:class:`_DraftRun`). Each pass's proposal
    is valid on its own, so verification stays exact; the draft model catches up
    on skipped tokens the next time it is asked.
    """

    def __init__(
        self, model_drafter: DraftModelDrafter, *, max_ngram: int = 3, min_ngram: int = 2
    ) -> None:
        self.model_drafter = model_drafter
        self.lookup = PromptLookupDrafter(max_ngram=max_ngram, min_ngram=min_ngram)
        self.draft_model = model_drafter.model
        self.name = f"prompt lookup, else {model_drafter.name}"

    def start(self) -> HybridProposer:
        return HybridProposer(self.model_drafter.start())

    def propose_batch(
        self, proposers: Sequence[HybridProposer], requests: Sequence[DraftRequest]
    ) -> list[Draft]:
        drafts = [NO_DRAFT] * len(requests)
        by_model: list[tuple[int, DraftRequest]] = []
        for i, request in enumerate(requests):
            lookup, k_model = self.route(request)
            if lookup is not None:
                drafts[i] = lookup
            elif k_model > 0:
                hint = self.lookup.lookup(request.context, k_model) if k_model > 1 else []
                by_model.append((i, replace(request, k=k_model, hint=hint)))
        if by_model:
            model_drafts = self.model_drafter.propose_batch(
                [proposers[i].model for i, _ in by_model], [r for _, r in by_model]
            )
            for (i, _), draft in zip(by_model, model_drafts, strict=True):
                drafts[i] = draft
        return drafts

    def route(self, request: DraftRequest) -> tuple[Draft | None, int]:
        """This pass's source: ``(lookup draft, 0)`` when the prompt lookup wins, else
        ``(None, n)``: the draft model drafts n tokens (n may be 0)."""
        k, policy = request.k, request.policy
        if k <= 0:
            return None, 0
        k_model = k if policy is None else min(policy.choose(), k)
        tokens = self.lookup.lookup(request.context, k)
        if not tokens:
            return None, k_model
        if policy is None:
            return Draft(tokens=tokens, free=True), 0
        k_free, free_speedup = policy.choose_free(len(tokens))
        # The draft model's prospect at the length its running acceptance rate supports
        # (stopping by confidence, k_model is only a cap that its drafts stop short of).
        k_expected = min(k_model, policy.best_model_k())
        if k_free > 0 and free_speedup >= policy.model_speedup(k_expected):
            return Draft(tokens=tokens[:k_free], free=True), 0
        return None, k_model
