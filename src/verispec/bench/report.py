"""Summaries of a benchmark run: results.json (raw records + summary + machine), results.md.

Figures per configuration and per group of prompts ("all", each set, each
MT-bench category):

- tokens/s: new tokens / wall time, prompt pass included; median over runs
  (robust to a burst of load on a shared machine; the aggregate is in results.json);
- speedup: per prompt, tokens/s over the plain configuration's on the same
  prompt; median and min..max over prompts;
- decode speedup: the same ratio after the first pass (tokens after the first
  pass / time after it): what speculation changes, with the target's prompt pass
  (which gives the first token), which it cannot speed up, left out. A draft
  model's own prompt pass comes later (with the first draft), so it counts here.
  The predicted speedup is a prediction of this one;
- acceptance rate (accepted / drafted), tokens per target pass, acceptance by
  draft position (P(draft token i kept | i tokens were drafted));
- time to first token (median); per-token latency p50 / p95 (each pass's
  latency divided by its tokens, pooled over runs, first pass excluded);
- time split: target prompt pass / drafting (the draft model's own prompt pass
  included) / target passes and verification / other;
- outside forward: share of wall time spent outside target and draft forward
  passes (the decoding loop's own overhead: sampling, verification, bookkeeping);
- predicted speedup E(alpha, k) / (c_verify(k) + k c_draft), with c_verify and
  c_draft measured at the start of the run and alpha solved from the observed
  accepted drafts per drafting pass, sum_{i=1..k} alpha^i. Where the draft
  length varies from pass to pass (the adaptive policy; prompt lookup, which
  drafts nothing where the context has no match), the same formula is applied
  to each decoding pass with its own draft length j and summed:
  sum_j n_j E(alpha, j) / sum_j n_j (c_verify(j) + j c_draft), with n_j the
  passes that verified j drafts, c_verify(0) = 1, c_draft = 0 for free (lookup)
  drafts, and alpha solved from sum_j n_j sum_{i=1..j} alpha^i = accepted.
  For a fixed k this is the formula above. "measured / predicted" divides the
  aggregate decode speedup (decode tokens / decode time, over the group, against
  plain's on the same turns) by it.

Engines (verispec, transformers, llama.cpp, OpenVINO GenAI), per set:

- tokens/s (median), the precision each ran at, acceptance where the engine reports it;
- "= own plain": the share of prompts whose speculative output is token-identical
  to the same engine's plain output (only verispec's is a guarantee);
- speedup of verispec's best speculative configuration, and of hybrid-auto (the
  default), over each peer configuration: ratio of median tokens/s, same run.

The limit: a decode pass reads the target's weights once, so the machine's read
bandwidth (:func:`read_bandwidth`) over the bytes a pass reads
(:func:`bytes_per_pass`) bounds the target passes per second; times a
configuration's tokens per pass, it bounds its tokens/s.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from verispec.bench.runner import BenchConfig, BenchRun, RunRecord
from verispec.policy.costs import expected_tokens


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    import verispec

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "verispec": verispec.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
    }


def read_bandwidth(megabytes: int = 512, repeats: int = 3) -> float:
    """The machine's read bandwidth in GB/s: a sum over a ``megabytes`` fp32 tensor with
    the current torch threads, best of ``repeats``."""
    import torch

    data = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    data.sum()  # pages touched, threads started
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * data.element_size() / max(best, 1e-9) / 1e9


def _tensor_key(tensor: Any) -> tuple[Any, ...]:
    try:  # tied weights share their storage
        return ("ptr", tensor.data_ptr(), tensor.numel(), tensor.dtype)
    except RuntimeError:  # opaque tensors (oneDNN prepacked weights) have no storage
        return ("id", id(tensor))


def bytes_per_pass(model: Any) -> int:
    """Bytes of the target as loaded, which one pass reads: ``model.hf``'s parameters and
    buffers, tensors kept as plain attributes (oneDNN's prepacked ``packed`` weights and
    biases), and fbgemm dynamic int8 linears' packed weights; tied weights once. An int4
    linear's int8 copy for long prompt passes is left out (decode passes do not read it),
    and so is the input embedding table, of which a pass reads only its tokens' rows
    (unless the output head shares its weight: then the head reads it whole, counted once).
    """
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao is deprecated, and what fbgemm layers are
        from torch.ao.nn.quantized import dynamic as quantized_dynamic

    root = getattr(model, "hf", model)
    seen: set[tuple[Any, ...]] = set()
    total = 0

    def count(tensor: Any) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor):
            key = _tensor_key(tensor)
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()

    skip: set[int] = set()
    embed = root.get_input_embeddings() if hasattr(root, "get_input_embeddings") else None
    head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    if isinstance(embed, torch.nn.Embedding) and embed.weight is not head_weight:
        skip.add(id(embed))
    for module in root.modules():
        if id(module) in skip:
            continue
        if type(module).__name__ == "Int4Linear" and isinstance(
            getattr(module, "wide", None), torch.nn.Module
        ):
            skip.update(id(m) for m in module.wide.modules())
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            count(tensor)
        for value in vars(module).values():  # tensors that are neither (packed weights)
            count(value)
        if isinstance(module, quantized_dynamic.Linear):
            for tensor in module._packed_params._weight_bias():
                count(tensor)
    return total


def solve_alpha(accepted_per_pass: float, k: int) -> float:
    """alpha with sum_{i=1..k} alpha^i = ``accepted_per_pass`` (bisection; 1 when >= k)."""
    return solve_alpha_mixed(accepted_per_pass, {k: 1})


def solve_alpha_mixed(accepted: float, passes_by_length: dict[int, int]) -> float:
    """alpha with sum_j n_j sum_{i=1..j} alpha^i = ``accepted``, n_j = ``passes_by_length[j]``.

    Bisection; 1 when ``accepted`` reaches every drafted token.
    """
    drafted = sum(j * n for j, n in passes_by_length.items())
    if accepted >= drafted:
        return 1.0

    def accepted_at(alpha: float) -> float:
        return sum(n * sum(alpha**i for i in range(1, j + 1)) for j, n in passes_by_length.items())

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if accepted_at(mid) < accepted:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def decode_passes_by_length(runs: Sequence[RunRecord]) -> dict[int, int] | None:
    """Target passes after the prompt pass, by draft length, over ``runs``; None if unknown."""
    if not runs or any(not r.passes_by_draft_length for r in runs):
        return None
    out: dict[int, int] = {}
    for r in runs:
        for j, n in enumerate(r.passes_by_draft_length):
            out[j] = out.get(j, 0) + n
        out[0] -= 1  # the prompt pass, which verified no draft
    return {j: n for j, n in out.items() if n > 0}


def predict_speedup(
    runs: Sequence[RunRecord], costs: dict[str, Any], *, c_draft: float
) -> tuple[float, float] | None:
    """(alpha, predicted decode speedup) from the runs' passes and the measured costs.

    sum_j n_j E(alpha, j) / sum_j n_j (c_verify(j) + j c_draft), free drafts at
    no drafting cost; None when a draft length is beyond the measured c_verify.
    """
    passes = decode_passes_by_length(runs)
    accepted = _sum([r.accepted for r in runs])
    free = _sum([r.free_drafted for r in runs])
    if not passes or accepted is None or free is None:
        return None
    c_verify = costs["c_verify"]
    if max(passes) >= len(c_verify):
        return None
    alpha = solve_alpha_mixed(accepted, passes)
    drafted = sum(j * n for j, n in passes.items())
    tokens = sum(n * expected_tokens(alpha, j) for j, n in passes.items())
    cost = sum(n * (c_verify[j] if j else 1.0) for j, n in passes.items())
    cost += (drafted - free) * c_draft
    return alpha, tokens / cost


def _sum(values: Sequence[float | int | None]) -> float | None:
    return (
        None if any(v is None for v in values) else float(sum(v for v in values if v is not None))
    )


def _position_rates(runs: Sequence[RunRecord]) -> list[float]:
    width = max((len(r.drafted_by_position) for r in runs), default=0)
    drafted, accepted = [0] * width, [0] * width
    for r in runs:
        for i, (d, a) in enumerate(zip(r.drafted_by_position, r.accepted_by_position, strict=True)):
            drafted[i] += d
            accepted[i] += a
    return [a / d if d else 0.0 for a, d in zip(accepted, drafted, strict=True)]


def _group_stats(
    config: BenchConfig,
    runs: Sequence[RunRecord],
    plain: dict[tuple[str, int], RunRecord],
    costs: dict[str, Any] | None,
) -> dict[str, Any]:
    total_time = sum(r.time_total for r in runs)
    new_tokens = sum(r.new_tokens for r in runs)
    passes = sum(len(r.pass_ends) for r in runs)
    speedups = [
        r.tokens_per_second / plain[(r.prompt_id, r.turn)].tokens_per_second
        for r in runs
        if plain[(r.prompt_id, r.turn)].tokens_per_second > 0
    ]
    decode_speedups = [
        r.decode_tokens_per_second / plain[(r.prompt_id, r.turn)].decode_tokens_per_second
        for r in runs
        if plain[(r.prompt_id, r.turn)].decode_tokens_per_second > 0
    ]
    forward = _sum([r.time_forward for r in runs])
    latencies = [t for r in runs for t in r.token_latencies()]
    drafted, accepted = _sum([r.drafted for r in runs]), _sum([r.accepted for r in runs])
    split = {
        part: _sum([getattr(r, f"time_{part}") for r in runs])
        for part in ("prefill", "draft", "verify", "overhead")
    }
    stats: dict[str, Any] = {
        "runs": len(runs),
        "new_tokens": new_tokens,
        "time_total": total_time,
        "tokens_per_second": statistics.median(r.tokens_per_second for r in runs),
        "tokens_per_second_aggregate": new_tokens / total_time if total_time > 0 else 0.0,
        "speedup_median": statistics.median(speedups) if speedups else None,
        "speedup_min": min(speedups, default=None),
        "speedup_max": max(speedups, default=None),
        "decode_speedup_median": statistics.median(decode_speedups) if decode_speedups else None,
        "outside_forward_share": (
            1.0 - forward / total_time if forward is not None and total_time > 0 else None
        ),
        "tokens_per_pass": new_tokens / passes if passes else None,
        "acceptance_rate": accepted / drafted if drafted and accepted is not None else None,
        "acceptance_by_position": _position_rates(runs),
        "time_to_first_token_median": statistics.median(r.time_to_first_token for r in runs),
        "latency_p50_ms": float(np.percentile(latencies, 50)) * 1e3 if latencies else None,
        "latency_p95_ms": float(np.percentile(latencies, 95)) * 1e3 if latencies else None,
        "time_split": split if split["verify"] is not None else None,
        "mismatches": sum(1 for r in runs if r.matches_plain is False),
        "own_plain_identical": _own_plain_share(runs),
        "alpha": None,
        "predicted_speedup": None,
    }
    if costs and config.engine == "verispec" and config.speculative and drafted:
        predicted = predict_speedup(runs, costs, c_draft=costs["c_draft"])
        if predicted is not None:
            stats["alpha"], stats["predicted_speedup"] = predicted
    decode = _decode_speedup_aggregate(runs, plain)
    stats["decode_speedup_aggregate"] = decode
    if decode is not None and stats["predicted_speedup"]:
        stats["measured_over_predicted"] = decode / stats["predicted_speedup"]
    else:
        stats["measured_over_predicted"] = None
    return stats


def _own_plain_share(runs: Sequence[RunRecord]) -> float | None:
    """Share of prompts (all their turns) token-identical to the engine's own plain output."""
    prompts: dict[str, bool] = {}
    for r in runs:
        if r.matches_own_plain is not None:
            prompts[r.prompt_id] = prompts.get(r.prompt_id, True) and r.matches_own_plain
    return sum(prompts.values()) / len(prompts) if prompts else None


