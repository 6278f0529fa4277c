"""Prefix caching: a later prompt that starts with an earlier sequence's tokens skips them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import TableModel, plain_greedy, tiny_llama

from verispec import PrefixCache
from verispec.drafting import DraftModelDrafter, HybridDrafter, PromptLookupDrafter
from verispec.engine import speculate
from verispec.errors import InvalidArgumentError
from verispec.generate import generate, stream
from verispec.prefix import CachedState, PrefixEntry, common_prefix_length

TURN1 = [5, 17, 99, 3, 5, 17, 42, 8, 5, 17, 61, 2]
QUESTION = [7, 7, 31, 200, 4]


def test_common_prefix_length() -> None:
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([9], [1]) == 0
    assert common_prefix_length([], [1]) == 0


def test_take_picks_the_longest_shared_prefix_of_the_same_model_and_removes_it() -> None:
    a, b = TableModel(8, seed=0), TableModel(8, seed=1)
    pool = PrefixCache(max_sequences=3)

    def entry(model: TableModel, tokens: list[int]) -> PrefixEntry:
        cache = model.new_cache()
        model.forward(cache, tokens)
        return PrefixEntry(target=CachedState(model, tokens, cache))

    pool.put(entry(a, [1, 2, 3]))
    pool.put(entry(a, [1, 2, 5, 6]))
    pool.put(entry(b, [1, 2, 5, 6, 7]))  # another model: never handed to a
    found = pool.take(a, [1, 2, 5, 6, 0])
    assert found is not None and found[1] == 4 and found[0].target.tokens == [1, 2, 5, 6]
    assert len(pool) == 2
    assert pool.take(a, [4, 4]) is None  # nothing shared: no entry taken
    found = pool.take(a, [1, 2, 5])
    assert found is not None and found[1] == 2 and found[0].target.tokens == [1, 2, 3]
    assert pool.take(a, [1, 2, 5]) is None and len(pool) == 1


def test_the_least_recently_finished_entry_is_dropped_first() -> None:
    model = TableModel(8, seed=0)
    pool = PrefixCache(max_sequences=2)
    for first in (1, 2, 3):
        cache = model.new_cache()
        model.forward(cache, [first, 0])
        pool.put(PrefixEntry(target=CachedState(model, [first, 0], cache)))
    assert len(pool) == 2
    assert pool.take(model, [1, 0]) is None
    assert pool.take(model, [3, 0]) is not None
    pool.clear()
    assert len(pool) == 0


def test_bad_arguments_are_refused_by_name() -> None:
    with pytest.raises(InvalidArgumentError, match="max_sequences"):
        PrefixCache(0)
    with pytest.raises(InvalidArgumentError, match="max_sequences"):
        PrefixCache("2")  # type: ignore[arg-type]
    model = TableModel(8, seed=0)
    cache = model.new_cache()
    model.forward(cache, [1, 2])
    with pytest.raises(ValueError, match="length"):
        PrefixCache().put(PrefixEntry(target=CachedState(model, [1, 2, 3], cache)))


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def draft():
    return tiny_llama(seed=1)


def _drafters(target: Any, draft: Any) -> dict[str, Any]:
    model = DraftModelDrafter(draft, target=target)
    return {
        "plain": None,
        "draft": model,
        "hybrid": HybridDrafter(model),
        "lookup": PromptLookupDrafter(),
    }


@pytest.mark.parametrize("kind", ["plain", "draft", "hybrid", "lookup"])
def test_a_second_turn_scores_only_its_new_tokens_and_decodes_the_same(
    target: Any, draft: Any, counting: Any, kind: str
) -> None:
    """Turn 2 = turn 1's prompt and answer and a new question: with the cache, its
    prompt pass scores only what the finished sequence's cache did not hold, and the
    greedy output equals decoding the whole prompt afresh (and the reference loop)."""
    counted = counting(target)
    drafter = _drafters(counted, draft)[kind]
    pool = PrefixCache()
    first = generate(
        counted, drafter, TURN1, max_new_tokens=12, num_draft_tokens=3, prefix_cache=pool
    )
    assert first.stats.cached_prompt_tokens == 0 and counted.fed[0] == len(TURN1)
    assert len(pool) == 1
    turn2 = TURN1 + first.token_ids + QUESTION
    counted.fed.clear()
    again = generate(
        counted, drafter, turn2, max_new_tokens=20, num_draft_tokens=3, prefix_cache=pool
    )
    # The cache held every token but the last one emitted (never fed to the target).
    held = len(TURN1) + len(first.token_ids) - 1
    assert again.stats.cached_prompt_tokens == held
    assert counted.fed[0] == len(turn2) - held
    fresh = generate(
        target, _drafters(target, draft)[kind], turn2, max_new_tokens=20, num_draft_tokens=3
    )
    assert again.token_ids == fresh.token_ids == plain_greedy(target, turn2, 20)
    assert len(pool) == 1  # the second sequence's caches replaced the first's


def test_a_speculative_sequence_keeps_the_prefix_plain_decoding_keeps() -> None:
    """EOS accepted inside a run of drafts: the speculative pass fed the EOS token (and
    more) where plain decoding never feeds its last token. The kept prefix must be
    plain's, or a next turn (whose prompt repeats the EOS) would reuse one position more
    and split its prompt pass differently from plain decoding through the same cache."""
    free = TableModel(16, seed=3)
    out = generate(free, None, [1, 2], max_new_tokens=8).token_ids
    eos = next(t for i, t in enumerate(out) if i >= 2 and t not in out[:i])
    target = TableModel(16, seed=3, eos=frozenset({eos}))
    kept = []
    for drafter in (None, DraftModelDrafter(target, target=target)):  # drafts always right
        pool = PrefixCache()
        result = generate(
            target, drafter, [1, 2], max_new_tokens=8, num_draft_tokens=6, prefix_cache=pool
        )
        assert result.finish_reason == "eos"
        if drafter is not None:
            assert result.stats.target_passes == 2  # the EOS came inside the first draft
        found = pool.take(target, [1, 2, *result.token_ids, 5])
        assert found is not None
        kept.append(found[0].target.tokens)
    assert kept[0] == kept[1] == [1, 2, *result.token_ids[:-1]]


def test_the_same_prompt_again_rescores_only_its_last_token(target: Any, counting: Any) -> None:
    counted = counting(target)
    pool = PrefixCache()
    one = generate(counted, None, TURN1, max_new_tokens=1, prefix_cache=pool)
    counted.fed.clear()
    two = generate(counted, None, TURN1, max_new_tokens=6, prefix_cache=pool)
    assert counted.fed[0] == 1  # the last prompt token gives the first new token's logits
    assert two.stats.cached_prompt_tokens == len(TURN1) - 1
    assert two.token_ids[:1] == one.token_ids
    assert two.token_ids == plain_greedy(target, TURN1, 6)


def test_a_diverging_prompt_reuses_only_the_shared_part(target: Any) -> None:
    pool = PrefixCache()
    generate(target, None, TURN1, max_new_tokens=5, prefix_cache=pool)
    other = [*TURN1[:7], 1, 2, 3, 4]
    result = generate(target, None, other, max_new_tokens=10, prefix_cache=pool)
    assert result.stats.cached_prompt_tokens == 7
    assert result.token_ids == plain_greedy(target, other, 10)


def test_the_draft_model_catches_up_from_its_own_cached_prefix(
    target: Any, draft: Any, counting: Any
) -> None:
    counted_draft = counting(draft)
    drafter = DraftModelDrafter(counted_draft, target=target)
    pool = PrefixCache()
    first = generate(
        target, drafter, TURN1, max_new_tokens=10, num_draft_tokens=3, prefix_cache=pool
    )
    turn2 = TURN1 + first.token_ids + QUESTION
    counted_draft.fed.clear()
    generate(target, drafter, turn2, max_new_tokens=10, num_draft_tokens=3, prefix_cache=pool)
    # Its first call feeds what its cache lacks: far fewer than the whole prompt.
    assert 1 <= counted_draft.fed[0] <= len(QUESTION) + 3 < len(turn2)


def test_sampled_output_with_a_cached_prefix_equals_a_fresh_one(target: Any, draft: Any) -> None:
    """Same seed, same prompt: the cache changes what is scored, not what is drawn.
    (Exact equality holds here because the tiny model's logits agree to the last
    bits or, where they do not, far from any sampling threshold.)"""
    drafter = DraftModelDrafter(draft, target=target)
    pool = PrefixCache()
    first = generate(
        target, drafter, TURN1, max_new_tokens=8, temperature=0.8, seed=3, prefix_cache=pool
    )
    turn2 = TURN1 + first.token_ids + QUESTION
    args: dict[str, Any] = {"max_new_tokens": 16, "temperature": 0.8, "seed": 11}
    cached = generate(target, drafter, turn2, prefix_cache=pool, **args)
    fresh = generate(target, drafter, turn2, **args)
    assert cached.stats.cached_prompt_tokens > len(TURN1)
    assert cached.token_ids == fresh.token_ids


def test_a_generation_closed_early_still_leaves_its_caches(target: Any) -> None:
    pool = PrefixCache()
    generation = stream(target, None, TURN1, max_new_tokens=30, prefix_cache=pool)
    for i, _ in enumerate(generation):
        if i == 3:
            break
    generation._events.close()  # what dropping a stream does, made deterministic
    assert len(pool) == 1
    assert pool.take(target, [*TURN1, 0]) is not None


def test_a_failed_pass_does_not_return_a_broken_cache(target: Any, counting: Any) -> None:
    class FailsLater(counting):
        def forward_batch(self, caches: Any, tokens: Any, **kwargs: Any) -> Any:
            if len(self.calls) == 2:  # the third pass fails
                raise RuntimeError("out of memory")
            return super().forward_batch(caches, tokens, **kwargs)

    pool = PrefixCache()
    events = speculate(FailsLater(target), None, TURN1, max_new_tokens=10, prefix_cache=pool)
    with pytest.raises(RuntimeError, match="out of memory"):
        for _ in events:
            pass
    assert len(pool) == 0


def test_lean_prompt_pass_logits_with_a_cached_prefix_match_a_fresh_pass(target: Any) -> None:
    """The prompt pass over the uncached rest scores the last position as a pass over
    the whole prompt does, within fp32 rounding."""
    assert target.lean is not None
    prompt = TURN1 + QUESTION
    cache = target.new_cache()
    target.forward(cache, [*TURN1, 9, 9])
    cache.crop(len(TURN1))
    rest = target.forward(cache, QUESTION, num_logits=1)
    whole = target.forward(target.new_cache(), prompt, num_logits=1)
    torch.testing.assert_close(rest, whole, atol=1e-4, rtol=0)
