"""Token trees: a draft's runner-up tokens verified as siblings in the same target pass."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import plain_greedy
from test_lean import VOCAB
from test_lean import _llama as lean_llama
from test_lean import _qwen2 as lean_qwen2

from verispec.drafting import DraftModelDrafter, HybridDrafter
from verispec.errors import InvalidArgumentError
from verispec.generate import generate
from verispec.models import HFModel
from verispec.models.lean import tree_layout
from verispec.policy import DraftPolicy
from verispec.policy.costs import CostModel
from verispec.verify import greedy_verify

FLAT = CostModel(c_verify=(1.0,) * 17, c_draft=0.05)  # extra rows cost nothing
STEEP = CostModel(c_verify=tuple(1.0 + 0.5 * k for k in range(17)), c_draft=0.05)


def _qwen2(seed: int = 0, noise: float = 0.0) -> Any:
    """test_lean's tiny Qwen2, its weights moved by ``noise`` (a draft that is often right)."""
    hf = lean_qwen2()
    if noise:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(noise * torch.randn(p.shape, generator=gen))
    return hf


def test_tree_layout_gives_depths_and_ancestors() -> None:
    depth, rows = tree_layout([-1, 0, 1, 0, 2], 5)
    assert depth == [0, 1, 2, 1, 3]
    assert rows == [[0], [0, 1], [0, 1, 2], [0, 3], [0, 1, 2, 4]]
    with pytest.raises(ValueError, match="parent 2 is not an earlier row"):
        tree_layout([-1, 2, 1], 3)
    with pytest.raises(ValueError, match="2 parents for 3 rows"):
        tree_layout([-1, 0], 3)


# A chain last, d0, d1, d2 and siblings of d0 (row 4) and d2 (row 5).
TREE_TOKENS = [7, 40, 41, 42, 90, 91]
TREE_PARENTS = [-1, 0, 1, 2, 0, 2]
TREE_PATHS = [[7], [7, 40], [7, 40, 41], [7, 40, 41, 42], [7, 90], [7, 40, 41, 91]]


@pytest.mark.parametrize("build", [_qwen2, lean_llama], ids=["qwen2", "llama"])
def test_each_tree_row_scores_as_its_own_path_does(build: Any) -> None:
    model = HFModel(hf=build(), tokenizer=None, name="m")
    assert model.supports_tree
    context = list(range(3, 60))
    cache = model.new_cache()
    model.forward(cache, context)
    (tree,) = model.forward_batch([cache], [TREE_TOKENS], parents=[TREE_PARENTS])  # [6, vocab]
    assert cache.length == len(context) + len(TREE_TOKENS)
    for row, path in enumerate(TREE_PATHS):
        alone = model.forward(model.new_cache(), context + path)[-1]
        torch.testing.assert_close(tree[row], alone, atol=1e-4, rtol=1e-4)
    # Keep the path through d0's sibling: move its row into d0's place and go on.
    base = len(context)
    cache.move(base + 4, base + 1)
    cache.crop(base + 2)
    after = model.forward(cache, [11, 12])
    fresh = model.forward(model.new_cache(), [*context, 7, 90, 11, 12])[-2:]
    torch.testing.assert_close(after, fresh, atol=1e-4, rtol=1e-4)


def test_an_int8_target_scores_tree_rows_as_decoding_them_alone_does() -> None:
    """The int8 target's rows must match one-position passes bit for bit (see
    test_lean), siblings included."""
    from verispec.models.kernels import optimize

    hf = _qwen2()
    applied = optimize(hf, device="cpu", precision="int8")
    model = HFModel(hf=hf, tokenizer=None, name="int8", runner="lean", fused=applied.fused)
    context = list(range(3, 45))
    cache = model.new_cache()
    model.forward(cache, context)
    (tree,) = model.forward_batch([cache], [TREE_TOKENS], parents=[TREE_PARENTS])
    for row, path in enumerate(TREE_PATHS):
        step = model.new_cache()
        model.forward(step, context)
        for token in path[:-1]:
            model.forward(step, [token])
        assert torch.equal(tree[row : row + 1], model.forward(step, [path[-1]])), row


def test_trees_need_the_lean_runner() -> None:
    model = HFModel(hf=lean_llama(), tokenizer=None, name="m", runner="hf")
    assert not model.supports_tree
    with pytest.raises(InvalidArgumentError, match="token trees need the lean runner"):
        model.forward_batch([model.new_cache()], [[1, 2, 3]], parents=[[-1, 0, 0]])


