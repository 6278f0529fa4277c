"""Kernels change speed, never the target's output."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import plain_greedy, tiny_llama

from verispec.drafters import DraftModelDrafter
from verispec.errors import InvalidArgumentError
from verispec.generate import generate
from verispec.kernels import OneDNNLinear, onednn_available, optimize, trim_vocabulary
from verispec.models import HFModel

PROMPT = [5, 17, 99, 3, 5, 17, 42, 8, 5, 17]


def _clone(model: HFModel) -> HFModel:
    return HFModel(
        hf=copy.deepcopy(model.hf),
        tokenizer=None,
        name=model.name + "-copy",
        eos_token_ids=model.eos_token_ids,
    )


@pytest.mark.skipif(not onednn_available(), reason="PyTorch built without oneDNN")
def test_onednn_logits_match_default_within_1e_4() -> None:
    base = tiny_llama(seed=0)
    fast = _clone(base)
    applied = optimize(fast.hf, device="cpu", kernels="onednn", precision="fp32")
    assert "oneDNN" in applied
    assert any(isinstance(m, OneDNNLinear) for m in fast.hf.modules())
    for n in (1, 2, 5, 9):
        tokens = PROMPT[:n]
        ref = base.forward(base.new_cache(), tokens)
        got = fast.forward(fast.new_cache(), tokens)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert plain_greedy(fast, PROMPT, 20) == plain_greedy(base, PROMPT, 20)


def test_int8_draft_keeps_the_output_exact() -> None:
    target = tiny_llama(seed=0)
    draft = _clone(target)
    optimize(draft.hf, device="cpu", kernels="auto", precision="int8")
    result = generate(
        target,
        DraftModelDrafter(draft, target=target),
        PROMPT,
        max_new_tokens=30,
        num_draft_tokens=4,
    )
    assert result.token_ids == plain_greedy(target, PROMPT, 30)
    assert result.stats.acceptance_rate > 0.5  # int8 of the same weights mostly agrees


def test_trimmed_draft_vocabulary_is_lossless_and_scores_only_kept_ids() -> None:
    target = tiny_llama(seed=0)
    draft = _clone(target)
    kept = trim_vocabulary(draft.hf, 64, always_keep={256})
    assert kept == 65
    logits = draft.forward(draft.new_cache(), PROMPT)
    assert torch.isinf(logits[:, 64:256]).all() and torch.isfinite(logits[:, :64]).all()
    full = target.forward(target.new_cache(), PROMPT)
    torch.testing.assert_close(logits[:, :64], full[:, :64], atol=1e-5, rtol=1e-5)
    for temperature in (0.0, 0.8):
        result = generate(
            target,
            DraftModelDrafter(draft, target=target),
            PROMPT,
            max_new_tokens=25,
            num_draft_tokens=3,
            temperature=temperature,
            seed=1,
        )
        if temperature == 0.0:
            assert result.token_ids == plain_greedy(target, PROMPT, 25)
        assert all(0 <= t < target.vocab_size for t in result.token_ids)


def test_trimmed_head_scores_the_context_ids_it_is_given() -> None:
    target = tiny_llama(seed=0)
    draft = _clone(target)
    trim_vocabulary(draft.hf, 64, always_keep=set())
    head = draft.hf.get_output_embeddings()
    head.max_extra = 3
    draft.include_ids([200, 70, 5, 70, -1, 10_000])  # 5 is kept already; -1, 10_000 ignored
    assert head.extra_ids.tolist() == [70, 200] and head.num_scored == 66
    logits = draft.forward(draft.new_cache(), PROMPT)
    full = target.forward(target.new_cache(), PROMPT)
    for i in (5, 70, 200):
        torch.testing.assert_close(logits[:, i], full[:, i], atol=1e-5, rtol=1e-5)
    assert torch.isinf(logits[:, 71:200]).all()
    draft.include_ids([210, 211])  # one slot left
    assert head.extra_ids.tolist() == [70, 200, 210]
    # A draft model proposer tells the head the ids of the context it drafts for.
    draft2 = _clone(target)
    trim_vocabulary(draft2.hf, 64, always_keep=set())
    prompt = [*PROMPT, 120, 121, 122]
    generate(target, DraftModelDrafter(draft2, target=target), prompt, max_new_tokens=4)
    extras = set(draft2.hf.get_output_embeddings().extra_ids.tolist())
    assert {t for t in prompt if t >= 64} <= extras


def test_bad_kernel_choices_are_refused() -> None:
    model = tiny_llama(seed=0)
    with pytest.raises(InvalidArgumentError, match="kernels"):
        optimize(model.hf, device="cpu", kernels="magic")
    with pytest.raises(InvalidArgumentError, match="precision"):
        optimize(model.hf, device="cpu", precision="int4")
    with pytest.raises(InvalidArgumentError, match="vocabulary size"):
        trim_vocabulary(model.hf, 0, always_keep=set())


@pytest.mark.skipif(not onednn_available(), reason="PyTorch built without oneDNN")
def test_onednn_padding_of_short_inputs_never_changes_rows() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80)
    fast = OneDNNLinear(linear)
    assert fast.min_rows > 1  # short inputs really take the padded path
    for rows in range(1, fast.min_rows + 3):
        x = torch.randn(1, rows, 48)
        got = fast(x)
        assert got.shape == (1, rows, 80)
        torch.testing.assert_close(got, linear(x), atol=1e-5, rtol=1e-5)
