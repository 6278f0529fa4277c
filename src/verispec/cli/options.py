"""Command-line options shared by ``verispec generate``, ``bench`` and ``serve``, and
loading the models they name."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from verispec.drafting import Drafter
    from verispec.models import HFModel, LanguageModel


def int_arg(text: str) -> int:
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


def float_arg(text: str) -> float:
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
    from verispec.models import presets

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
        choices=["fp32", "bf16", "fp16", "int8", "int8w", "auto"],
        default=None,
        help="target precision (default: fp32 on CPU, the bundled weights exactly; bf16 on "
        "CUDA). bf16, int8 (int8 weights and activations) and int8w (int8 weights, bf16 "
        "activations) change the output, to that precision's own plain decoding, which "
        "speculation then reproduces; auto: the fastest here whose greedy answers agree with "
        "fp32's (measured once, see `verispec kernels`)",
    )
    parser.add_argument(
        "--draft-precision",
        choices=["fp32", "bf16", "fp16", "int8", "int8w", "int4", "auto"],
        default=None,
        help="draft precision (default: auto on CPU, the cheapest step measured on this "
        "machine; bf16 on CUDA); never changes the output, only the acceptance rate",
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
        help="CPU matmul kernels for fp32/bf16 (auto: per layer shape, the fastest measured on "
        "this machine that scores a target's rows exactly; see `verispec kernels`)",
    )
    parser.add_argument(
        "--runner",
        choices=["auto", "lean", "hf"],
        default="auto",
        help="forward pass: lean (verispec's loop over the model's modules, Llama/Qwen2), "
        "hf (transformers') or auto (lean where supported)",
    )


def compile_choice(args: argparse.Namespace) -> bool | str:
    """``--draft-compile`` as ``load_model(compile_steps=...)`` takes it."""
    return {"on": True, "off": False}.get(getattr(args, "draft_compile", "auto"), "auto")


def load_role(
    args: argparse.Namespace, spec: str, *, role: Literal["target", "draft"], progress: bool
) -> HFModel:
    """Load ``spec`` as the target or the draft with the shared model options
    (``--precision`` / ``--draft-precision``, ``--kernels``, ``--runner``, ``--device``,
    ``--draft-compile``): a draft's precision defaults to the one measured cheapest on a
    CPU, and its scores may vary with
    its batch (they never change the output)."""
    from verispec.models import default_device, default_draft_precision, load_model

    device = args.device or default_device()
    precision = args.precision
    if role == "draft":
        precision = args.draft_precision or default_draft_precision(device)
    return load_model(
        spec,
        cache_dir=args.cache_dir,
        device=device,
        precision=precision,
        kernels=args.kernels,
        runner=args.runner,
        batch_invariant=role != "draft",
        compile_steps=compile_choice(args) if role == "draft" else False,
        progress=progress,
    )


def load_pair(
    args: argparse.Namespace, *, progress: bool
) -> tuple[LanguageModel, dict[str, Drafter[Any] | None]]:
    """Load the target (and the draft model where ``--drafter`` needs one); the drafters
    by name (:func:`verispec.drafting.drafter_menu`)."""
    from verispec.drafting import drafter_menu

    target = load_role(args, args.target, role="target", progress=progress)
    draft = None
    if args.drafter in ("model", "hybrid"):
        draft = load_role(args, args.draft, role="draft", progress=progress)
    return target, drafter_menu(target, draft, ngram=args.ngram)


def draft_kernels(drafter: Drafter[Any] | None) -> str | None:
    """What runs the draft model behind ``drafter`` (None without one)."""
    from verispec.models import kernel_description

    model = drafter.draft_model if drafter is not None else None
    return kernel_description(model) if model is not None else None
