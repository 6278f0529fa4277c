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

from verispec.errors import InvalidArgumentError, VerispecError

DEFAULT_PROMPT = (
    "Write a Python function `is_palindrome(s: str) -> bool` that ignores case and "
    "non-alphanumeric characters. Include a docstring with two examples."
)
_GREEN, _YELLOW, _RESET = "\033[32m", "\033[33m", "\033[0m"


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def draft_length(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_pair_options(
    parser: argparse.ArgumentParser,
    *,
    drafters: list[str],
    drafter_help: str,
    default_drafter: str = "model",
) -> None:
    """--target, --draft and --drafter, shared by the commands that generate."""
    from verispec import presets

    parser.add_argument(
        "--target", default=presets.DEFAULT_TARGET, help="preset, local folder, GGUF file or hub id"
    )
    parser.add_argument(
        "--draft", default=presets.DEFAULT_DRAFT, help="draft model for --drafter model or hybrid"
    )
    parser.add_argument("--drafter", choices=drafters, default=default_drafter, help=drafter_help)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads models."""
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16", "int8"],
        default=None,
        help="target precision (default: fp32 on CPU, bf16 on CUDA); int8 changes the output "
        "(to plain int8 decoding's, which speculation then reproduces)",
    )
    parser.add_argument(
        "--draft-precision",
        choices=["fp32", "bf16", "fp16", "int8", "int4"],
        default=None,
        help="draft precision (default: int4 on CPU, bf16 on CUDA); never changes the output, "
        "only the acceptance rate",
    )
    parser.add_argument(
        "--draft-vocab",
        type=_int,
        default=None,
        metavar="N",
        help="score only the draft's first N token ids, the special ones and those of the "
        "context being drafted for: a cheaper draft head (off by default; not faster on the "
        "bundled pair here)",
    )
    parser.add_argument(
        "--draft-compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="run the draft's decoding steps through torch.compile (auto: an int4 draft on a CPU "
        "with a C++ compiler, where it saves a sixth of each step; compiling takes seconds once "
        "cached, about a minute the first time); never changes the output",
    )
    parser.add_argument(
        "--kernels",
        choices=["auto", "default", "onednn"],
        default="auto",
        help="CPU matmul kernels (auto: oneDNN prepacked fp32 where available)",
    )
    parser.add_argument(
        "--runner",
        choices=["auto", "lean", "hf"],
        default="auto",
        help="forward pass: lean (verispec's loop over the model's modules, Llama/Qwen2), "
        "hf (transformers') or auto (lean where supported)",
    )


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
    gen.add_argument("--ngram", type=_int, default=3, help="longest n-gram for prompt lookup")
    gen.add_argument("--temperature", type=_float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=_int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=_float, default=1.0, help="1 = off")
    gen.add_argument("--seed", type=_int, default=None)
    gen.add_argument("--max-new-tokens", type=_int, default=256)
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


def compile_choice(args: argparse.Namespace) -> bool | str:
    """``--draft-compile`` as ``load_model(compile_steps=...)`` takes it."""
    return {"on": True, "off": False}.get(getattr(args, "draft_compile", "auto"), "auto")


def load_pair(args: argparse.Namespace, *, progress: bool) -> tuple[Any, Any]:
    """Load the target and build the drafter the options ask for."""
    from verispec.drafters import DraftModelDrafter, HybridDrafter, PromptLookupDrafter
    from verispec.models import default_device, default_draft_precision, load_model

    device = args.device or default_device()
    common = {
        "cache_dir": args.cache_dir,
        "device": device,
        "kernels": args.kernels,
        "runner": args.runner,
    }
    target = load_model(args.target, precision=args.precision, progress=progress, **common)
    drafter: Any = None
    if args.drafter in ("model", "hybrid"):
        draft_precision = args.draft_precision or default_draft_precision(device)
        draft = load_model(
            args.draft,
            precision=draft_precision,
            vocab_limit=args.draft_vocab,
            batch_invariant=False,  # a draft's scores never change the output
            compile_steps=compile_choice(args),
            progress=progress,
            **common,
        )
        drafter = DraftModelDrafter(draft, target=target)
        if args.drafter == "hybrid":
            drafter = HybridDrafter(drafter, max_ngram=args.ngram)
    elif args.drafter == "prompt-lookup":
        drafter = PromptLookupDrafter(max_ngram=args.ngram)
    return target, drafter


def _generate(args: argparse.Namespace) -> int:
    from verispec.generate import stream

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
    target, drafter = load_pair(args, progress=progress)
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
            "kernels": {"target": target.kernels, "draft": getattr(drafter, "kernels", None)},
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
    from verispec import presets

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
