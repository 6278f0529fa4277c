"""Kernels and precisions chosen by measurement on the machine at hand.

Which way of running a linear layer is fastest differs from one CPU to the next
(AVX2 or AVX-512, AVX512_BF16, AMX, the memory's bandwidth), and so does whether
a kernel scores each row of a call the same whatever else is in the call. So
verispec measures, once per machine and model, and keeps the result:

* :func:`linear_table`: for every distinct linear-layer shape of a model and every
  candidate kernel of the precisions asked for, the time of one call for 1..32 rows
  (:data:`ROWS`) and the row count from which the kernel is *row-exact* (a row's
  result is bit for bit the same in a call of any size from there on; shorter
  calls can be padded with zero rows up to it). Each call rotates over several
  layers of the shape, as a pass does, so that no weight stays in the cache.
* :func:`choose_kernels`: per shape, the fastest kernel (a target's only among the
  row-exact ones, so that verifying k drafts scores each position as decoding it
  alone would) and the padding that makes it exact and fast.
* :func:`draft_steps` / :func:`pick_draft_precision`: the draft's whole decoding step
  at each precision, loaded as it runs (compiled where it would be), and the one to
  use (a draft's precision never changes the output, only how often its tokens are
  accepted).
* :func:`cached_trials` / :func:`pick_precision`: ``--precision auto`` for a target.

Measurements are cached in ``<cache>/kernels/`` under a key that covers the
machine's fingerprint (:func:`fingerprint`: processor model and flags, torch's
version, threads); a file whose fingerprint is not this machine's is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

TUNING_VERSION = "2"
ROWS = (1, 2, 4, 8, 16, 32)
# Row counts whose results are compared with the same rows scored in one call of 32.
EXACT_PROBES = (1, 2, 3, 4, 5, 6, 8, 9, 16, 17, 31)
ROTATION = 4  # layers of one shape that a timed call cycles through
# A target's verification scores about this many rows; plain decoding one. Kernels are
# chosen for the sum of both (a draft's for one row).
TARGET_ROWS = (1, 8)
PAD_GAIN = 0.9  # pad calls beyond what exactness needs only where that saves 10%
DRAFT_ROWS = (1,)

Measure = Callable[[Callable[[nn.Linear], nn.Module], Sequence[nn.Linear], torch.dtype], "Timing"]


@dataclass(frozen=True)
class Timing:
    """One kernel on one shape: seconds per call (the fastest of several) for each of
    :data:`ROWS`, and the row count from which it is row-exact (None: not even for 32)."""

    seconds: tuple[float, ...]
    exact_from: int | None


@dataclass(frozen=True)
class LinearTiming:
    shape: tuple[int, int]  # (out_features, in_features)
    layers: int  # how many linear layers of the model have this shape
    kernel: str  # "<precision>/<kernel>", e.g. "bf16/onednn"
    seconds: tuple[float, ...]  # per call, for each of ROWS
    exact_from: int | None


@dataclass(frozen=True)
class KernelChoice:
    kernel: str  # "default" or "onednn"
    min_rows: int  # calls with fewer rows are padded with zero rows to this count
    exact: bool  # every call's rows are scored as in a call of any other size


def fingerprint() -> dict[str, str]:
    """What makes one machine's measurements another's: processor, flags, torch, threads."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == (platform.processor() or platform.machine()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return {
        "cpu": model,
        "flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "machine": platform.machine(),
        "cpus": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "onednn": str(torch.backends.mkldnn.is_available()),
    }


