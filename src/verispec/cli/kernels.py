"""``verispec kernels``: what this machine measured, and what verispec picks from it.

Three tables (each measured once per machine and model, cached with the rest):

1. every linear-layer shape of the target, every candidate kernel: ms per call for
   1..32 rows, and from how many rows it scores rows exactly (kernels.md);
2. the draft's decoding step at each precision (its linear layers, one row);
3. whole target passes at each precision, with the greedy agreement that
   ``--precision auto`` requires (``--no-passes`` skips them: they load the target
   once per precision).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

TARGET_CANDIDATES = ("fp32", "bf16", "int8w", "int8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from verispec.models import presets

    parser.add_argument("--target", default=presets.DEFAULT_TARGET, help="target model")
    parser.add_argument("--draft", default=presets.DEFAULT_DRAFT, help="draft model ('none': skip)")
    parser.add_argument(
        "--no-passes",
        action="store_true",
        help="skip the whole-pass table (it loads the target once per precision)",
    )
    parser.add_argument("--json", default=None, help="also write the tables to this JSON file")
    parser.add_argument("--cache-dir", default=None, help="where models and measurements live")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.2f}"


def _linear_section(table: list[Any], precisions: tuple[str, ...], *, target: bool) -> list[str]:
    from verispec.models import tuning

    lines = [
        "| shape (out x in) | layers | kernel | "
        + " | ".join(f"{r} rows" for r in tuning.ROWS)
        + " | exact from | chosen |",
        "|---|---|---|" + "---|" * len(tuning.ROWS) + "---|---|",
    ]
    chosen: dict[tuple[tuple[int, int], str], Any] = {}
    for precision in precisions:
        picks = tuning.choose_kernels(
            table,
            precision,
            exact=target,
            use_rows=tuning.TARGET_ROWS if target else tuning.DRAFT_ROWS,
        )
        for shape, choice in picks.items():
            chosen[(shape, f"{precision}/{choice.kernel}")] = choice
    for t in table:
        pick = chosen.get((t.shape, t.kernel))
        mark = f"yes (pad to {pick.min_rows})" if pick is not None else ""
        exact = "never" if t.exact_from is None else str(t.exact_from)
        cells = " | ".join(_ms(s).strip() for s in t.seconds)
        size = f"{t.shape[0]} x {t.shape[1]}"
        lines.append(f"| {size} | {t.layers} | {t.kernel} | {cells} | {exact} | {mark} |")
    return lines


def run(args: argparse.Namespace) -> int:
    from verispec.models import load_model, presets, tuning

    cache = Path(args.cache_dir) if args.cache_dir else presets.default_cache_dir()
    report: dict[str, Any] = {"fingerprint": tuning.fingerprint()}
    out: list[str] = ["# Kernels measured on this machine", ""]
    out += [f"- {k}: {v}" for k, v in report["fingerprint"].items()]
    out += [
        "",
        "Times are ms per call (median), rotating over up to "
        f"{tuning.ROTATION} layers of a shape; 'exact from' is the row count from which "
        "a row's result is the same in a call of any size.",
        "",
    ]

    print(f"measuring {args.target}'s linear layers ...", file=sys.stderr)
    target = load_model(args.target, precision="fp32", kernels="default", cache_dir=cache)
    runnable = tuning.runnable_precisions("cpu", target=True)
    precisions = tuple(p for p in TARGET_CANDIDATES if p in runnable)
    table = tuning.linear_table(target.hf, precisions, target=True, cache_dir=cache)
    out += [f"## Target {args.target}: linear layers", ""]
    out += _linear_section(table, precisions, target=True)
    report["target_linears"] = [t.__dict__ for t in table]
    del target
    gc.collect()

    if args.draft != "none":
        print(f"measuring {args.draft}'s decoding step ...", file=sys.stderr)
        draft = load_model(
            args.draft, precision="fp32", kernels="default", batch_invariant=False, cache_dir=cache
        )
        linear = tuning.draft_linear_steps(draft.hf, cache_dir=cache)
        del draft
        gc.collect()
        source = presets.resolve_model_dir(args.draft, cache_dir=cache)
        config = Path(source) / "config.json"
        identity = json.dumps(json.loads(config.read_text()), sort_keys=True)

        def load_draft(precision: str) -> Any:
            return load_model(
                source,
                precision=precision,
                batch_invariant=False,
                compile_steps="auto",
                cache_dir=cache,
                progress=False,
            )

        runnable_draft = tuning.runnable_precisions("cpu", target=False)
        steps = tuning.draft_steps(
            args.draft,
            identity,
            load_draft,
            cache_dir=cache,
            precisions=[p for p in tuning.DRAFT_PRECISIONS if p in runnable_draft],
            log=lambda line: print(line, file=sys.stderr),
        )
        best = tuning.pick_draft_precision(steps)
        out += ["", f"## Draft {args.draft}: one decoding step", ""]
        out += [
            "| precision | whole step ms | its linear layers ms | outside them | chosen |",
            "|---|---|---|---|---|",
        ]
        shares = {}
        for p, step in steps.items():
            lin = linear.get(p)
            shares[p] = max(0.0, 1.0 - lin / step) if lin is not None else None
            share = f"{shares[p]:.0%}" if shares[p] is not None else "-"
            lin_ms = _ms(lin).strip() if lin is not None else "-"
            mark = "yes" if p == best else ""
            out.append(f"| {p} | {_ms(step).strip()} | {lin_ms} | {share} | {mark} |")
        out += [
            "",
            "Whole steps as a bench or server loads the draft (int4 compiled where a C++ "
            "compiler is present); 'outside them': attention, norms, the cache and Python. "
            f"Chosen: the first of {', '.join(tuning.DRAFT_PRECISIONS)} within "
            f"{1 / tuning.STEP_TIE - 1:.0%} of the fastest step.",
        ]
        report["draft_steps"] = steps
        report["draft_linear_steps"] = linear
        report["draft_overhead_share"] = shares
        report["draft_precision"] = best

    if not args.no_passes:
        source = presets.resolve_model_dir(args.target, cache_dir=cache)
        config = Path(source) / "config.json"
        identity = json.dumps(json.loads(config.read_text()), sort_keys=True)

        def load(precision: str) -> Any:
            return load_model(source, precision=precision, cache_dir=cache, progress=False)

        trials = tuning.cached_trials(
            args.target,
            identity,
            load,
            cache_dir=cache,
            precisions=precisions,
            log=lambda line: print(line, file=sys.stderr),
        )
        best_trial = tuning.pick_precision(trials)
        out += ["", f"## Target {args.target}: whole passes", ""]
        out += [
            "| precision | "
            + " | ".join(f"{r} new" for r in tuning.PASS_ROWS)
            + " | greedy agreement with fp32 | --precision auto |",
            "|---|" + "---|" * len(tuning.PASS_ROWS) + "---|---|",
        ]
        for t in trials:
            cells = " | ".join(_ms(s).strip() for s in t.pass_seconds)
            pick = "picked" if t is best_trial else ""
            out.append(f"| {t.precision} | {cells} | {t.agreement:.0%} | {pick} |")
        out += [
            "",
            f"Agreement: mean share of the fp32 greedy answer (first {tuning.CALIBRATION_TOKENS} "
            f"tokens of {len(tuning.CALIBRATION_PROMPTS)} calibration prompts) before the first "
            f"difference; auto needs {tuning.AGREEMENT:.0%}.",
        ]
        report["passes"] = [t.__dict__ for t in trials]
        report["auto_precision"] = best_trial.precision
    print("\n".join(out))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=list))
    return 0
