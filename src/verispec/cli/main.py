"""The ``verispec`` command line.

Every :class:`~verispec.errors.VerispecError` becomes one ``error: ...`` line
on stderr and exit code 2; no tracebacks for problems a user can fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from verispec.cli.options import (
    add_model_options,
    add_pair_options,
    draft_kernels,
    draft_length,
    float_arg,
    int_arg,
    load_pair,
)
from verispec.errors import InvalidArgumentError, VerispecError

DEFAULT_PROMPT = (
    "Write a Python function `is_palindrome(s: str) -> bool` that ignores case and "
    "non-alphanumeric characters. Include a docstring with two examples."
)
_GREEN, _YELLOW, _RESET = "\033[32m", "\033[33m", "\033[0m"


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        prog="verispec", description="Lossless speculative decoding for open language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for a prompt")
    gen.add_argument(
        "prompt", nargs="?", default=DEFAULT_PROMPT, help="the prompt (a default is provided)"
    )
    add_pair_options(
        gen,
        drafters=["model", "prompt-lookup", "hybrid", "none"],
        drafter_help="where draft tokens come from: a draft model, prompt lookup, hybrid (per "
        "pass, prompt lookup or the draft model, whichever its acceptance rates predict to be "
        "faster; the draft model then scores the lookup's continuation as a hint in one pass "
        "and keeps it as far as it agrees; the default) or none (plain decoding through the "
        "same loop)",
        default_drafter="hybrid",
    )
    gen.add_argument(
        "--num-draft-tokens",
        "-k",
        type=draft_length,
        default="auto",
        help="draft length k, or auto: per pass from measured costs and acceptance (a draft "
        "model's draft stops where its own confidence says one more token will not pay)",
    )
    gen.add_argument(
        "--siblings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with -k auto under greedy decoding, also verify a draft model's runner-up "
        "tokens where that pays (a token tree; on by default)",
    )
    gen.add_argument("--ngram", type=int_arg, default=3, help="longest n-gram for prompt lookup")
    gen.add_argument("--temperature", type=float_arg, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int_arg, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float_arg, default=1.0, help="1 = off")
    gen.add_argument("--seed", type=int_arg, default=None)
    gen.add_argument("--max-new-tokens", type=int_arg, default=256)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply the model's chat template (default: on when the model has one)",
    )
    gen.add_argument("--show-draft", action="store_true", help="colour accepted draft tokens")
    gen.add_argument(
        "--json", action="store_true", help="print one JSON object with all statistics"
    )
    gen.add_argument(
        "--cache-dir", default=None, help="where converted models live ($VERISPEC_CACHE)"
    )
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_model_options(gen)

    sub.add_parser("presets", help="list the bundled model presets")

    from verispec.cli.kernels import add_arguments as add_kernel_arguments

    kernels = sub.add_parser(
        "kernels", help="measure and print this machine's kernel and precision tables"
    )
    add_kernel_arguments(kernels)

    from verispec.bench.command import add_arguments as add_bench_arguments

    bench = sub.add_parser("bench", help="measure speedups on real prompt sets")
    add_bench_arguments(bench)
    add_model_options(bench)

    from verispec.server.command import add_arguments as add_serve_arguments

    serve = sub.add_parser("serve", help="OpenAI-compatible server with continuous batching")
    add_serve_arguments(serve)
    add_model_options(serve)
    return parser


def _summary(stats: Any, drafter_name: str) -> str:
    line = (
        f"{stats.new_tokens} tokens in {stats.time_total:.1f} s, "
        f"{stats.tokens_per_second:.2f} tokens/s | {drafter_name}"
    )
    if stats.drafted:
        line += (
            f" | acceptance {stats.acceptance_rate:.1%}"
            f" | {stats.mean_accepted_length:.2f} tokens/pass"
        )
    if stats.siblings:
        line += f" | siblings kept {stats.siblings_kept} of {stats.siblings}"
    line += (
        f" | {stats.target_passes} target passes | time: draft {stats.time_draft:.1f} s, "
        f"verify {stats.time_verify:.1f} s, prompt {stats.time_prefill:.1f} s, "
        f"other {stats.time_overhead:.2f} s"
    )
    return line


def _generate(args: argparse.Namespace) -> int:
    from verispec.generate import stream
    from verispec.models import kernel_description

    if not args.prompt.strip():
        raise InvalidArgumentError("the prompt is empty")
    # Check sampling and length arguments before spending time on model loading.
    from verispec.engine import check_generation_args
    from verispec.sampling import SamplingParams

    SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    check_generation_args(
        max_new_tokens=args.max_new_tokens, num_draft_tokens=args.num_draft_tokens
    )
    progress = not args.json
    target, menu = load_pair(args, progress=progress)
    drafter = menu[args.drafter]
    drafter_name = drafter.name if drafter is not None else "no drafter (plain decoding)"

    generation = stream(
        target,
        drafter,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        chat=args.chat,
        num_draft_tokens=args.num_draft_tokens,
        siblings=args.siblings,
    )
    color = args.show_draft and not args.json
    for event in generation:
        if args.json:
            continue
        if color:
            for text, drafted in event.pieces:
                sys.stdout.write(f"{_GREEN if drafted else _YELLOW}{text}{_RESET}")
        else:
            sys.stdout.write(event.text)
        sys.stdout.flush()
    result = generation.result()
    if args.json:
        payload = {
            "text": result.text,
            "finish_reason": result.finish_reason,
            "token_ids": result.token_ids,
            "target": args.target,
            "drafter": drafter_name,
            "num_draft_tokens": args.num_draft_tokens,
            "kernels": {"target": kernel_description(target), "draft": draft_kernels(drafter)},
            "stats": result.stats.to_dict(),
        }
        print(json.dumps(payload, indent=2))
    else:
        sys.stdout.write("\n")
        if color:
            print(
                f"[{_GREEN}drafted and accepted{_RESET} | {_YELLOW}written by the target{_RESET}]"
            )
        print(_summary(result.stats, drafter_name), file=sys.stderr)
    return 0


def _presets() -> int:
    from verispec.models import presets

    for name, preset in presets.PRESETS.items():
        print(f"{name:22} {preset.description}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "bench":
            from verispec.bench.command import run as run_bench

            return run_bench(args)
        if args.command == "kernels":
            from verispec.cli.kernels import run as run_kernels

            return run_kernels(args)
        if args.command == "serve":
            from verispec.server.command import run as run_serve

            return run_serve(args)
        return _presets()
    except VerispecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