def model_identity(hf: Any) -> str:
    """A model's architecture and shapes (its config), for cache keys."""
    config = getattr(hf, "config", None)
    text = config.to_json_string(use_diff=False) if config is not None else type(hf).__name__
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def time_kernel(
    make: Callable[[nn.Linear], nn.Module],
    linears: Sequence[nn.Linear],
    dtype: torch.dtype,
    *,
    budget: float = 0.15,
) -> Timing:
    """Time ``make(linear)`` for each of :data:`ROWS`, cycling over ``linears`` (up to
    :data:`ROTATION` layers of one shape), and find where it becomes row-exact."""
    modules = [make(linear) for linear in linears[:ROTATION]]
    width = linears[0].in_features
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(32, width, generator=generator).to(dtype)  # [32, in]
    exact_from: int | None = None
    with torch.inference_mode():
        whole = modules[0](probe)
        for m in sorted(EXACT_PROBES, reverse=True):
            if not torch.equal(modules[0](probe[:m]), whole[:m]):
                break
            exact_from = m
        seconds = []
        for rows in ROWS:
            x = probe[:rows].contiguous()
            for module in modules:  # warm up
                module(x)
            times: list[float] = []
            spent = 0.0
            while len(times) < 3 * len(modules) or (spent < budget and len(times) < 60):
                module = modules[len(times) % len(modules)]
                start = time.perf_counter()
                module(x)
                elapsed = time.perf_counter() - start
                times.append(elapsed)
                spent += elapsed
            seconds.append(min(times))  # the least disturbed call: others share the CPU
    return Timing(seconds=tuple(seconds), exact_from=exact_from)


def _candidates(precision: str, *, target: bool) -> dict[str, Callable[[nn.Linear], nn.Module]]:
    """The kernels that run ``precision`` on a CPU, by name: each builds a layer from an
    fp32 ``nn.Linear`` of the model."""
    from verispec.models import kernels

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision)
    out: dict[str, Callable[[nn.Linear], nn.Module]] = {}
    if dtype is not None:
        out["default"] = lambda linear: _cast(linear, dtype)
        if kernels.onednn_available():
            out["onednn"] = lambda linear: kernels.OneDNNLinear(_cast(linear, dtype), min_rows=1)
    elif precision == "int8":
        out["fbgemm"] = kernels.RowQuantizedLinear if target else kernels.int8_draft_linear
    elif precision == "int8w":
        out["weight-only"] = kernels.Int8WeightOnlyLinear
    elif precision == "int4" and kernels.int4_available():
        out["weight-only"] = kernels.Int4Linear
    return out


def _cast(linear: nn.Linear, dtype: torch.dtype) -> nn.Linear:
    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        copy.weight = nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        if linear.bias is not None:
            copy.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
    return copy


def linears_by_shape(hf: nn.Module) -> dict[tuple[int, int], list[nn.Linear]]:
    """The model's plain ``nn.Linear`` layers grouped by (out, in) shape."""
    groups: dict[tuple[int, int], list[nn.Linear]] = {}
    for module in hf.modules():
        if type(module) is nn.Linear:
            groups.setdefault((module.out_features, module.in_features), []).append(module)
    return groups


def _activation_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def measure_linears(
    hf: nn.Module, precisions: Sequence[str], *, target: bool, measure: Measure | None = None
) -> list[LinearTiming]:
    """Time every candidate kernel of ``precisions`` on every linear shape of ``hf``
    (an fp32 model; each candidate is built from copies of its layers)."""
    run = measure or time_kernel
    out: list[LinearTiming] = []
    for shape, linears in linears_by_shape(hf).items():
        for precision in precisions:
            for name, make in _candidates(precision, target=target).items():
                if precision == "int4" and shape[1] % 32:
                    continue  # Int4Linear's groups; such layers stay fp32
                timing = run(make, linears, _activation_dtype(precision))
                out.append(
                    LinearTiming(
                        shape=shape,
                        layers=len(linears),
                        kernel=f"{precision}/{name}",
                        seconds=tuple(timing.seconds),
                        exact_from=timing.exact_from,
                    )
                )
    return out


def _cache_path(cache_dir: Path, parts: Sequence[str]) -> Path:
    key = hashlib.sha256("|".join([TUNING_VERSION, *parts]).encode()).hexdigest()[:16]
    return cache_dir / "kernels" / f"{key}.json"


def linear_table(
    hf: nn.Module,
    precisions: Sequence[str],
    *,
    target: bool,
    cache_dir: Path | None,
    measure: Measure | None = None,
) -> list[LinearTiming]:
    """:func:`measure_linears`, measured once per machine, model and precisions and
    kept in ``cache_dir`` (None: not kept). A cached file is used only when the
    fingerprint stored in it is this machine's (:func:`fingerprint`)."""
    what = [model_identity(hf), ",".join(precisions), "target" if target else "draft"]

    def decode(result: Any) -> list[LinearTiming]:
        return [
            LinearTiming(
                shape=(int(t["shape"][0]), int(t["shape"][1])),
                layers=int(t["layers"]),
                kernel=str(t["kernel"]),
                seconds=tuple(float(s) for s in t["seconds"]),
                exact_from=None if t["exact_from"] is None else int(t["exact_from"]),
            )
            for t in result
        ]

    def compute() -> list[dict[str, Any]]:
        return [asdict(t) for t in measure_linears(hf, precisions, target=target, measure=measure)]

    return decode(_cached(cache_dir, what, compute, lambda r: r))


