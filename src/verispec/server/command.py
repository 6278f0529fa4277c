"""``verispec serve``: load the models, build the scheduler and the app, run uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from verispec.errors import InvalidArgumentError

if TYPE_CHECKING:
    from verispec.drafting import Drafter
    from verispec.engine import DraftLength
    from verispec.models import LanguageModel
    from verispec.server.scheduler import Scheduler
from verispec.cli.options import add_pair_options, draft_length


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pair_options(
        parser,
        drafters=["model", "prompt-lookup", "hybrid", "none"],
        drafter_help="where draft tokens come from: the draft model (--draft), prompt lookup, "
        "hybrid (per pass, prompt lookup or the draft model, whichever its acceptance rates "
        "predict to be faster; loads --draft, as model does) or none (no speculation). With a "
        "draft model, a request may pick any of them (verispec.drafter); without, "
        "prompt-lookup or none",
    )
    parser.add_argument(
        "--num-draft-tokens",
        "-k",
        type=draft_length,
        default="auto",
        help="draft length: auto (default) chooses one per sequence and pass, as the library "
        "does, from this machine's measured pass costs and the running acceptance (none where "
        "it does not pay); N drafts N tokens always (0: no speculation)",
    )
    parser.add_argument("--ngram", type=int, default=3, help="longest n-gram for prompt lookup")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--max-batch", type=int, default=8, help="sequences per batched pass")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    parser.add_argument(
        "--prefix-cache",
        type=int,
        default=4,
        help="finished requests whose KV caches are kept for a request that continues one "
        "(a chat's next turn scores only its new messages); 0 = off (default 4)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=256, help="default max_tokens per request"
    )
    parser.add_argument(
        "--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask"
    )
    parser.add_argument(
        "--model-name", default=None, help="the model id clients see (default: target)"
    )
    parser.add_argument("--cache-dir", default=None, help="where converted models live")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )


def build_scheduler(
    target: LanguageModel,
    drafters: Mapping[str, Drafter[Any] | None],
    *,
    default: str,
    max_batch: int,
    max_queue: int,
    num_draft_tokens: DraftLength,
    prefix_cache: int = 0,
    cache_dir: Path | None = None,
) -> Scheduler:
    """A :class:`Scheduler` over the drafters; ``"auto"`` draft lengths use the same
    per-machine cost model as the library (:func:`verispec.policy.costs.costs_for`)."""
    from verispec.models.presets import default_cache_dir
    from verispec.policy.costs import costs_for
    from verispec.server.metrics import Metrics
    from verispec.server.scheduler import Scheduler

    # One cost model for every drafter a request may pick (they share the draft model).
    drafting = [d for d in drafters.values() if d is not None]
    draft_model = next((d.draft_model for d in drafting if d.draft_model is not None), None)
    costs = None
    if num_draft_tokens == "auto" and drafting:
        costs = costs_for(target, draft_model, cache_dir=cache_dir or default_cache_dir())
    return Scheduler(
        target,
        drafters,
        default=default,
        max_batch=max_batch,
        max_queue=max_queue,
        num_draft_tokens=num_draft_tokens,
        costs=costs,
        metrics=Metrics(),
        prefix_cache=prefix_cache,
    )


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from verispec.server.app import create_app
    except ImportError as exc:
        raise InvalidArgumentError(
            f"verispec serve needs the server extra ({exc.name} is missing): "
            "pip install 'verispec[server]'"
        ) from exc
    from verispec.cli.options import load_pair

    for name in ("max_batch", "max_tokens", "max_tokens_limit"):
        if getattr(args, name) < 1:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_queue < 0:
        raise InvalidArgumentError("--max-queue must be >= 0")
    if args.prefix_cache < 0:
        raise InvalidArgumentError("--prefix-cache must be >= 0")
    k = args.num_draft_tokens
    if k != "auto" and not 0 <= k <= 64:
        raise InvalidArgumentError(f"--num-draft-tokens must be auto or 0..64, got {k}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    target, drafters = load_pair(args, progress=True)
    default = args.drafter
    if k == 0:  # no speculation on this server: no request may ask for any
        drafters, default = {"none": None}, "none"
    if k == "auto" and drafters[default] is not None:
        print(
            "pass costs for the draft-length policy (measured once per machine) ...",
            file=sys.stderr,
        )
    scheduler = build_scheduler(
        target,
        drafters,
        default=default,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        num_draft_tokens="auto" if k == 0 else k,
        prefix_cache=args.prefix_cache,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
    )
    app = create_app(
        scheduler,
        model_name=args.model_name or args.target,
        api_key=args.api_key,
        max_tokens=args.max_tokens,
        max_tokens_limit=args.max_tokens_limit,
    )
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30
    )
    return 0