def test_greedy_verify_keeps_a_sibling_that_the_target_chose() -> None:
    def logits(choices: list[int]) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor(choices), 10).float()

    rows = logits([5, 7, 2, 9, 8, 3])  # chain rows 0-3, then siblings (2, 2) and (0, 6)
    siblings = [(2, 2), (0, 6)]
    verdict = greedy_verify([5, 7, 4], rows, siblings)
    assert (verdict.num_accepted, verdict.sibling, verdict.sibling_row) == (2, 2, 4)
    assert verdict.tokens([5, 7, 4]) == [5, 7, 2, 8]
    # A sibling at another position, or of another token, changes nothing.
    plain = greedy_verify([5, 7, 4], rows, [(1, 2), (2, 3)])
    assert plain.sibling is None and plain.tokens([5, 7, 4]) == [5, 7, 2]
    # A fully accepted draft ends with the bonus row, siblings or not.
    full = greedy_verify([5, 7, 2], rows, siblings)
    assert full.sibling is None and full.tokens([5, 7, 2]) == [5, 7, 2, 9]


def test_siblings_fill_free_rows_and_stay_out_of_costly_ones() -> None:
    confidences, runners_up = [0.8, 0.5, 0.9], [0.15, 0.45, 0.01]
    free = DraftPolicy(FLAT).choose_siblings(confidences, runners_up, room=16)
    # Rows cost nothing here, but a row is charged ROW_COST_FLOOR: the sibling at 2
    # (reached half the time, rejected a tenth of that, the runner-up a tenth of the
    # rest) is not worth it.
    assert free == [0, 1]
    assert DraftPolicy(FLAT).choose_siblings(confidences, runners_up, room=1) == [1]
    # Each extra row costing half a step: only a likely sibling pays, if any.
    steep = DraftPolicy(STEEP).choose_siblings(confidences, runners_up, room=16)
    assert steep == []
    steep_likely = DraftPolicy(STEEP).choose_siblings([0.3], [0.69], room=16)
    assert steep_likely == [0]
    # Never past the longest measured length.
    short = CostModel(c_verify=(1.0,) * 4, c_draft=0.05)
    assert len(DraftPolicy(short).choose_siblings(confidences, runners_up, 16)) == 0
    assert DraftPolicy(FLAT).choose_siblings([], [], room=4) == []


def _pair(noise: float = 0.01) -> tuple[HFModel, HFModel]:
    target = HFModel(hf=_qwen2(), tokenizer=None, name="target")
    draft = HFModel(hf=_qwen2(seed=3, noise=noise), tokenizer=None, name="draft")
    return target, draft


@pytest.mark.parametrize("hybrid", [False, True], ids=["draft", "hybrid"])
def test_greedy_output_with_siblings_equals_plain_greedy(hybrid: bool) -> None:
    target, draft = _pair()
    drafter: Any = DraftModelDrafter(draft, target=target)
    if hybrid:
        drafter = HybridDrafter(drafter)
    kept = 0
    for seed in range(3):
        prompt = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(seed))
        ids = prompt.tolist()
        result = generate(
            target, drafter, ids, max_new_tokens=48, num_draft_tokens="auto", costs=FLAT
        )
        assert result.token_ids == plain_greedy(target, ids, 48)
        assert result.stats.siblings > 0
        kept += result.stats.siblings_kept
        chain = generate(
            target, drafter, ids, max_new_tokens=48, num_draft_tokens="auto", costs=FLAT,
            siblings=False,
        )  # fmt: skip
        assert chain.token_ids == result.token_ids and chain.stats.siblings == 0
    assert kept > 0  # kept siblings were really exercised (moved in the cache)


def test_an_int8_target_with_siblings_equals_plain_int8_decoding() -> None:
    from verispec.models.kernels import optimize

    hf = _qwen2()
    applied = optimize(hf, device="cpu", precision="int8")
    target = HFModel(hf=hf, tokenizer=None, name="int8", runner="lean", fused=applied.fused)
    draft = HFModel(hf=_qwen2(seed=4, noise=0.01), tokenizer=None, name="draft")
    drafter = DraftModelDrafter(draft, target=target)
    kept = 0
    for seed in range(3):
        ids = torch.randint(0, VOCAB, (25,), generator=torch.Generator().manual_seed(seed))
        plain = generate(target, None, ids.tolist(), max_new_tokens=40)
        spec = generate(
            target, drafter, ids.tolist(), max_new_tokens=40, num_draft_tokens="auto", costs=FLAT
        )
        assert spec.token_ids == plain.token_ids
        kept += spec.stats.siblings_kept
    assert kept > 0


def test_no_siblings_when_sampling_or_without_a_tree_capable_target() -> None:
    target, draft = _pair()
    drafter = DraftModelDrafter(draft, target=target)
    sampled = generate(
        target, drafter, [5, 6, 7, 8], max_new_tokens=24, num_draft_tokens="auto", costs=FLAT,
        temperature=0.8, seed=1,
    )  # fmt: skip
    assert sampled.stats.siblings == 0 and sampled.stats.drafted > 0
    hf_target = HFModel(hf=_qwen2(), tokenizer=None, name="target", runner="hf")
    result = generate(
        hf_target, DraftModelDrafter(draft, target=hf_target), [5, 6, 7, 8], max_new_tokens=24,
        num_draft_tokens="auto", costs=FLAT,
    )  # fmt: skip
    assert result.stats.siblings == 0 and result.token_ids == plain_greedy(target, [5, 6, 7, 8], 24)