def padded_seconds(timing: LinearTiming, rows: int, min_rows: int) -> float:
    """Seconds of a call of ``rows`` rows padded to at least ``min_rows`` (interpolated
    between the measured row counts)."""
    n = max(rows, min_rows)
    for i, measured in enumerate(ROWS):
        if n <= measured:
            if i == 0 or n == measured:
                return timing.seconds[i]
            lo, hi = ROWS[i - 1], measured
            w = (n - lo) / (hi - lo)
            return timing.seconds[i - 1] * (1 - w) + timing.seconds[i] * w
    return timing.seconds[-1] * n / ROWS[-1]


def _best_padding(timing: LinearTiming, *, exact: bool, use_rows: Sequence[int]) -> int | None:
    """The padding (rows) that makes ``timing``'s kernel cheapest for ``use_rows``
    (at least its exact row count when ``exact``), or None if it can never be exact."""
    if exact and timing.exact_from is None:
        return None
    floor = (timing.exact_from or 1) if exact else 1

    def cost(r: int) -> float:
        return sum(padded_seconds(timing, n, r) for n in use_rows)

    best = min(range(floor, max(floor, 8) + 1), key=lambda r: (cost(r), r))
    # Padding further than needed must pay clearly (timings of small layers are noisy).
    return best if cost(best) < PAD_GAIN * cost(floor) else floor


def choose_kernels(
    table: Sequence[LinearTiming],
    precision: str,
    *,
    exact: bool,
    use_rows: Sequence[int],
    only: str | None = None,
) -> dict[tuple[int, int], KernelChoice]:
    """Per shape, the fastest kernel of ``precision`` for calls of ``use_rows`` rows,
    with its padding. ``exact``: only kernels that score rows alike in calls of any
    size (padded), unless none is; ``only`` forces one kernel (``--kernels``)."""
    choices: dict[tuple[int, int], KernelChoice] = {}
    shapes = dict.fromkeys(t.shape for t in table)
    for shape in shapes:
        rows = [
            t
            for t in table
            if t.shape == shape
            and t.kernel.split("/")[0] == precision
            and (only is None or t.kernel.split("/")[1] == only)
        ]
        scored: list[tuple[float, int, LinearTiming, bool]] = []
        for t in rows:
            pad = _best_padding(t, exact=exact, use_rows=use_rows)
            is_exact = pad is not None
            if pad is None:
                pad = _best_padding(t, exact=False, use_rows=use_rows) or 1
            cost = sum(padded_seconds(t, n, pad) for n in use_rows)
            scored.append((cost, pad, t, is_exact))
        if not scored:
            continue
        pool = [s for s in scored if s[3]] if exact and any(s[3] for s in scored) else scored
        cost, pad, best, is_exact = min(pool, key=lambda s: s[0])
        choices[shape] = KernelChoice(best.kernel.split("/")[1], pad, is_exact)
    return choices


def step_seconds(table: Sequence[LinearTiming], precision: str, rows: int = 1) -> float | None:
    """Seconds of all the model's linear layers for one call of ``rows`` rows at
    ``precision`` (each shape on its fastest kernel), or None if some shape lacks one."""
    total = 0.0
    for shape in dict.fromkeys(t.shape for t in table):
        options = [t for t in table if t.shape == shape and t.kernel.split("/")[0] == precision]
        if not options:
            if precision == "int4":  # layers too narrow for int4 groups stay fp32
                options = [t for t in table if t.shape == shape and t.kernel.startswith("fp32/")]
            if not options:
                return None
        best = min(padded_seconds(t, rows, 1) for t in options)
        total += best * options[0].layers
    return total


