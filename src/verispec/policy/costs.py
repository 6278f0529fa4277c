"""The cost model that decides the draft length.

Glossary (DESIGN.md): alpha = probability a draft token is accepted, k = draft
length, ``c_verify(k)`` = time of a target pass over k + 1 positions divided by
a one-position pass, ``c_draft`` = one drafter step divided by one target step.

    expected tokens per target pass  E(alpha, k) = (1 - alpha^(k+1)) / (1 - alpha)
    speedup over plain decoding      S(alpha, k) = E(alpha, k) / (c_verify(k) + k * c_draft)

:func:`measure_costs` times real forward passes on this machine and
:func:`costs_for` keeps the result per machine, models and kernels;
:mod:`verispec.policy` decides the draft length from it.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from verispec.models import LanguageModel, exact_rows_limit, kernel_description

# Part of the cache key of measured costs: bump it when kernels or the forward
# pass change in a way that the model names and kernel descriptions do not show.
COSTS_VERSION = "5"  # 3: interleaved timing; fused int8 projections; 4: medians of 5 rounds;
# 5: k up to MAX_CALIBRATED_K

# The longest draft the cost model measures (and so the adaptive policy allows): long
# copied stretches (a code answer restating its prompt) verify best in long passes where
# extra positions are cheap; the measurement says whether they are on this machine.
# Targets whose rows must match one-position passes bit for bit (an int8 target's) stop
# where their per-query attention does (verispec.models.exact_rows_limit).
MAX_CALIBRATED_K = 32


@dataclass(frozen=True)
class CostModel:
    """Measured relative costs. ``c_verify[k]`` for k = 0..k_max (``c_verify[0] == 1``)."""

    c_verify: tuple[float, ...]
    c_draft: float
    target_step_seconds: float = 0.0

    @property
    def max_k(self) -> int:
        return len(self.c_verify) - 1

    def speedup(self, alpha: float, k: int) -> float:
        return expected_tokens(alpha, k) / (self.c_verify[k] + k * self.c_draft)

    def best_k(self, alpha: float, *, max_k: int | None = None) -> int:
        """The draft length with the highest predicted speedup; 0 if none beats plain decoding."""
        top = min(self.max_k, max_k if max_k is not None else self.max_k)
        best, best_speedup = 0, 1.0
        for k in range(1, top + 1):
            s = self.speedup(alpha, k)
            if s > best_speedup * 1.02:  # demand a margin: measurement noise must not pick k
                best, best_speedup = k, s
        return best


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens per target pass with draft length k (k + 1 when alpha = 1)."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def time_passes(
    passes: list[tuple[LanguageModel, int]], context: list[int], repeats: int
) -> list[float]:
    """Median time of each ``(model, new tokens)`` pass on a warm cache, rounds interleaved.

    Every round times each pass once, so load that comes and goes while
    measuring hits all of them alike instead of inflating some of the ratios.
    The median, not the minimum: every cost is divided by the one-token pass's,
    so one outlying reading of that pass would shift every ratio.
    """
    caches = {}
    for model, _ in passes:
        if id(model) not in caches:
            cache = model.new_cache()
            model.forward(cache, context, num_logits=1)
            caches[id(model)] = cache
    base = len(context)
    times: list[list[float]] = [[] for _ in passes]
    for round_ in range(repeats + 1):
        for i, (model, n_new) in enumerate(passes):
            new = [context[j % len(context)] for j in range(n_new)]
            cache = caches[id(model)]
            t0 = time.perf_counter()
            model.forward(cache, new)
            elapsed = time.perf_counter() - t0
            cache.crop(base)
            if round_:  # the first round warms up
                times[i].append(elapsed)
    return [statistics.median(t) for t in times]


def measure_costs(
    target: LanguageModel,
    draft: LanguageModel | None,
    *,
    max_k: int = 16,
    context_length: int = 100,
    repeats: int = 5,
) -> CostModel:
    """Time target passes of 1..max_k+1 positions (and one draft step) on a warm cache."""
    context = [(i * 7919) % target.vocab_size for i in range(context_length)]
    passes = [(target, n) for n in range(1, max_k + 2)]
    if draft is not None:
        passes.append((draft, 1))
    times = time_passes(passes, context, repeats)
    one = times[0]
    c_verify = [1.0] + [t / one for t in times[1 : max_k + 1]]
    # Enforce monotonicity: scoring more positions never costs less (noise aside).
    for k in range(1, len(c_verify)):
        c_verify[k] = max(c_verify[k], c_verify[k - 1])
    c_draft = times[-1] / one if draft is not None else 0.0
    return CostModel(c_verify=tuple(c_verify), c_draft=c_draft, target_step_seconds=one)


def cached_costs(
    key: str,
    cache_dir: Path,
    target: LanguageModel,
    draft: LanguageModel | None,
    *,
    max_k: int = 16,
) -> CostModel:
    """:func:`measure_costs`, measured once per (machine, models, kernels) key and kept on disk."""
    path = cache_dir / "costs" / f"{key}.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
            return CostModel(
                c_verify=tuple(data["c_verify"]),
                c_draft=float(data["c_draft"]),
                target_step_seconds=float(data.get("target_step_seconds", 0.0)),
            )
        except (ValueError, KeyError, TypeError):
            pass  # a damaged file is measured again
    costs = measure_costs(target, draft, max_k=max_k)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(costs), indent=2))
    return costs


def costs_for(target: LanguageModel, draft: LanguageModel | None, *, cache_dir: Path) -> CostModel:
    """The cost model of this target/draft pair on this machine, measured once and cached
    in ``cache_dir``.

    The key covers the models, their kernels, the thread count, torch's version and the
    processor, so a change of any of them measures again.
    """
    import hashlib
    import os
    import platform

    import torch

    parts = [
        COSTS_VERSION,
        target.name,
        kernel_description(target),
        draft.name if draft is not None else "-",
        kernel_description(draft) if draft is not None else "",
        str(torch.get_num_threads()),
        torch.__version__,
        platform.processor() or platform.machine(),
        str(os.cpu_count()),
    ]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return cached_costs(key, cache_dir, target, draft, max_k=calibrated_length(target))


def calibrated_length(target: LanguageModel) -> int:
    """The longest draft :func:`costs_for` measures for ``target``: :data:`MAX_CALIBRATED_K`,
    or less where longer passes would not score each position exactly as alone."""
    limit = exact_rows_limit(target)
    return MAX_CALIBRATED_K if limit is None else min(MAX_CALIBRATED_K, limit)
