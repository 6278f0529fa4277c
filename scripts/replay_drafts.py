"""Replay a greedy bench run's outputs to see what the draft model allows.

Under greedy decoding the target accepts a draft token exactly when it equals the
target's own next token, so which draft tokens would be accepted can be read off
one teacher-forced pass of each model over the plain outputs of a bench run (the
draft run token by token, as when it drafts). This script does that for every
prompt turn of a ``verispec bench`` results.json and replays three draft-length
policies over the recorded agreement, charging each target pass
``c_verify(k) + k * c_draft`` target steps:

- foresight: drafts exactly the tokens the target will accept (at most the longest
  measured length) and never one more: no real policy can beat it with this draft;
- running acceptance: ``AdaptiveDraftLength.choose()`` alone;
- confidence: ``-k auto`` as the engine runs it (drafts stop by
  ``AdaptiveDraftLength.keep_drafting`` on the draft's probabilities).

It prints tokens per target step after the prompt pass (the decode speedup over
plain decoding) per prompt set, and the whole-generation speedup that would give
with the run's own prompt-pass share of plain decoding time. One approximation:
after a draft token the target rejects, the draft's later probabilities in the
replay are those given the target's token, not the draft's own (they only decide
where such a draft stops; none of those tokens is accepted either way).

    python scripts/replay_drafts.py docs/bench/results.json [--c-draft 0.11]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from verispec.bench.datasets import BenchPrompt
from verispec.bench.runner import _messages
from verispec.generate import encode_prompt
from verispec.models import load_model
from verispec.policy.costs import AdaptiveDraftLength, CostModel


@dataclass
class Turn:
    set_name: str
    tokens: list[int]  # the plain greedy output
    agrees: list[bool]  # the draft's next token equals the target's, per position
    confidence: list[float]  # the draft's probability of its next token, per position
    time_prefill: float  # plain's prompt pass, seconds
    time_total: float  # plain's whole generation, seconds


def collect(results: dict[str, Any], draft_precision: str) -> list[Turn]:
    setup = results["setup"]
    prompts = {p["prompt_id"]: BenchPrompt(**p) for p in setup["prompts"]}
    target = load_model(setup["target"], progress=False)
    draft = load_model(
        setup["draft"], precision=draft_precision, batch_invariant=False, progress=False
    )
    answers: dict[str, list[str]] = {}
    turns = []
    for record in results["records"]:
        if record["config"] != "plain":
            continue
        earlier = answers.setdefault(record["prompt_id"], [])
        messages = _messages(prompts[record["prompt_id"]], earlier, record["turn"])
        prompt_ids = encode_prompt(target.tokenizer, messages)
        tokens = list(record["token_ids"])
        earlier.append(target.tokenizer.decode(tokens, skip_special_tokens=True))
        with torch.no_grad():
            # Row j scores the position of tokens[j] (the first row: the prompt's last).
            target_rows = target.forward(
                target.new_cache(), prompt_ids + tokens[:-1], num_logits=len(tokens)
            )
            cache = draft.new_cache()
            draft_rows = [draft.forward(cache, prompt_ids, num_logits=1)[-1]]
            for token in tokens[:-1]:
                draft_rows.append(draft.forward(cache, [token], num_logits=1)[-1])
        width = target.vocab_size
        probs = torch.softmax(torch.stack(draft_rows).float()[:, :width], dim=-1)
        confidence, draft_next = probs.max(dim=-1)
        target_next = target_rows.argmax(dim=-1)
        if target_next.tolist() != tokens:
            raise SystemExit(f"{record['prompt_id']}: the target no longer reproduces the run")
        turns.append(
            Turn(
                set_name=record["set_name"],
                tokens=tokens,
                agrees=(draft_next == target_next).tolist(),
                confidence=confidence.tolist(),
                time_prefill=record["time_prefill"],
                time_total=record["time_total"],
            )
        )
        print(f"  {record['prompt_id']} turn {record['turn']}: {len(tokens)} tokens", flush=True)
    return turns


Policy = Callable[[Turn, int, AdaptiveDraftLength], int]  # -> draft length at position i


def foresight(turn: Turn, i: int, policy: AdaptiveDraftLength) -> int:
    n = 0
    while i + n < len(turn.tokens) and n < policy.cap and turn.agrees[i + n]:
        n += 1
    return n


def running_acceptance(turn: Turn, i: int, policy: AdaptiveDraftLength) -> int:
    return policy.choose()


def confidence(turn: Turn, i: int, policy: AdaptiveDraftLength) -> int:
    cap = policy.choose()  # the policy follows confidence (see replay)
    drafted: list[float] = []
    while len(drafted) < cap and i + len(drafted) < len(turn.tokens):
        drafted.append(turn.confidence[i + len(drafted)])
        if not policy.keep_drafting(drafted):
            break
    return len(drafted)


def replay(
    turn: Turn, costs: CostModel, choose: Policy, charged: CostModel | None = None
) -> tuple[int, float]:
    """(tokens after the first, target steps they cost) under one policy that decides
    with ``costs``; each pass is charged at ``charged`` (default: ``costs``)."""
    policy = AdaptiveDraftLength(costs, follow_confidence=choose is confidence)
    charged = charged or costs
    i, steps = 1, 0.0  # the prompt pass gave tokens[0]
    while i < len(turn.tokens):
        k = min(choose(turn, i, policy), len(turn.tokens) - i)
        accepted = 0
        while accepted < k and turn.agrees[i + accepted]:
            accepted += 1
        policy.observe(k, accepted)
        steps += charged.c_verify[k] + k * charged.c_draft
        i += accepted + 1
    return len(turn.tokens) - 1, steps


def costs_in_run(results: dict[str, Any], max_k: int) -> CostModel:
    """The costs the run's speculative passes really had, in plain decoding steps.

    Least squares over the turns of the draft-model configurations: a turn's
    verification time over plain's time per token (same turn) is the sum over its
    passes of ``c(k) = b0 + b1 * k + b2 * max(0, k - 5)`` (the calibration's curve
    bends near k = 5); ``c_draft`` is the median over turns of draft time per
    drafted token in plain steps. ``c_verify[0]`` stays 1 (a plain step).
    """
    import numpy as np

    plain = {
        (r["prompt_id"], r["turn"]): (r["time_total"] - r["time_prefill"]) / (r["new_tokens"] - 1)
        for r in results["records"]
        if r["config"] == "plain" and r["new_tokens"] > 1
    }
    rows, times, drafts = [], [], []
    for r in results["records"]:
        step = plain.get((r["prompt_id"], r["turn"]))
        if not r["config"].startswith(("draft", "hybrid")) or step is None or not r["drafted"]:
            continue
        passes = r["passes_by_draft_length"]
        rows.append(
            [
                sum(passes),
                sum(k * n for k, n in enumerate(passes)),
                sum(max(0, k - 5) * n for k, n in enumerate(passes)),
            ]
        )
        times.append(r["time_verify"] / step)
        drafts.append(r["time_draft"] / step / r["drafted"])
    b0, b1, b2 = np.linalg.lstsq(np.array(rows, float), np.array(times), rcond=None)[0]
    c_verify = [1.0] + [b0 + b1 * k + b2 * max(0, k - 5) for k in range(1, max_k + 1)]
    return CostModel(c_verify=tuple(float(c) for c in c_verify), c_draft=float(np.median(drafts)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a greedy bench run's results.json")
    parser.add_argument("--c-draft", type=float, help="draft step / target step (default: run's)")
    parser.add_argument("--draft-precision", default="int4")
    parser.add_argument(
        "--costs-in-run",
        action="store_true",
        help="charge passes at the costs fitted from the run's own times (see costs_in_run) "
        "and replay each policy deciding with the calibrated costs and with those",
    )
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    if results["setup"]["temperature"] != 0:
        raise SystemExit("replay needs a greedy run (temperature 0)")
    run_costs = results["costs"]
    costs = CostModel(
        c_verify=tuple(run_costs["c_verify"]),
        c_draft=args.c_draft if args.c_draft is not None else run_costs["c_draft"],
    )
    turns = collect(results, args.draft_precision)
    policies: dict[str, Policy] = {
        "foresight": foresight,
        "running acceptance": running_acceptance,
        "confidence (-k auto)": confidence,
    }
    runs: list[tuple[str, CostModel, Policy, CostModel]] = [
        (name, costs, choose, costs) for name, choose in policies.items()
    ]
    if args.costs_in_run:
        real = costs_in_run(results, costs.max_k)
        print(
            f"costs in the run: c_draft {real.c_draft:.3f}, c_verify "
            + " ".join(f"{k}: {c:.2f}" for k, c in enumerate(real.c_verify) if k)
        )
        runs = []
        for name, choose in policies.items():
            runs.append((f"{name} deciding by calibration", costs, choose, real))
            if choose is not foresight:
                runs.append((f"{name} deciding by run costs", real, choose, real))
    print(f"c_draft {costs.c_draft:.3f}; decode speedup / whole-generation speedup")
    for set_name in sorted({t.set_name for t in turns}):
        chosen = [t for t in turns if t.set_name == set_name]
        agree = sum(sum(t.agrees[1:]) for t in chosen) / sum(len(t.tokens) - 1 for t in chosen)
        share = sum(t.time_prefill for t in chosen) / sum(t.time_total for t in chosen)
        cells = []
        for name, decide, choose, charged in runs:
            tokens, steps = map(
                sum, zip(*(replay(t, decide, choose, charged) for t in chosen), strict=True)
            )
            decode = tokens / steps
            cells.append(f"{name} {decode:.2f}x / {1 / (share + (1 - share) / decode):.2f}x")
        print(f"{set_name}: draft agrees {agree:.3f}, prompt pass {share:.1%}; " + "; ".join(cells))


if __name__ == "__main__":
    main()