# A draft's candidates, in the order preferred among steps within STEP_TIE of the fastest:
# int4 first, whose 4-bit grids hold the bundled Q4_K weights nearly unchanged (so it
# agrees with the target more often than int8, docs/tuning.md), then the finer ones.
DRAFT_PRECISIONS = ("int4", "int8", "bf16", "fp32")
STEP_TIE = 0.9


def draft_linear_steps(
    hf: nn.Module, *, cache_dir: Path | None, measure: Measure | None = None
) -> dict[str, float]:
    """Seconds of a one-row step over all the draft's linear layers, per precision
    (each shape on its fastest kernel): what the whole step spends outside them is
    attention, norms, the cache and Python."""
    from verispec.models import kernels

    candidates = [p for p in DRAFT_PRECISIONS if p != "int4" or kernels.int4_available()]
    table = linear_table(hf, candidates, target=False, cache_dir=cache_dir, measure=measure)
    return {p: s for p in candidates if (s := step_seconds(table, p)) is not None}


def pick_draft_precision(steps: dict[str, float]) -> str:
    """The draft precision to use: among the whole steps within :data:`STEP_TIE` of the
    fastest, the first in :data:`DRAFT_PRECISIONS`."""
    fastest = min(steps.values())
    close = [p for p in DRAFT_PRECISIONS if p in steps and steps[p] * STEP_TIE <= fastest]
    return close[0] if close else min(steps, key=lambda p: steps[p])


def _cached(
    cache_dir: Path | None,
    what: list[str],
    compute: Callable[[], Any],
    decode: Callable[[Any], Any],
) -> Any:
    """``compute()``'s JSON-able result, kept in ``cache_dir`` under this machine's
    fingerprint and ``what``; a file from another machine or torch is not used."""
    machine = fingerprint()
    path = (
        _cache_path(cache_dir, [json.dumps(machine, sort_keys=True), *what]) if cache_dir else None
    )
    if path is not None and path.exists():
        try:
            data = json.loads(path.read_text())
            if data["fingerprint"] == machine and data["what"] == what:
                return decode(data["result"])
        except (ValueError, KeyError, TypeError, IndexError):
            pass  # a damaged file is measured again
    result = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        record = {"fingerprint": machine, "what": what, "result": result}
        tmp.write_text(json.dumps(record, indent=1, default=_plain))
        tmp.replace(path)
    return result


def _plain(value: Any) -> Any:
    return asdict(value) if hasattr(value, "__dataclass_fields__") else str(value)


