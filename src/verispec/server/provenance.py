"""Where each streamed token came from: the ``verispec`` extension of the SSE chunks.

Origins (the glossary of :mod:`verispec.verify`, seen from the output):

draft
    Proposed by the drafter and accepted by the target.
recovered
    Written by the target in place of the first draft token it rejected.
bonus
    The target's extra token after it accepted the whole draft.
target
    Written by the target in a pass that had no draft (plain decoding).

Example: a pass drafts ``[a, b, c]`` and the target accepts ``a, b`` and
rejects ``c`` in favour of ``x``: the pass emits ``a`` (draft, position 1),
``b`` (draft, 2) and ``x`` (recovered, 3, which replaced ``c``). Had it
accepted all three, the fourth token would be a bonus token at position 4.

Under sampling a draft token ``d`` was kept with probability
``min(1, p_target(d) / p_draft(d))``; both numbers are reported (for a
recovered token: those of the draft token it replaced). A prompt lookup's
proposal is one-hot, so its ``p_draft`` is 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from verispec.drafting import Draft
from verispec.engine import StepEvent
from verispec.generate import Detokenizer, TextEvent
from verispec.sampling import SamplingParams, warp
from verispec.server import schemas as s


def draft_probabilities(
    draft: Draft,
    logits: torch.Tensor,  # [k' + 1, vocab]: the target's pass over [last token, *draft.tokens]
    params: SamplingParams,
    num_decided: int,  # draft tokens verification looked at: the accepted ones + the rejected one
) -> list[tuple[float, float]]:
    """``(p_target, p_draft)`` of the first ``num_decided`` draft tokens, for a sampled pass."""
    if params.greedy or num_decided == 0:
        return []
    tokens = torch.tensor(draft.tokens[:num_decided], dtype=torch.long, device=logits.device)
    rows = torch.arange(num_decided, device=logits.device)
    p_target = warp(logits[:num_decided], params)[rows, tokens]  # [num_decided]
    if draft.probs is None:  # one-hot proposal
        p_draft = torch.ones_like(p_target)
    else:
        p_draft = draft.probs[rows.to(draft.probs.device), tokens.to(draft.probs.device)]
    return list(zip(p_target.tolist(), p_draft.float().tolist(), strict=True))


def token_origins(
    event: StepEvent,
    num_kept: int,  # tokens of the pass that stay (a stop string may cut the pass short)
    *,
    target_pass: int,
    probabilities: Sequence[tuple[float, float]] = (),
    rejected: str | None = None,  # the text of the rejected draft token, if one was rejected
) -> list[s.TokenPiece]:
    """One piece (text still empty) per kept token of a pass, with its origin."""
    drafted, accepted = event.num_drafted, event.num_accepted
    out = []
    for i in range(num_kept):
        origin: s.Origin = "draft"
        decided, replaced = i, None  # the draft token whose probabilities decided this one
        if not event.from_draft[i]:
            if drafted == 0:
                origin, decided = "target", -1
            elif accepted < drafted:
                origin, decided, replaced = "recovered", accepted, rejected
            else:
                origin, decided = "bonus", -1
        p_target, p_draft = (
            probabilities[decided] if 0 <= decided < len(probabilities) else (None, None)
        )
        out.append(
            s.TokenPiece(
                text="",
                index=i,
                origin=origin,
                position=i + 1,
                target_pass=target_pass,
                p_target=p_target,
                p_draft=p_draft,
                rejected=replaced,
            )
        )
    return out


class ProvenanceTracker:
    """One sequence's token origins, cut along the text the stream hands out.

    The detokenizer holds text back (a possible stop string, an incomplete
    character), so a token's text can arrive chunks later than the token, or
    split over two chunks; each piece names its token by ``index``.
    """

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self.origins: list[s.TokenPiece] = []  # per generated token
        self.passes = 0
        self.emitted = 0  # characters of text handed out
        self._next = 0  # first token whose text is not all handed out yet
        self._next_begin = 0  # where that token's text begins

    def record(
        self,
        *,
        event: StepEvent,
        text_event: TextEvent,
        draft: Draft,
        logits: torch.Tensor,  # [k' + 1, vocab]
        params: SamplingParams,
        detok: Detokenizer | None,
    ) -> s.Provenance:
        """The provenance of one pass (after :func:`verispec.generate.to_text_event`)."""
        self.passes += 1
        kept = len(text_event.tokens)
        decided = min(event.num_drafted, event.num_accepted + 1)
        rejected = None
        if event.num_accepted < event.num_drafted and self.tokenizer is not None:
            token = draft.tokens[event.num_accepted]
            rejected = str(self.tokenizer.decode([token]))  # type: ignore[attr-defined]
        origins = token_origins(
            event,
            kept,
            target_pass=self.passes,
            probabilities=draft_probabilities(draft, logits, params, decided),
            rejected=rejected,
        )
        for piece in origins:
            piece.index += len(self.origins)
        self.origins.extend(origins)
        record = s.PassRecord(drafted=event.num_drafted, accepted=event.num_accepted, tokens=kept)
        pieces = self._pieces(text_event.text, detok.ends if detok is not None else [])
        return s.Provenance(pieces=pieces, passes=[record])

    def _pieces(self, text: str, ends: list[int]) -> list[s.TokenPiece]:
        """Split ``text`` (the characters ``[emitted, emitted + len(text))`` of the output)
        by the tokens that wrote them; ``ends[j]``: the output's length up to token j."""
        start, stop = self.emitted, self.emitted + len(text)
        self.emitted = stop
        out: list[s.TokenPiece] = []
        j, begin = self._next, self._next_begin
        while j < len(ends) and begin < stop:
            end = max(ends[j], begin)  # decoded lengths of prefixes need not grow
            lo, hi = max(begin, start), min(end, stop)
            if hi > lo:
                out.append(
                    self.origins[j].model_copy(update={"text": text[lo - start : hi - start]})
                )
            if end > stop:
                break  # the rest of token j comes with a later chunk
            j, begin = j + 1, end
        self._next, self._next_begin = j, begin
        if j == len(ends) and begin < stop and out:  # text past every token (not expected)
            out[-1] = out[-1].model_copy(update={"text": out[-1].text + text[begin - start :]})
        return out
