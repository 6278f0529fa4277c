"""Prefix caching: a finished sequence's caches, kept for the next one that starts alike.

A chat's second turn repeats the first turn's prompt and answer before its new
question; a served model sees the same system prompt on every request. Scoring
those tokens again is the prompt pass's whole cost, the same with or without
speculation. :class:`PrefixCache` keeps the target cache of finished sequences
(and the draft model's, when one drafted) with the token ids behind them; a new
sequence takes the entry sharing the longest prefix with its prompt, crops it
to that prefix, and its prompt pass scores only the rest (as llama.cpp's
``cache_prompt`` and vLLM's automatic prefix caching do).

Outputs stay those of plain decoding through the same cache: the engine never
depends on how the cached positions were computed beyond the kernels' own
rounding (a position scored inside a prompt pass and scored alone can differ in
the last bits of fp32, as positions verified together and alone already can).

An entry belongs to one sequence at a time: :meth:`PrefixCache.take` removes it,
:meth:`PrefixCache.put` returns it when the sequence is done.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from verispec.errors import InvalidArgumentError
from verispec.models import LanguageModel, ModelCache


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):  # the usual case, compared in C
        return n
    return next(i for i in range(n) if a[i] != b[i])


@dataclass
class CachedState:
    """One model's cache and the token ids behind it, in order."""

    model: LanguageModel
    tokens: list[int]
    cache: ModelCache


@dataclass
class PrefixEntry:
    """A finished sequence's target cache and, when a draft model drafted, its cache."""

    target: CachedState
    draft: CachedState | None = None


class PrefixCache:
    """Keeps the caches of up to ``max_sequences`` finished sequences (least recently
    finished dropped first) for later sequences whose prompts start with their tokens.

    Pass one to :func:`verispec.stream` / :func:`verispec.generate` (``prefix_cache=``);
    a sequence then reports how many prompt tokens it reused in
    ``stats.cached_prompt_tokens``. Safe to share between threads.
    """

    def __init__(self, max_sequences: int = 1) -> None:
        if not isinstance(max_sequences, int) or isinstance(max_sequences, bool):
            raise InvalidArgumentError(f"max_sequences must be an integer, got {max_sequences!r}")
        if max_sequences < 1:
            raise InvalidArgumentError(f"max_sequences must be >= 1, got {max_sequences}")
        self.max_sequences = max_sequences
        self._entries: list[PrefixEntry] = []  # oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def take(
        self, target: LanguageModel, prompt_ids: Sequence[int]
    ) -> tuple[PrefixEntry, int] | None:
        """Remove and return the entry of ``target`` sharing the most leading ids with
        ``prompt_ids``, with that count; None when no entry shares even one."""
        with self._lock:
            best, best_length = None, 0
            for entry in self._entries:
                if entry.target.model is not target:
                    continue
                length = common_prefix_length(entry.target.tokens, prompt_ids)
                if length > best_length:
                    best, best_length = entry, length
            if best is None:
                return None
            self._entries.remove(best)
            return best, best_length

    def put(self, entry: PrefixEntry) -> None:
        """Keep ``entry`` (the newest); drop the oldest beyond ``max_sequences``."""
        if entry.target.cache.length != len(entry.target.tokens):
            raise ValueError("a cached prefix's token ids must match its cache's length")
        with self._lock:
            self._entries.append(entry)
            del self._entries[: max(0, len(self._entries) - self.max_sequences)]
