"""Text layer: stop strings (also inside accepted runs), streaming, chat prompts."""

from __future__ import annotations

import pytest
from helpers import byte_tokenizer, tiny_llama

from verispec.drafting import DraftModelDrafter
from verispec.errors import InvalidArgumentError
from verispec.generate import generate, stream


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0, tokenizer=byte_tokenizer())


def _reference(model, prompt: str, n: int = 40) -> str:
    return generate(model, None, prompt, max_new_tokens=n, chat=False).text


@pytest.mark.parametrize("drafter_kind", ["none", "perfect"])
@pytest.mark.parametrize("where", [5, 12, 20])
def test_stop_string_cuts_text_exactly(model, drafter_kind: str, where: int) -> None:
    full = _reference(model, "hello")
    stop = full[where : where + 3]
    cut = full.find(stop)
    drafter = DraftModelDrafter(model, target=model) if drafter_kind == "perfect" else None
    result = generate(
        model, drafter, "hello", max_new_tokens=40, chat=False, stop=[stop], num_draft_tokens=8
    )
    assert result.text == full[:cut]
    assert result.finish_reason == "stop"
    # Token ids end with the token that completed the stop string.
    decoded = model.tokenizer.decode(result.token_ids)
    assert decoded.endswith(stop) or stop in decoded
    assert stop not in model.tokenizer.decode(result.token_ids[:-1])
    assert result.stats.new_tokens == len(result.token_ids)


def test_streamed_text_concatenates_to_the_result(model) -> None:
    full = _reference(model, "abc")
    stop = full[15:18]
    gen = stream(
        model,
        DraftModelDrafter(model, target=model),
        "abc",
        max_new_tokens=40,
        chat=False,
        stop=[stop],
    )
    pieces = [event.text for event in gen]
    assert "".join(pieces) == gen.text == full[: full.find(stop)]


def test_earliest_of_several_stop_strings_wins(model) -> None:
    full = _reference(model, "xyz")
    late, early = full[20:23], full[8:10]
    result = generate(model, None, "xyz", max_new_tokens=40, chat=False, stop=[late, early])
    assert result.text == full[: min(full.find(late), full.find(early))]


def test_no_stop_string_gives_length_and_full_text(model) -> None:
    result = generate(model, None, "hello", max_new_tokens=17, chat=False, stop=["\x00\x01never"])
    assert result.finish_reason == "length" and len(result.token_ids) == 17


def test_chat_requires_a_template(model) -> None:
    with pytest.raises(InvalidArgumentError, match="chat template"):
        generate(model, None, "hi", chat=True)
    with pytest.raises(InvalidArgumentError, match="empty"):
        generate(model, None, "   ", chat=False)
