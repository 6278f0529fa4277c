"""``verispec bench``: arguments, model loading, calibration, run, report.

Examples::

    verispec bench --quick --out /tmp/bench            # SmolLM2-135M, seconds
    verispec bench --sets humaneval --num-prompts 10 --configs plain,draft-k4,lookup,hf-plain
    verispec bench --temperature 0.7 --top-p 0.95 --seed 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from verispec.errors import InvalidArgumentError, ModelNotFoundError

QUICK_MODEL = "smollm2-135m"
QUICK: dict[str, Any] = {
    "target": QUICK_MODEL,
    "draft": QUICK_MODEL,
    "num_prompts": 2,
    "max_new_tokens": 24,
    "configs": "plain,draft-k4,lookup,hf-plain,llamacpp-plain,llamacpp-spec,ov-plain,ov-spec",
}
DEFAULTS: dict[str, Any] = {
    "target": None,  # presets.DEFAULT_TARGET
    "draft": None,  # presets.DEFAULT_DRAFT
    "num_prompts": 10,
    "max_new_tokens": 128,
    "configs": None,  # all
}


def _ints(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from verispec.models import presets

    parser.add_argument("--target", default=None, help=f"target model ({presets.DEFAULT_TARGET})")
    parser.add_argument("--draft", default=None, help=f"draft model ({presets.DEFAULT_DRAFT})")
    parser.add_argument(
        "--sets",
        default="mtbench,humaneval,gsm8k",
        help="prompt sets, each with an optional count that overrides --num-prompts "
        "(e.g. humaneval:6,mtbench:8,gsm8k)",
    )
    parser.add_argument("--num-prompts", type=int, default=None, help="prompts per set (10)")
    parser.add_argument(
        "--configs",
        default=None,
        help="comma-separated subset of plain, draft-k<K>, draft-auto, draft-auto-chain, "
        "hybrid-auto, lookup, hf-plain, hf-assisted, hf-lookup, hf-default, llamacpp-plain, "
        "llamacpp-spec, ov-plain, ov-spec (default: all but draft-auto-chain; plain always "
        "runs; llama.cpp and OpenVINO are skipped with a note until `make peers`)",
    )
    parser.add_argument("--k", type=_ints, default=[4, 8], help="draft lengths for draft-k<K>")
    parser.add_argument("--lookup-k", type=int, default=8, help="draft length of prompt lookup")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="per turn (128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0, help="prompt subset and sampling seed")
    parser.add_argument("--out", default="bench-out", help="output folder (bench-out/)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_MODEL} as target and draft, 2 prompts per set, 24 tokens, 4 configs "
        "(and the llama.cpp and OpenVINO peers where built)",
    )
    parser.add_argument(
        "--prefix-cache",
        choices=["on", "off"],
        default="on",
        help="each verispec configuration reuses its own previous turn's caches for the "
        "next turn of a conversation (on; transformers peers never do)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--cache-dir", default=None, help="where converted models live")
    parser.add_argument("--device", default=None, help="cpu or cuda")


def _tiny_model(seed: int) -> Any:
    """A tiny random Llama with a byte tokenizer and a chat template (--quick fallback)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from verispec.models import HFModel

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"<eos>": len(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.3,
        tie_word_embeddings=False,
        eos_token_id=len(alphabet),
    )
    hf = LlamaForCausalLM(config).float()
    eos = frozenset({len(alphabet)})
    return HFModel(hf=hf, tokenizer=tokenizer, name=f"tiny-random-{seed}", eos_token_ids=eos)


def _load(spec: str, args: argparse.Namespace, *, role: str) -> Any:
    """Load a model with the shared model options (``--precision``, ``--draft-precision``,
    ``--kernels``) as ``verispec generate`` does: the draft defaults to int4 on a CPU."""
    from verispec.cli.options import load_role

    try:
        return load_role(args, spec, role="draft" if role == "draft" else "target", progress=True)
    except ModelNotFoundError as exc:
        if not args.quick:
            raise
        print(
            f"note: {spec} is not installed ({exc}); --quick falls back to a tiny random "
            "model (speed figures only)",
            file=sys.stderr,
        )
        return _tiny_model(0 if role == "target" else 1)


