"""Load test for ``verispec serve``: throughput and latency, speculation on and off.

Starts one server per configuration on 127.0.0.1 (a subprocess running
``python -m verispec.cli serve``), drives it with concurrent streaming chat
requests (greedy, fixed prompts), and prints one table row per configuration
and concurrency: requests/s, output tokens/s, p50/p95/p99 latency and time to
first token, acceptance. Bounded: a fixed number of requests per cell and a
time limit per cell; loopback only (``--url`` must point at 127.0.0.1 / localhost).

    python scripts/loadtest.py --target smollm2-135m --concurrency 1,4,16
    python scripts/loadtest.py --target qwen2.5-coder-1.5b --drafter hybrid --configs spec,plain

Configurations (``--configs``):
    spec        drafts by ``--drafter`` (prompt-lookup unless told), -k auto, batched
    plain       no speculation, batched
    spec-unbatched  speculation, one sequence at a time (--max-batch 1)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

CONFIGS = {
    "spec": ["--drafter", "prompt-lookup", "--num-draft-tokens", "auto"],
    "plain": ["--drafter", "none"],
    "spec-unbatched": [
        "--drafter",
        "prompt-lookup",
        "--num-draft-tokens",
        "auto",
        "--max-batch",
        "1",
    ],
}
PROMPTS = [
    "Repeat this list exactly, then add one more item: apples, pears, plums, cherries, grapes.",
    "Rewrite this sentence in the past tense: The cat sits on the mat and watches the birds.",
    "Write a Python function that returns the sum of a list of numbers.",
    "Fix the typo and repeat the text: The quick brown fox jumsp over the lazy dog.",
    "Explain in two sentences what a hash table is.",
    "Convert to uppercase: the rain in spain stays mainly in the plain.",
    "List the days of the week, one per line.",
    "Continue the sequence: 2, 4, 6, 8, 10, 12,",
    "Translate to French: Good morning, how are you today?",
    "Write a haiku about the sea.",
    'Copy this JSON and add a field age=30: {"name": "Ada", "city": "London"}',
    "Summarize: Speculative decoding drafts tokens cheaply and verifies them in one pass.",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Result:
    latency: float = 0.0
    ttft: float = 0.0
    tokens: int = 0
    text: str = ""
    drafted: int = 0
    accepted: int = 0
    error: str | None = None


@dataclass
class Cell:
    config: str
    concurrency: int
    wall: float
    results: list[Result] = field(default_factory=list)

    def row(self) -> dict[str, float | int | str]:
        ok = [r for r in self.results if r.error is None]
        lat = sorted(r.latency for r in ok) or [0.0]
        ttft = sorted(r.ttft for r in ok) or [0.0]
        tokens = sum(r.tokens for r in ok)
        drafted = sum(r.drafted for r in ok)
        return {
            "config": self.config,
            "conc": self.concurrency,
            "requests": len(ok),
            "errors": len(self.results) - len(ok),
            "req/s": len(ok) / self.wall,
            "out tok/s": tokens / self.wall,
            "lat p50": _pct(lat, 50),
            "lat p95": _pct(lat, 95),
            "lat p99": _pct(lat, 99),
            "ttft p50": _pct(ttft, 50),
            "ttft p95": _pct(ttft, 95),
            "ttft p99": _pct(ttft, 99),
            "accept": sum(r.accepted for r in ok) / drafted if drafted else 0.0,
        }


def _pct(values: list[float], p: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


async def _one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> Result:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result, start = Result(), time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = event["error"]["message"]
                for choice in event.get("choices", []):
                    text = choice["delta"].get("content") or ""
                    if text and not result.text:
                        result.ttft = time.perf_counter() - start
                    result.text += text
                if event.get("usage"):
                    result.tokens = event["usage"]["completion_tokens"]
                if event.get("speculation"):
                    result.drafted = event["speculation"]["drafted"]
                    result.accepted = event["speculation"]["accepted"]
    except httpx.HTTPError as exc:
        result.error = repr(exc)
    result.latency = time.perf_counter() - start
    return result


async def run_cell(
    url: str, config: str, concurrency: int, *, requests: int, max_tokens: int, time_limit: float
) -> Cell:
    pending = list(range(requests))
    results: list[tuple[int, Result]] = []
    deadline = time.perf_counter() + time_limit
    async with httpx.AsyncClient(timeout=httpx.Timeout(time_limit + 60)) as client:
        await _one(client, url, PROMPTS[0], 8)  # warm-up, not counted

        async def worker() -> None:
            while pending and time.perf_counter() < deadline:
                i = pending.pop(0)
                results.append((i, await _one(client, url, PROMPTS[i % len(PROMPTS)], max_tokens)))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return Cell(config, concurrency, wall, [r for _, r in sorted(results, key=lambda x: x[0])])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    args: argparse.Namespace, config: str, max_batch: int
) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [
        sys.executable, "-m", "verispec.cli", "serve", "--target", args.target,
        "--host", "127.0.0.1", "--port", str(port), "--max-batch", str(max_batch),
        "--max-queue", "256", "--log-level", "warning", *CONFIGS[config],
    ]  # fmt: skip
    if "--drafter" in command and command[command.index("--drafter") + 1] != "none":
        command[command.index("--drafter") + 1] = args.drafter
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server for {config} exited with code {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"the server for {config} did not start")


def print_table(cells: list[Cell]) -> None:
    rows = [cell.row() for cell in cells]
    headers = list(rows[0])
    fmt = {k: (lambda v: f"{v:.2f}") for k in headers if isinstance(rows[0][k], float)}
    table = [[fmt.get(k, str)(row[k]) for k in headers] for row in rows]  # type: ignore[operator]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in table:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--configs", default="spec,plain,spec-unbatched")
    parser.add_argument(
        "--drafter", default="prompt-lookup", help="the spec configurations' drafter"
    )
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=0, help="per cell (default: max(8, 2c))")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=180.0, help="seconds per cell")
    parser.add_argument("--url", default=None, help="test this running server (loopback only)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    configs = [c for c in args.configs.split(",") if c]
    if args.url is not None and urlparse(args.url).hostname not in LOOPBACK:
        parser.error("--url must be a loopback address (127.0.0.1, localhost, ::1)")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown and args.url is None:
        parser.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    cells: list[Cell] = []
    servers: dict[str, tuple[subprocess.Popen | None, str]] = {}
    load_before = os.getloadavg()
    try:
        # All servers up first (an idle one costs nothing), then the cells interleaved by
        # concurrency, so that a change in the machine's load hits every configuration alike.
        for config in configs if args.url is None else ["server"]:
            servers[config] = (
                (None, args.url) if args.url else start_server(args, config, max(levels))
            )
        for c in levels:
            for config, (_, url) in servers.items():
                n = args.requests or max(8, 2 * c)
                cell = asyncio.run(
                    run_cell(url, config, c, requests=n, max_tokens=args.max_tokens,
                             time_limit=args.time_limit)
                )  # fmt: skip
                cells.append(cell)
                print(f"{config} c={c}: {cell.row()['out tok/s']:.1f} tok/s", file=sys.stderr)
    finally:
        for process, _ in servers.values():
            if process is not None:
                process.terminate()
                process.wait(60)
    cells.sort(key=lambda cell: (list(servers).index(cell.config), cell.concurrency))
    print(
        f"{args.target}, {args.max_tokens} max tokens, greedy; load average before/after: "
        f"{load_before[0]:.2f} / {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)\n"
    )
    print_table(cells)
    by_key = {(cell.config, cell.concurrency): [r.text for r in cell.results] for cell in cells}
    if "spec" in configs and "plain" in configs:
        same = all(by_key[("spec", c)] == by_key[("plain", c)] for c in levels)
        print(f"\ngreedy outputs identical with and without speculation: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([cell.row() for cell in cells], f, indent=2)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