def _decode_rate(runs: Sequence[RunRecord]) -> float | None:
    seconds = sum(r.decode_seconds for r in runs)
    return sum(r.decode_tokens for r in runs) / seconds if seconds > 0 else None


def _decode_speedup_aggregate(
    runs: Sequence[RunRecord], plain: dict[tuple[str, int], RunRecord]
) -> float | None:
    """Decode tokens / decode time over ``runs``, over plain's on the same turns."""
    mine = _decode_rate(runs)
    theirs = _decode_rate([plain[(r.prompt_id, r.turn)] for r in runs])
    return mine / theirs if mine and theirs else None


def groups_of(records: Sequence[RunRecord]) -> list[str]:
    """Group names: all, then each set, then each category that is not a set of its own."""
    sets = list(dict.fromkeys(r.set_name for r in records))
    categories = [c for c in dict.fromkeys(r.category for r in records) if c not in sets]
    return ["all", *sets, *categories]


def _in_group(record: RunRecord, group: str) -> bool:
    return group in ("all", record.set_name, record.category)


def summarize(run: BenchRun, costs: dict[str, Any] | None) -> dict[str, Any]:
    plain = {(r.prompt_id, r.turn): r for r in run.records if r.config == "plain"}
    groups = groups_of(run.records)
    by_config: dict[str, dict[str, Any]] = {}
    for config in run.configs:
        runs = [r for r in run.records if r.config == config.name]
        by_config[config.name] = {
            g: _group_stats(config, [r for r in runs if _in_group(r, g)], plain, costs)
            for g in groups
        }
    engines = {c.name: c.engine for c in run.configs}
    mismatches = [
        {
            "config": r.config,
            "prompt_id": r.prompt_id,
            "turn": r.turn,
            "first_mismatch": r.first_mismatch,
            "engine": engines[r.config],
        }
        for r in run.records
        if r.matches_plain is False
    ]
    return {
        "groups": groups,
        "configs": by_config,
        "mismatches": mismatches,
        "engines": engines_summary(run, by_config),
    }


