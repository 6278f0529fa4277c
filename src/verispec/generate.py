"""Text in, text out: prompt formatting, incremental detokenization, stop strings.

:func:`stream` yields a :class:`TextEvent` per target pass; :func:`generate`
collects them into a :class:`GenerationResult`. Both sit on
:func:`verispec.engine.speculate`, which works on token ids only.

Stop strings are exact: text never runs past them, even when the stop string
ends inside a run of accepted draft tokens. The returned text ends just before
the stop string (as OpenAI's API does); the returned token ids end with the
token that completed it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from verispec.drafting import Drafter
from verispec.engine import DraftLength, StepEvent, check_generation_args, speculate
from verispec.errors import InvalidArgumentError
from verispec.models import LanguageModel
from verispec.models.presets import default_cache_dir
from verispec.policy.costs import CostModel, costs_for
from verispec.prefix import PrefixCache
from verispec.sampling import SamplingParams
from verispec.stats import GenerationStats


@dataclass(frozen=True)
class TextEvent:
    """One target pass, as text."""

    text: str  # new text that is final (never retracted)
    pieces: list[tuple[str, bool]]  # the same text split by origin: (text, from_draft)
    tokens: list[int]  # new token ids of this pass
    from_draft: list[bool]  # per token: drafted and accepted
    num_drafted: int
    num_accepted: int
    finish_reason: str | None  # "eos", "length", "stop" or None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids (prompt excluded)
    prompt_ids: list[int]
    finish_reason: str
    stats: GenerationStats


def encode_prompt(
    tokenizer: object, prompt: str | list[dict[str, str]], *, chat: bool | None = None
) -> list[int]:
    """Token ids for ``prompt``.

    ``chat=None`` applies the tokenizer's chat template when it has one (instruct
    models); a list of ``{"role", "content"}`` messages always needs one.
    """
    if tokenizer is None:
        raise InvalidArgumentError("this model has no tokenizer; pass token ids instead of text")
    if isinstance(prompt, str) and not prompt.strip():
        raise InvalidArgumentError("the prompt is empty")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        chat = has_template
    if isinstance(prompt, list) or chat:
        if not has_template:
            raise InvalidArgumentError(
                "--chat needs a model with a chat template; this one has none"
            )
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer.encode(prompt)]  # type: ignore[attr-defined]


class Detokenizer:
    """Turns a growing list of token ids into final text, holding back what a
    stop string or an incomplete UTF-8 character might still change."""

    def __init__(self, tokenizer: object, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.from_draft: list[bool] = []  # per id
        self.ends: list[int] = []  # per id: length of the decoded text up to and including it
        self.emitted = 0  # characters of text already handed out

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))  # type: ignore[attr-defined]

    def pieces(self, start: int, end: int) -> list[tuple[str, bool]]:
        """Split the final text ``[start, end)`` by the origin of the tokens that wrote it."""
        out: list[tuple[str, bool]] = []
        text = self._decode(self.ids)
        begin = 0
        for token_end, drafted in zip(self.ends, self.from_draft, strict=False):
            lo, hi = max(begin, start), min(token_end, end)
            if hi > lo:
                if out and out[-1][1] == drafted:
                    out[-1] = (out[-1][0] + text[lo:hi], drafted)
                else:
                    out.append((text[lo:hi], drafted))
            begin = max(begin, token_end)
        return out

    def feed(
        self, tokens: list[int], from_draft: list[bool], *, final: bool
    ) -> tuple[str, bool, int]:
        """Add tokens; return (new final text, stop string hit, tokens to keep of this batch)."""
        start = len(self.ids)
        for token in tokens:
            self.ids.append(token)
            self.ends.append(len(self._decode(self.ids)))
        self.from_draft.extend(from_draft)
        text = self._decode(self.ids)
        search_from = max(0, self.emitted - self.holdback)
        hits = [(text.find(s, search_from), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            cut, s = min(hits)
            # Keep the tokens up to the one that completes the earliest stop string.
            done = next(
                (j for j in range(start, len(self.ids)) if self.ends[j] >= cut + len(s)),
                len(self.ids) - 1,
            )
            keep = done + 1 - start
            del self.ids[start + keep :], self.ends[start + keep :], self.from_draft[start + keep :]
            out = text[self.emitted : cut]
            self.emitted = cut
            return out, True, keep
        end = len(text)
        if not final:
            end -= self.holdback
            while end > self.emitted and text[end - 1] == "\ufffd":  # incomplete character
                end -= 1
        end = max(end, self.emitted)
        out = text[self.emitted : end]
        self.emitted = end
        return out, False, len(tokens)


def to_text_event(detok: Detokenizer | None, event: StepEvent, stats: GenerationStats) -> TextEvent:
    """One engine event as text. A stop string ends the sequence (``finish_reason="stop"``):
    the tokens after the one that completed it are dropped, also from ``stats``."""
    tokens, finish = event.tokens, event.finish_reason
    text, pieces = "", []
    if detok is not None:
        before = detok.emitted
        text, hit, keep = detok.feed(tokens, event.from_draft, final=finish is not None)
        pieces = detok.pieces(before, detok.emitted)
        if hit:
            stats.new_tokens -= len(tokens) - keep
            tokens, finish = tokens[:keep], "stop"
    return TextEvent(
        text=text,
        pieces=pieces,
        tokens=tokens,
        from_draft=event.from_draft[: len(tokens)],
        num_drafted=event.num_drafted,
        num_accepted=event.num_accepted,
        finish_reason=finish,
    )


class Generation:
    """A running generation: iterate it for :class:`TextEvent` s; its fields
    (``text``, ``token_ids``, ``finish_reason``, ``stats``) grow as it runs."""

    def __init__(
        self,
        target: LanguageModel,
        drafter: Drafter | None,
        prompt_ids: list[int],
        *,
        params: SamplingParams,
        max_new_tokens: int,
        stop: Sequence[str],
        num_draft_tokens: DraftLength,
        costs: CostModel | None,
        prefix_cache: PrefixCache | None = None,
        siblings: bool = True,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self._detok = Detokenizer(target.tokenizer, stop) if target.tokenizer is not None else None
        self._events = speculate(
            target,
            drafter,
            prompt_ids,
            params=params,
            max_new_tokens=max_new_tokens,
            num_draft_tokens=num_draft_tokens,
            costs=costs,
            prefix_cache=prefix_cache,
            siblings=siblings,
        )

    def __iter__(self) -> Iterator[TextEvent]:
        for event, seq in self._events:
            self.stats = seq.stats
            text_event = to_text_event(self._detok, event, self.stats)
            self.text += text_event.text
            self.token_ids.extend(text_event.tokens)
            self.finish_reason = text_event.finish_reason
            yield text_event
            if text_event.finish_reason is not None:
                self._events.close()
                return

    def result(self) -> GenerationResult:
        """Run to completion (if not done yet) and return everything."""
        for _ in self:
            pass
        return GenerationResult(
            text=self.text,
            token_ids=list(self.token_ids),
            prompt_ids=list(self.prompt_ids),
            finish_reason=self.finish_reason or "length",
            stats=self.stats,
        )


def stream(
    target: LanguageModel,
    drafter: Drafter | None,
    prompt: str | list[dict[str, str]] | list[int],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    chat: bool | None = None,
    num_draft_tokens: DraftLength = 4,
    costs: CostModel | None = None,
    prefix_cache: PrefixCache | None = None,
    siblings: bool = True,
) -> Generation:
    """Start a generation; iterate the result for one :class:`TextEvent` per target pass.

    ``prompt`` is text, chat messages (``[{"role": ..., "content": ...}]``) or
    token ids (used as they are). ``drafter=None`` is plain decoding through the
    same loop. Arguments are validated here, before any model work.
    ``prefix_cache`` (:class:`verispec.PrefixCache`) lets the prompt pass reuse
    what an earlier generation through it already scored (a chat's earlier turns).
    ``siblings=False`` keeps the adaptive policy's drafts to chains (no token-tree
    siblings; see :func:`verispec.engine.speculate`).
    """
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    check_generation_args(max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens)
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        prompt_ids = [int(t) for t in prompt]  # type: ignore[arg-type]
    else:
        prompt_ids = encode_prompt(target.tokenizer, prompt, chat=chat)  # type: ignore[arg-type]
    if num_draft_tokens == "auto" and costs is None and drafter is not None:
        costs = costs_for(target, drafter.draft_model, cache_dir=default_cache_dir())
    return Generation(
        target,
        drafter,
        prompt_ids,
        params=params,
        max_new_tokens=max_new_tokens,
        stop=stop,
        num_draft_tokens=num_draft_tokens,
        costs=costs,
        prefix_cache=prefix_cache,
        siblings=siblings,
    )


def generate(
    target: LanguageModel,
    drafter: Drafter | None,
    prompt: str | list[dict[str, str]] | list[int],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    chat: bool | None = None,
    num_draft_tokens: DraftLength = 4,
    costs: CostModel | None = None,
    prefix_cache: PrefixCache | None = None,
    siblings: bool = True,
) -> GenerationResult:
    """Generate to completion: text, token ids and statistics. Arguments as :func:`stream`."""
    return stream(
        target,
        drafter,
        prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=stop,
        chat=chat,
        num_draft_tokens=num_draft_tokens,
        costs=costs,
        prefix_cache=prefix_cache,
        siblings=siblings,
    ).result()
