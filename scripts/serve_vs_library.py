"""A served request against the same request through the library: statistics and speed.

Loads the pair once, then for each prompt (first turns of HumanEval and MT-bench) runs
``verispec.generate`` and the same prompt through a real ``verispec serve`` app on
127.0.0.1 (the official ``openai`` client, concurrency 1, the same model objects, the
same drafter and cost model), alternating, and prints per prompt: output equal, target
passes / drafted / accepted of each, and tokens/s of each.

    python scripts/serve_vs_library.py --sets humaneval:3,mtbench:3 --max-tokens 128
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time

import uvicorn
from openai import OpenAI

from verispec.bench.datasets import load_prompts, parse_set_sizes
from verispec.drafting import drafter_menu
from verispec.generate import encode_prompt, generate
from verispec.models import default_draft_precision, load_model
from verispec.models.presets import default_cache_dir
from verispec.policy.costs import costs_for
from verispec.server.app import create_app
from verispec.server.metrics import Metrics
from verispec.server.scheduler import Scheduler


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="qwen2.5-coder-1.5b")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b")
    parser.add_argument("--drafter", default="hybrid")
    parser.add_argument("--sets", default="humaneval:3,mtbench:3")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    target = load_model(args.target)
    draft = load_model(
        args.draft,
        precision=default_draft_precision("cpu"),
        batch_invariant=False,
        compile_steps="auto",
    )
    menu = drafter_menu(target, draft)
    drafter = menu[args.drafter]
    costs = costs_for(target, draft, cache_dir=default_cache_dir())
    scheduler = Scheduler(
        target,
        menu,
        default=args.drafter,
        max_batch=4,
        num_draft_tokens="auto",
        costs=costs,
        metrics=Metrics(),
    )
    app = create_app(scheduler, model_name="m", max_tokens_limit=4096)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    sizes = parse_set_sizes(args.sets)
    prompts = load_prompts(list(sizes), num_prompts=1, seed=0, sizes=sizes)
    generate(target, drafter, "warm up", max_new_tokens=8, num_draft_tokens="auto", costs=costs)
    rows, ratios = [], []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt.turns[0]}]
        ids = encode_prompt(target.tokenizer, messages)
        lib = generate(
            target, drafter, ids, max_new_tokens=args.max_tokens, num_draft_tokens="auto",
            costs=costs,
        )  # fmt: skip
        start = time.perf_counter()
        reply = client.completions.create(
            model="m", prompt=ids, max_tokens=args.max_tokens, temperature=0
        )
        served_seconds = time.perf_counter() - start
        spec = (reply.model_extra or {})["speculation"]
        served_ids = reply.choices[0].text == lib.text
        lib_rate = lib.stats.new_tokens / lib.stats.time_total
        served_rate = (reply.usage.completion_tokens if reply.usage else 0) / served_seconds
        ratios.append(served_rate / lib_rate)
        rows.append(
            f"| {prompt.prompt_id} | {served_ids} | {lib.stats.target_passes} / "
            f"{spec['target_passes']} | {lib.stats.drafted} / {spec['drafted']} | "
            f"{lib.stats.accepted} / {spec['accepted']} | {lib_rate:.2f} | {served_rate:.2f} |"
        )
        print(rows[-1], flush=True)
    server.should_exit = True
    thread.join(10)
    print(
        "\n| prompt | same text | passes lib / served | drafted lib / served | "
        "accepted lib / served | lib tok/s | served tok/s (HTTP wall) |\n"
        "|---|---|---|---|---|---|---|"
    )
    print("\n".join(rows))
    print(
        f"\nserved / library tokens/s: median {statistics.median(ratios):.3f}, "
        f"min {min(ratios):.3f}, max {max(ratios):.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
