"""Statistics of a generation: outputs, not logs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerationStats:
    """Counters one sequence accumulates, one update per target pass."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of those, reused from a prefix cache (not scored again)
    new_tokens: int = 0
    target_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_by_position: list[int] = field(default_factory=list)  # [k_max]
    accepted_by_position: list[int] = field(default_factory=list)  # [k_max]
    # [j]: target passes that verified j drafted tokens (the prompt pass counts at j = 0)
    passes_by_draft_length: list[int] = field(default_factory=list)
    free_drafted: int = 0  # drafted tokens that cost (next to) nothing: prompt lookup
    hinted_drafted: int = 0  # drafted tokens read off one pass over a lookup hint
    siblings: int = 0  # runner-up tokens verified beside the drafts (token trees)
    siblings_kept: int = 0  # of those, kept in place of a rejected draft token
    time_prefill: float = 0.0  # seconds in the prompt pass
    time_draft: float = 0.0  # seconds inside the drafter
    time_verify: float = 0.0  # seconds in target passes and verification
    time_total: float = 0.0  # wall time from start to the last token
    time_to_first_token: float = 0.0

    def record_pass(
        self,
        *,
        drafted: int,
        accepted: int,
        emitted: int,
        free: bool = False,
        hinted: int = 0,
        siblings: int = 0,
        sibling_kept: bool = False,
    ) -> None:
        self.target_passes += 1
        self.siblings += siblings
        self.siblings_kept += sibling_kept
        self.drafted += drafted
        if free:
            self.free_drafted += drafted
        self.hinted_drafted += hinted
        while len(self.passes_by_draft_length) <= drafted:
            self.passes_by_draft_length.append(0)
        self.passes_by_draft_length[drafted] += 1
        self.accepted += accepted
        self.new_tokens += emitted
        while len(self.drafted_by_position) < drafted:
            self.drafted_by_position.append(0)
            self.accepted_by_position.append(0)
        for i in range(drafted):
            self.drafted_by_position[i] += 1
            if i < accepted:
                self.accepted_by_position[i] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """New tokens per target pass (1.0 for plain decoding)."""
        return self.new_tokens / self.target_passes if self.target_passes else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        """P(draft token i accepted | it was drafted), per draft position."""
        return [
            a / d if d else 0.0
            for a, d in zip(self.accepted_by_position, self.drafted_by_position, strict=False)
        ]

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.time_total if self.time_total > 0 else 0.0

    @property
    def time_overhead(self) -> float:
        """Wall time spent outside the prompt pass, the drafter and target passes."""
        return max(0.0, self.time_total - self.time_prefill - self.time_draft - self.time_verify)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "new_tokens": self.new_tokens,
            "target_passes": self.target_passes,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "acceptance_by_position": self.acceptance_by_position,
            "passes_by_draft_length": list(self.passes_by_draft_length),
            "free_drafted": self.free_drafted,
            "hinted_drafted": self.hinted_drafted,
            "siblings": self.siblings,
            "siblings_kept": self.siblings_kept,
            "tokens_per_second": self.tokens_per_second,
            "time_to_first_token": self.time_to_first_token,
            "time_prefill": self.time_prefill,
            "time_draft": self.time_draft,
            "time_verify": self.time_verify,
            "time_overhead": self.time_overhead,
            "time_total": self.time_total,
        }