def draft_steps(
    spec: str,
    identity: str,
    load: Callable[[str], Any],
    *,
    cache_dir: Path | None,
    precisions: Sequence[str],
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Seconds of the draft's whole one-position step at each precision, loaded as a
    bench or server loads it (``load``), once per machine and model."""
    import gc

    def compute() -> dict[str, float]:
        steps = {}
        for precision in precisions:
            if log:
                log(f"measuring the draft at {precision} ...")
            model = load(precision)
            (steps[precision],) = measure_pass_seconds(model, rows=(1,))
            del model
            gc.collect()
        return steps

    what = ["draft-steps", spec, identity, ",".join(precisions)]
    return _cached(cache_dir, what, compute, lambda r: {str(k): float(v) for k, v in r.items()})  # type: ignore[no-any-return]


# --precision auto, for a target: the candidates, the calibration prompts and the rule.
TARGET_PRECISIONS = ("fp32", "bf16", "int8w", "int8")
CALIBRATION_PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in three sentences why the sky is blue.",
    "A shop sells pens at 3 dollars each. How much do 7 pens cost? Think step by step.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
)
CALIBRATION_TOKENS = 48
# A candidate qualifies when, over the calibration prompts, its greedy tokens agree with
# the reference precision's on at least this share of positions before their first
# difference (mean of common-prefix length / tokens). Reduced precisions part from fp32
# somewhere in a long answer; this keeps those that agree on most of a short one.
AGREEMENT = 0.75
PASS_ROWS = ROWS


@dataclass(frozen=True)
class PrecisionTrial:
    precision: str
    pass_seconds: tuple[float, ...]  # one whole target pass for each of PASS_ROWS new positions
    agreement: float  # mean common-prefix share with the reference's greedy tokens
    kernels: str  # what ran it


def measure_pass_seconds(model: Any, rows: Sequence[int] = PASS_ROWS) -> tuple[float, ...]:
    """Median seconds of one whole pass of ``rows`` new positions on a warm cache."""
    from verispec.policy.costs import time_passes

    context = [(i * 7919) % model.vocab_size for i in range(64)]
    return tuple(time_passes([(model, n) for n in rows], context, repeats=3))


def agreement(tokens: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> float:
    """Mean over prompts of the share of ``reference``'s tokens before the first difference."""
    shares = []
    for ours, ref in zip(tokens, reference, strict=True):
        n = next((i for i, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b), None)
        same = min(len(ours), len(ref)) if n is None else n
        shares.append(same / max(1, len(ref)))
    return sum(shares) / max(1, len(shares))


def _greedy_tokens(model: Any) -> list[list[int]]:
    from verispec.generate import encode_prompt, generate

    out = []
    for prompt in CALIBRATION_PROMPTS:
        ids = encode_prompt(model.tokenizer, [{"role": "user", "content": prompt}])
        result = generate(model, None, ids, max_new_tokens=CALIBRATION_TOKENS)
        out.append(list(result.token_ids))
    return out


def precision_trials(
    load: Callable[[str], Any],
    precisions: Sequence[str],
    *,
    reference: str = "fp32",
    log: Callable[[str], None] | None = None,
) -> list[PrecisionTrial]:
    """Load the target at each precision (one at a time), time its passes and compare
    its greedy answers to the calibration prompts with ``reference``'s."""
    import gc

    order = [reference, *[p for p in precisions if p != reference]]
    ref_tokens: list[list[int]] = []
    trials = []
    for precision in order:
        if log:
            log(f"measuring the target at {precision} ...")
        model = load(precision)
        seconds = measure_pass_seconds(model)
        tokens = _greedy_tokens(model)
        if precision == reference:
            ref_tokens = tokens
        trials.append(
            PrecisionTrial(precision, seconds, agreement(tokens, ref_tokens), model.kernels)
        )
        del model
        gc.collect()
    return trials


def pick_precision(trials: Sequence[PrecisionTrial]) -> PrecisionTrial:
    """The qualifying trial (:data:`AGREEMENT`) with the cheapest plain step plus an
    8-position verification (:data:`TARGET_ROWS`); ties go to the finer precision."""
    ok = [t for t in trials if t.agreement >= AGREEMENT] or list(trials[:1])

    def cost(t: PrecisionTrial) -> float:
        return sum(t.pass_seconds[PASS_ROWS.index(r)] for r in TARGET_ROWS)

    return min(ok, key=lambda t: (cost(t), trials.index(t)))


def cached_trials(
    spec: str,
    hf_identity: str,
    load: Callable[[str], Any],
    *,
    cache_dir: Path | None,
    precisions: Sequence[str] = TARGET_PRECISIONS,
    log: Callable[[str], None] | None = None,
) -> list[PrecisionTrial]:
    """:func:`precision_trials`, once per machine and model (kept in ``cache_dir``)."""
    what = ["precision-trials", spec, hf_identity, ",".join(precisions), str(AGREEMENT)]

    def decode(result: Any) -> list[PrecisionTrial]:
        return [
            PrecisionTrial(
                precision=str(t["precision"]),
                pass_seconds=tuple(float(s) for s in t["pass_seconds"]),
                agreement=float(t["agreement"]),
                kernels=str(t["kernels"]),
            )
            for t in result
        ]

    def compute() -> list[dict[str, Any]]:
        return [asdict(t) for t in precision_trials(load, precisions, log=log)]

    return decode(_cached(cache_dir, what, compute, lambda r: r))


def runnable_precisions(device: str, *, target: bool) -> list[str]:
    """The precisions this machine can run a model at (a draft may also be int4)."""
    from verispec.models import kernels

    if device != "cpu":
        return ["bf16", "fp16", "fp32"]
    out = ["fp32", "bf16", "fp16"]
    if kernels.int8_weight_only_available():
        out.append("int8w")
    if "fbgemm" in torch.backends.quantized.supported_engines:
        out.append("int8")
    if not target and kernels.int4_available():
        out.append("int4")
    return out
