"""Kernels change speed, never the target's output."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import plain_greedy, tiny_llama

from verispec.drafting import DraftModelDrafter
from verispec.errors import InvalidArgumentError
from verispec.generate import generate
from verispec.models import HFModel
from verispec.models.kernels import (
    INT4_MAX_ROWS,
    Int4Linear,
    OneDNNLinear,
    int4_available,
    onednn_available,
    optimize,
)

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
    assert "oneDNN" in applied.description
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


needs_int4 = pytest.mark.skipif(not int4_available(), reason="torch without CPU int4 kernels")


@needs_int4
def test_int4_linear_keeps_4_bit_grids_and_scores_rows_independently() -> None:
    torch.manual_seed(0)
    out_features, in_features = 49, 96  # 49 rows: the kernel's 16-row packing needs padding
    # Weights on a 16-level grid per group of 32 inputs, as in a Q4_K GGUF's blocks:
    # the int4 layer stores them exactly, so only bf16 rounding of the activations,
    # scales and zero points is left (about 3 significant digits).
    steps = torch.rand(out_features, in_features // 32, 1) * 0.02 + 0.001
    mins = torch.randn(out_features, in_features // 32, 1) * 0.05
    levels = torch.randint(0, 16, (out_features, in_features // 32, 32))
    levels[..., 0], levels[..., 1] = 0, 15  # every group spans its whole grid
    linear = torch.nn.Linear(in_features, out_features)
    linear.weight.data = (mins + levels * steps).reshape(out_features, in_features)
    layer = Int4Linear(linear)
    x = torch.randn(2, 2, in_features)  # 4 rows: the int4 kernel's calls (decode steps)
    got, want = layer(x), linear(x)
    assert got.shape == want.shape == (2, 2, out_features)
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    # A row's result does not depend on the other rows of the call (verified drafts
    # and the same position decoded alone get the same draft scores).
    flat = x.reshape(INT4_MAX_ROWS, in_features)
    together = layer(flat)
    assert all(torch.equal(layer(flat[i : i + 1])[0], together[i]) for i in range(4))
    # Wider calls (a prompt pass) run on the int8 copy: close to fp32, not the int4 kernel.
    wide = torch.randn(INT4_MAX_ROWS + 5, in_features)
    rows = layer(wide)
    assert rows.shape == (INT4_MAX_ROWS + 5, out_features)
    assert (rows - linear(wide)).abs().max() < 0.05 * linear(wide).abs().max()
    assert not torch.equal(rows[:1], layer(wide[:1]))
    # Off-grid (Gaussian) weights are rounded to their group's grid: close, not equal.
    linear.weight.data = torch.randn(out_features, in_features) * 0.05
    off_grid = Int4Linear(linear)
    rounded = off_grid(x)
    assert 0 < (rounded - linear(x)).abs().mean() < 0.1 * linear(x).abs().mean()
    # The wide copy holds the grid's weights, not the original ones: a prompt pass
    # scores with (nearly) the weights of the decode steps. Its int8 error per output
    # channel (1/255 of a row's range) is well below the 4-bit rounding (1/15 of a
    # group's range), so it is at least 3 times closer to the grid than to the original.
    on_grid = torch.nn.Linear(in_features, out_features)
    on_grid.weight.data = _on_4_bit_grid(linear.weight.data)
    on_grid.bias.data = linear.bias.data
    wide_rows = off_grid(wide)
    to_grid = (wide_rows - on_grid(wide)).abs().mean()
    assert 3 * to_grid < (wide_rows - linear(wide)).abs().mean()


@needs_int4
def test_int4_draft_keeps_the_output_exact() -> None:
    target = tiny_llama(seed=0)
    with torch.no_grad():  # a 4-bit target, as the bundled GGUF models are
        for module in target.hf.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(_on_4_bit_grid(module.weight))
    hf = copy.deepcopy(target.hf)
    applied = optimize(hf, device="cpu", precision="int4", batch_invariant=False)
    assert "int4" in applied.description and "fused in 2 layers" in applied.description
    assert isinstance(hf.lm_head, Int4Linear)
    assert isinstance(hf.model.layers[0].mlp.down_proj, Int4Linear)
    for runner in ("lean", "hf"):  # fused projections / transformers' separate ones
        draft = HFModel(hf=hf, tokenizer=None, name=f"int4-{runner}", runner=runner)
        # A 4-token prompt, so that every draft pass runs on the int4 kernel (wider
        # ones take the int8 copy, tested above).
        result = generate(
            target,
            DraftModelDrafter(draft, target=target),
            PROMPT[:INT4_MAX_ROWS],
            max_new_tokens=30,
            num_draft_tokens=4,
        )
        assert result.token_ids == plain_greedy(target, PROMPT[:INT4_MAX_ROWS], 30)
        # The same 4-bit weights; bf16 activations still flip some of this random
        # model's choices; a wrong grid would agree by chance only.
        assert result.stats.acceptance_rate > 0.6


def _on_4_bit_grid(weight: torch.Tensor) -> torch.Tensor:
    """Each group of 32 inputs rounded to 16 levels between its min and max."""
    groups = weight.reshape(weight.shape[0], -1, 32)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    return (lo + ((groups - lo) / step).round() * step).reshape(weight.shape)


def test_int4_is_refused_for_targets_and_gpus() -> None:
    model = tiny_llama(seed=0)
    with pytest.raises(InvalidArgumentError, match="draft models only"):
        optimize(model.hf, device="cpu", precision="int4")  # batch_invariant: a target
    with pytest.raises(InvalidArgumentError, match="CPU option"):
        optimize(model.hf, device="cuda", precision="int4", batch_invariant=False)


def test_bad_kernel_choices_are_refused() -> None:
    model = tiny_llama(seed=0)
    with pytest.raises(InvalidArgumentError, match="kernels"):
        optimize(model.hf, device="cpu", kernels="magic")
    with pytest.raises(InvalidArgumentError, match="precision"):
        optimize(model.hf, device="cpu", precision="int4")


@pytest.mark.skipif(not onednn_available(), reason="PyTorch built without oneDNN")
def test_onednn_padding_of_short_inputs_never_changes_rows() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80)
    fast = OneDNNLinear(linear, min_rows=6)
    for rows in range(1, fast.min_rows + 3):
        x = torch.randn(1, rows, 48)
        got = fast(x)
        assert got.shape == (1, rows, 80)
        torch.testing.assert_close(got, linear(x), atol=1e-5, rtol=1e-5)
