"""Prompt lookup: the continuation of the context's last n-gram where it occurred before."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from verispec.drafting.base import Draft, DraftRequest, StatelessDrafter
from verispec.errors import InvalidArgumentError


class PromptLookupDrafter(StatelessDrafter):
    """Propose the continuation of the latest earlier occurrence of the context's tail.

    Tries n-grams from ``max_ngram`` down to ``min_ngram``. Example with
    context ``[1, 2, 3, 4, 2, 3]``, k = 2: the tail ``[2, 3]`` occurred at
    positions 1-2, followed by ``[4, 2]``, so the draft is ``[4, 2]``.
    Deterministic, so it returns no probabilities (one-hot proposal).
    """

    def __init__(self, *, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidArgumentError(
                f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}"
            )
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.name = f"prompt lookup (n-gram {min_ngram}..{max_ngram})"

    def propose(self, request: DraftRequest) -> Draft:
        return Draft(tokens=self.lookup(request.context, request.k), free=True)

    def lookup(self, context: Sequence[int], k: int) -> list[int]:
        if k <= 0 or len(context) < 2:
            return []
        ids = np.asarray(context, dtype=np.int64)
        length = len(ids)
        # Earlier positions holding the last token; latest first.
        ends = np.flatnonzero(ids[:-1] == ids[-1])[::-1]
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            tail = ids[length - n :]
            for end in ends:
                start = end - n + 1
                if start >= 0 and np.array_equal(ids[start : end + 1], tail):
                    return [int(t) for t in ids[end + 1 : end + 1 + k]]
        return []