def calibrate(target: Any, draft: Any, max_k: int) -> dict[str, Any] | None:
    """c_verify(0..max_k) and c_draft on this machine (``policy.costs.measure_costs``)."""
    from verispec.models.presets import default_cache_dir
    from verispec.policy.costs import costs_for, measure_costs

    if max_k < 1:
        return None
    # The cached cost model is the one the adaptive policy ("auto") uses too.
    costs = costs_for(target, draft, cache_dir=default_cache_dir())
    if costs.max_k < max_k:
        costs = measure_costs(target, draft, max_k=max_k)
    return {
        "c_verify": list(costs.c_verify),
        "c_draft": costs.c_draft,
        "target_step_seconds": costs.target_step_seconds,
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from verispec.bench.datasets import load_prompts, parse_set_sizes
    from verispec.bench.plots import write_plots
    from verispec.bench.report import (
        bytes_per_pass,
        machine_info,
        read_bandwidth,
        summarize,
        write_results,
    )
    from verispec.bench.runner import parse_configs, run_bench
    from verispec.models import presets
    from verispec.sampling import SamplingParams

    started = time.perf_counter()
    base = QUICK if args.quick else DEFAULTS
    pick = {
        key: getattr(args, key) if getattr(args, key) is not None else base[key] for key in base
    }
    target_spec = pick["target"] or presets.DEFAULT_TARGET
    draft_spec = pick["draft"] or presets.DEFAULT_DRAFT
    # Check every argument before loading anything.
    if pick["max_new_tokens"] < 1:
        raise InvalidArgumentError(f"--max-new-tokens must be >= 1, got {pick['max_new_tokens']}")
    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    configs = parse_configs(pick["configs"], ks=args.k, lookup_k=args.lookup_k)
    sizes = parse_set_sizes(args.sets)
    sets = list(sizes)
    prompts = load_prompts(sets, num_prompts=pick["num_prompts"], seed=args.seed, sizes=sizes)

    target = _load(target_spec, args, role="target")
    if target.name.startswith("tiny-random-") and any(c.external for c in configs):
        print("note: the peers are skipped with --quick's tiny random model", file=sys.stderr)
        configs = [c for c in configs if not c.external]
    needs_draft = any(c.drafter in ("model", "hybrid") and not c.external for c in configs)
    draft = _load(draft_spec, args, role="draft") if needs_draft else None
    speculative = [c for c in configs if c.engine == "verispec" and c.speculative]
    fixed_ks = [int(c.k) for c in speculative if isinstance(c.k, int)]
    # The adaptive configurations ("auto") need the costs too: at least the cached ones.
    max_k = max(fixed_ks, default=1 if speculative else 0)
    print(f"calibrating costs (k up to at least {max_k}) ...", file=sys.stderr)
    costs = calibrate(target, draft, max_k)
    print("measuring read bandwidth ...", file=sys.stderr)
    bandwidth, pass_bytes = read_bandwidth(), bytes_per_pass(target)
    limit = {
        "read_bandwidth_gbps": bandwidth,
        "threads": torch.get_num_threads(),
        "bytes_per_pass": pass_bytes,
        "passes_per_second": bandwidth * 1e9 / pass_bytes if pass_bytes else 0.0,
    }

    default_target = None
    if any(c.name == "hf-default" for c in configs):
        default_args = argparse.Namespace(**{**vars(args), "kernels": "default"})
        default_target = _load(target_spec, default_args, role="target")
    bench = run_bench(
        target,
        draft,
        prompts,
        configs,
        default_target=default_target,
        max_new_tokens=pick["max_new_tokens"],
        params=params,
        progress=not args.no_progress,
        log=lambda line: print(line, file=sys.stderr),
        prefix_cache=args.prefix_cache == "on",
        target_spec=target_spec,
        draft_spec=draft_spec,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
    )
    summary = summarize(bench, costs)
    setup = {
        "target": target.name,
        "draft": draft.name if draft is not None else None,
        "target_kernels": getattr(target, "kernels", None),
        "draft_kernels": getattr(draft, "kernels", None),
        "default_target_kernels": getattr(default_target, "kernels", None),
        "limit": limit,
        "sets": sets,
        "num_prompts_per_set": {
            name: sum(1 for p in prompts if p.set_name == name) for name in sets
        },
        "num_units": len({(r.prompt_id, r.turn) for r in bench.records}),
        "max_new_tokens": pick["max_new_tokens"],
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "lookup_k": args.lookup_k,
        "prefix_cache": args.prefix_cache == "on",
        "quick": args.quick,
        "prompts": [p.__dict__ for p in prompts],
        "machine": machine_info(),
        "wall_time": time.perf_counter() - started,
    }
    out = Path(args.out)
    paths = write_results(out, bench, summary, setup, costs)
    try:
        write_plots(out, bench.configs, summary)
    except ImportError:
        print(
            "note: matplotlib is not installed; no plots (pip install 'verispec[bench]')",
            file=sys.stderr,
        )
    print(paths["md"].read_text(encoding="utf-8"))
    print(
        f"wrote {out}/ (results.json, results.md, plots); {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )
    bad = [m for m in summary["mismatches"] if m["engine"] == "verispec"]
    if bad:
        print(
            f"\n!!! GREEDY MISMATCH: {len(bad)} verispec runs differ from plain greedy decoding. "
            "verispec must be lossless: this is a bug. !!!",
            file=sys.stderr,
        )
        for m in bad:
            print(
                f"!!!   {m['config']} {m['prompt_id']} turn {m['turn']}: first differing "
                f"token at {m['first_mismatch']}",
                file=sys.stderr,
            )
        return 1
    engines = {c.name: c.engine for c in bench.configs}
    if params.greedy:
        ours = [r for r in bench.records if r.config != "plain" and engines[r.config] == "verispec"]
        print(
            f"greedy check: {len(ours)} verispec outputs equal plain greedy, token for token",
            file=sys.stderr,
        )
    peers = [m for m in summary["mismatches"] if m["engine"] != "verispec"]
    if peers:
        print(
            f"note: {len(peers)} peer runs differ from verispec plain greedy (another code "
            "path or precision, e.g. a whole-prompt first pass; see results.json)",
            file=sys.stderr,
        )
    own = [
        r for r in bench.records if r.matches_own_plain is False and engines[r.config] != "verispec"
    ]
    if own:
        print(
            f"note: {len(own)} peer speculative runs differ from their own engine's plain "
            "output (reported, not an error; see results.md)",
            file=sys.stderr,
        )
    return 0