def set_groups(run: BenchRun) -> list[str]:
    """ "all", then each prompt set (the categories of the engines table)."""
    return ["all", *dict.fromkeys(r.set_name for r in run.records)]


def engines_summary(run: BenchRun, by_config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per set: verispec's best speculative configuration, and per configuration its
    engine, median tokens/s, acceptance, identity with its own plain output and
    verispec's speedup over it (best speculative, hybrid-auto)."""
    groups = set_groups(run)
    ours = [c.name for c in run.configs if c.engine == "verispec" and c.speculative]

    def tps(name: str, group: str) -> float | None:
        stats = by_config[name].get(group)
        return stats["tokens_per_second"] if stats and stats["runs"] else None

    best: dict[str, str | None] = {}
    for g in groups:
        rates = [(tps(c, g) or 0.0, c) for c in ours]
        best[g] = max(rates)[1] if rates and max(rates)[0] > 0 else None
    hybrid = "hybrid-auto" if "hybrid-auto" in ours else None

    def ratio(mine: str | None, theirs: str, group: str) -> float | None:
        a, b = (tps(mine, group) if mine else None), tps(theirs, group)
        return a / b if a and b else None

    rows: dict[str, Any] = {}
    for config in run.configs:
        info = run.peers.get(config.engine, {})
        peer = config.engine != "verispec"
        rows[config.name] = {
            "engine": info.get("engine") or config.engine,
            "own_plain": config.own_plain,
            "tokens_per_second": {g: tps(config.name, g) for g in groups},
            "acceptance_rate": by_config[config.name]["all"]["acceptance_rate"],
            "own_plain_identical": {
                g: by_config[config.name][g]["own_plain_identical"] for g in groups
            },
            "speedup_of_best": (
                {g: ratio(best[g], config.name, g) for g in groups} if peer else None
            ),
            "speedup_of_hybrid_auto": (
                {g: ratio(hybrid, config.name, g) for g in groups} if peer else None
            ),
        }
    return {"groups": groups, "best_speculative": best, "configs": rows}


def limit_rows(
    run: BenchRun, summary: dict[str, Any], limit: dict[str, Any]
) -> list[dict[str, Any]]:
    """Per verispec configuration: the tokens/s bound (passes/s the bandwidth allows x
    its tokens per pass) and the measured tokens/s (all tokens / all time) against it."""
    rows = []
    for config in run.configs:
        if config.engine != "verispec":
            continue
        stats = summary["configs"][config.name]["all"]
        per_pass = stats["tokens_per_pass"]
        bound = limit["passes_per_second"] * per_pass if per_pass else None
        measured = stats["tokens_per_second_aggregate"]
        rows.append(
            {
                "config": config.name,
                "tokens_per_pass": per_pass,
                "bound_tokens_per_second": bound,
                "tokens_per_second": measured,
                "share_of_bound": measured / bound if bound else None,
            }
        )
    return rows


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _prefix_cache_line(run: BenchRun) -> str:
    """How much of the prompts the verispec configurations' prefix caches saved."""
    shares = []
    for later in (False, True):
        runs = [
            r for r in run.records if r.cached_prompt_tokens is not None and (r.turn > 1) == later
        ]
        total = sum(r.prompt_tokens for r in runs)
        reused = sum(r.cached_prompt_tokens or 0 for r in runs)
        shares.append(f"{reused / total:.0%}" if total else "–")
    return (
        "Prefix caching on: every verispec configuration (plain included) reuses its own "
        f"earlier turn's caches; it skipped {shares[1]} of the prompt tokens of later turns "
        f"and {shares[0]} of first turns (a shared chat-template opening). "
        "The peers score every prompt in full."
    )


def _runs_per_config(run: BenchRun, field: str) -> Iterator[tuple[str, list[RunRecord]]]:
    """(configuration name, its records) for each configuration with a record whose
    ``field`` is non-zero, only those records."""
    for config in run.configs:
        runs = [r for r in run.records if r.config == config.name and getattr(r, field)]
        if runs:
            yield config.name, runs


def _siblings_line(run: BenchRun) -> str | None:
    """How often the configurations' token-tree siblings were verified and kept."""
    parts = []
    for name, runs in _runs_per_config(run, "siblings"):
        verified = sum(r.siblings or 0 for r in runs)
        kept = sum(r.siblings_kept or 0 for r in runs)
        passes = sum(sum(r.passes_by_draft_length[1:]) for r in runs)
        tokens = sum(r.new_tokens for r in runs)
        parts.append(
            f"{name} verified {verified} siblings beside its drafts "
            f"({verified / max(passes, 1):.2f} per drafting pass) and kept {kept} "
            f"({kept / max(verified, 1):.0%} of them; {kept / max(tokens, 1):.1%} of its tokens)"
        )
    if not parts:
        return None
    return (
        "Token trees (a draft's runner-up tokens verified in the same pass): "
        + "; ".join(parts)
        + "."
    )


def _hints_line(run: BenchRun) -> str | None:
    """How many model-drafted tokens came off one draft pass over a prompt-lookup hint."""
    parts = []
    for name, runs in _runs_per_config(run, "hinted_drafted"):
        hinted = sum(r.hinted_drafted or 0 for r in runs)
        model = sum((r.drafted or 0) - (r.free_drafted or 0) for r in runs)
        parts.append(f"{name} {hinted} of its {model} model-drafted tokens")
    if not parts:
        return None
    return (
        "Hinted drafting (the draft model scores a prompt-lookup continuation in one pass "
        "and keeps it as far as it agrees): "
        + "; ".join(parts)
        + ". The predicted speedups charge these tokens c_draft each, like drafted ones."
    )


def _precision(config: BenchConfig, setup: dict[str, Any], peers: dict[str, Any]) -> str:
    """The precision column: T (target) / T + D (with the draft model) for verispec and
    transformers, which run verispec's modules; the engine's own words for the others."""
    if config.external:
        info = peers.get(config.engine, {})
        text = info.get("precision") or "–"
        if config.speculative and info.get("draft_precision"):
            text += f" + draft {info['draft_precision']}"
        return str(text)
    if config.name == "hf-default":
        return str(setup.get("default_target_kernels") or "default kernels")
    return "T + D" if config.drafter in ("model", "hybrid") else "T"


def _engines_lines(run: BenchRun, summary: dict[str, Any], setup: dict[str, Any]) -> list[str]:
    """The engines table (tokens/s per set, precision, acceptance, = own plain) and the
    table of verispec's speedups over the peers."""
    engines = summary.get("engines")
    if not engines or not run.configs:
        return []
    groups, rows = engines["groups"], engines["configs"]
    lines = [
        "",
        'Engines, per set: median tokens/s; "= own plain": share of prompts whose output is '
        "token-identical to the same engine's plain output (guaranteed for verispec only); "
        "precision T / T + D: the target's (and draft's) kernels, as in the first line.",
        "",
        "| engine | config | precision | tokens/s: "
        + " | ".join(groups)
        + " | acceptance | = own plain: "
        + " | ".join(groups)
        + " |",
        "|---|---|---|" + "---:|" * len(groups) + "---:|" + "---:|" * len(groups),
    ]
    for config in run.configs:
        row = rows[config.name]
        rates = [_fmt(row["tokens_per_second"][g]) for g in groups]
        same = [_fmt(row["own_plain_identical"][g], ".0%") for g in groups]
        lines.append(
            f"| {row['engine']} | {config.name} | {_precision(config, setup, run.peers)} | "
            + " | ".join(rates)
            + f" | {_fmt(row['acceptance_rate'], '.0%')} | "
            + " | ".join(same)
            + " |"
        )
    for info in run.peers.values():
        if info.get("build"):
            lines += ["", f"{info['engine']}: {info['build']}"]
    peers = [c.name for c in run.configs if c.engine != "verispec"]
    best = engines["best_speculative"]
    if peers and any(best.values()):
        hybrid = any(c.name == "hybrid-auto" for c in run.configs)
        lines += [
            "",
            "verispec's speedup over each peer (median tokens/s over the peer's, same run): "
            + (
                "best speculative configuration / hybrid-auto (the default):"
                if hybrid
                else "best speculative configuration:"
            ),
            "",
            "| peer | " + " | ".join(groups) + " |",
            "|---|" + "---:|" * len(groups),
            "| *(best verispec)* | " + " | ".join(best[g] or "–" for g in groups) + " |",
        ]
        for name in peers:
            row = rows[name]
            cells = [
                _fmt(row["speedup_of_best"][g], ".2f", "x")
                + (f" / {_fmt(row['speedup_of_hybrid_auto'][g], '.2f', 'x')}" if hybrid else "")
                for g in groups
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _limit_lines(run: BenchRun, summary: dict[str, Any], setup: dict[str, Any]) -> list[str]:
    """The memory-bandwidth bound on each verispec configuration's tokens/s."""
    limit = setup.get("limit")
    if not limit:
        return []
    lines = [
        "",
        f"The limit: this machine reads {limit['read_bandwidth_gbps']:.1f} GB/s (sum over a "
        f"512 MB fp32 tensor, {limit.get('threads', '?')} threads, best of 3); a target pass "
        f"reads {limit['bytes_per_pass'] / 1e6:.0f} MB (its parameters and buffers as loaded), "
        f"so at most {limit['passes_per_second']:.1f} target passes/s. Bound = that x tokens "
        "per pass (draft passes not counted); measured = all tokens / all time.",
        "",
        "| config | tokens/pass | bound tokens/s | measured tokens/s | measured / bound |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in limit_rows(run, summary, limit):
        lines.append(
            f"| {row['config']} | {_fmt(row['tokens_per_pass'])} "
            f"| {_fmt(row['bound_tokens_per_second'], '.1f')} "
            f"| {_fmt(row['tokens_per_second'], '.1f')} | {_fmt(row['share_of_bound'], '.0%')} |"
        )
    return lines


def markdown(
    run: BenchRun, summary: dict[str, Any], setup: dict[str, Any], costs: dict[str, Any] | None
) -> str:
    """results.md: tables ready to paste into a README."""
    mode = (
        "greedy"
        if setup["temperature"] == 0
        else (f"sampled (T={setup['temperature']}, top-p={setup['top_p']}, top-k={setup['top_k']})")
    )
    machine = setup["machine"]
    lines = [
        f"**{setup['target']}** (target, {setup.get('target_kernels') or 'default kernels'}) "
        f"with **{setup['draft'] or '–'}** (draft, {setup.get('draft_kernels') or '–'}), {mode}, "
        f"at most {setup['max_new_tokens']} new tokens, {setup['num_units']} prompt turns "
        f"({', '.join(setup['sets'])}); {machine['cpu']}, {machine['torch_threads']} threads, "
        f"torch {machine['torch']}, {machine['date'][:10]}.",
        "",
    ]
    if setup.get("prefix_cache"):
        lines += [_prefix_cache_line(run), ""]
    for extra in (_siblings_line(run), _hints_line(run)):
        if extra is not None:
            lines += [extra, ""]
    bad = [m for m in summary["mismatches"] if m["engine"] == "verispec"]
    if bad:
        lines += [
            f"**GREEDY MISMATCH in {len(bad)} verispec runs (a bug):** "
            + ", ".join(f"{m['config']} {m['prompt_id']} turn {m['turn']}" for m in bad),
            "",
        ]
    lines += [
        "| config | tokens/s (median) | speedup median (min–max) | decode speedup | predicted "
        "| measured / predicted | acceptance | tokens/pass | TTFT s | ms/token p50 / p95 "
        "| prompt / draft / verify / other | outside forward | greedy = plain |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for config in run.configs:
        s = summary["configs"][config.name]["all"]
        split = s["time_split"]
        if split:
            total = sum(split.values()) or 1.0
            parts = [split[p] / total for p in ("prefill", "draft", "verify", "overhead")]
            split_text = " / ".join(f"{p:.0%}" for p in parts)
        else:
            split_text = "–"
        check = (
            "–"
            if setup["temperature"] != 0
            else ("yes" if not s["mismatches"] else f"**NO ({s['mismatches']})**")
        )
        lines.append(
            f"| {config.name} | {s['tokens_per_second']:.2f} "
            f"| {_fmt(s['speedup_median'], '.2f', 'x')} "
            f"({_fmt(s['speedup_min'])}–{_fmt(s['speedup_max'])}) "
            f"| {_fmt(s['decode_speedup_median'], '.2f', 'x')} "
            f"| {_fmt(s['predicted_speedup'], '.2f', 'x')} "
            f"| {_fmt(s['measured_over_predicted'], '.2f')} | {_fmt(s['acceptance_rate'], '.0%')} "
            f"| {_fmt(s['tokens_per_pass'])} | {s['time_to_first_token_median']:.2f} "
            f"| {_fmt(s['latency_p50_ms'], '.0f')} / {_fmt(s['latency_p95_ms'], '.0f')} "
            f"| {split_text} | {_fmt(s['outside_forward_share'], '.1%')} | {check} |"
        )
    others = [c.name for c in run.configs if c.name != "plain"]
    lines += [
        "",
        "Median speedup over plain by category (whole generation / after the first pass):",
        "",
        "| category | plain tokens/s (median) | " + " | ".join(others) + " |",
        "|---|---:|" + "---:|" * len(others),
    ]
    for group in summary["groups"]:
        plain_tps = summary["configs"]["plain"][group]["tokens_per_second"]
        cells = [
            _fmt(summary["configs"][c][group]["speedup_median"], ".2f", "x")
            + " / "
            + _fmt(summary["configs"][c][group]["decode_speedup_median"], ".2f", "x")
            for c in others
        ]
        lines.append(f"| {group} | {plain_tps:.2f} | " + " | ".join(cells) + " |")
    lines += _engines_lines(run, summary, setup)
    drafting = [c.name for c in run.configs if c.engine == "verispec" and c.speculative]
    width = max(
        (len(summary["configs"][c]["all"]["acceptance_by_position"]) for c in drafting), default=0
    )
    if width:
        lines += [
            "",
            "Acceptance by draft position (all prompts):",
            "",
            "| config | " + " | ".join(str(i + 1) for i in range(width)) + " |",
            "|---|" + "---:|" * width,
        ]
        for c in drafting:
            rates = summary["configs"][c]["all"]["acceptance_by_position"]
            cells = [f"{r:.0%}" for r in rates] + [""] * (width - len(rates))
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    if costs:
        cv = ", ".join(f"{k}: {v:.2f}" for k, v in enumerate(costs["c_verify"]) if k)
        lines += [
            "",
            f"Measured costs: target step {costs['target_step_seconds'] * 1e3:.0f} ms, "
            f"c_draft {costs['c_draft']:.2f}, c_verify(k) {cv}.",
        ]
    lines += _limit_lines(run, summary, setup)
    for note in run.notes:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def write_results(
    out: Path,
    run: BenchRun,
    summary: dict[str, Any],
    setup: dict[str, Any],
    costs: dict[str, Any] | None,
) -> dict[str, Path]:
    """Write results.json and results.md into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for r in run.records:
        row = dict(r.__dict__)
        row.update(
            new_tokens=r.new_tokens,
            tokens_per_second=r.tokens_per_second,
            time_to_first_token=r.time_to_first_token,
            decode_tokens_per_second=r.decode_tokens_per_second,
        )
        records.append(row)
    payload = {
        "setup": setup,
        "configs": [c.__dict__ for c in run.configs],
        "costs": costs,
        "notes": run.notes,
        "peers": run.peers,
        "limit": (
            {**setup["limit"], "configs": limit_rows(run, summary, setup["limit"])}
            if setup.get("limit")
            else None
        ),
        "summary": summary,
        "records": records,
    }
    paths = {"json": out / "results.json", "md": out / "results.md"}
    paths["json"].write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown(run, summary, setup, costs), encoding="utf-8")
    return paths
