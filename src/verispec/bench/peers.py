"""Peers as their users run them: Hugging Face transformers ``generate()``.

The peers run the very modules verispec loaded (``model.hf``, same weights and
kernels), on the same chat-templated token ids, with the same EOS ids and
length limit, so that a difference in speed is a difference of decoding
strategy and loop, nothing else.

============ ==========================================================
hf-plain     ``generate()`` greedy (or sampled) decoding
hf-assisted  ``generate(assistant_model=draft.hf)``, transformers' defaults
             for the assistant (20 draft tokens, confidence threshold)
hf-lookup    ``generate(prompt_lookup_num_tokens=k)``
============ ==========================================================

Timing comes from a streamer: ``generate()`` hands it the prompt first, then
the tokens of each target pass, so the time of every ``put`` after the first
is the end of one pass.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from verispec.errors import InvalidArgumentError
from verispec.models import LanguageModel
from verispec.sampling import SamplingParams


@dataclass(frozen=True)
class PeerRun:
    token_ids: list[int]
    time_total: float  # seconds, prompt pass included
    pass_ends: list[float]  # seconds from the start to the end of each target pass
    pass_tokens: list[int]  # tokens each pass emitted
    drafted: int | None = None  # draft tokens proposed, where the engine reports them
    accepted: int | None = None  # of those, accepted by the target


class PeerUnavailableError(InvalidArgumentError):
    """A peer engine that is not installed, cannot be built or cannot run here.

    The message is one line and names the command that installs it; the bench
    prints it, skips that peer and goes on with the others.
    """


@runtime_checkable
class ExternalPeer(Protocol):
    """Another inference engine run on the bench's prompts (llama.cpp, OpenVINO GenAI).

    It is opened once per bench run by its module's ``open_peer`` and given the
    same chat-templated token ids, EOS ids and length limit as verispec. Peers
    decode greedily.
    """

    engine: str  # "llama.cpp", "OpenVINO GenAI"
    precision: str  # the target's weights as this engine ran them, e.g. "Q4_K_M (bundled GGUF)"
    draft_precision: str | None  # the draft's, for its speculative mode
    build: str  # one line: how the engine was built or installed, and its speculative settings

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        speculative: bool,
        eos_token_ids: Collection[int],
    ) -> PeerRun:
        """Greedy decoding of ``prompt_ids``; ``speculative`` uses the engine's own drafting."""
        ...

    def close(self) -> None:
        """Stop any process or free any memory the peer holds (safe to call twice)."""
        ...


class _PassTimer:
    """A transformers streamer that timestamps each target pass."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.prompt_seen = False
        self.ends: list[float] = []
        self.tokens: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first put is the prompt itself
            self.prompt_seen = True
            return
        self.ends.append(time.perf_counter() - self.start)
        self.tokens.append(int(value.numel()))

    def end(self) -> None:
        pass


def hf_module(model: LanguageModel, role: str) -> Any:
    hf = getattr(model, "hf", None)
    if hf is None:
        raise InvalidArgumentError(
            f"the transformers peers need a transformers model; the {role} {model.name} is not one"
        )
    return hf


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' advice about generation flags while peers run."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def hf_generate(
    target: LanguageModel,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    params: SamplingParams,
    assistant: LanguageModel | None = None,
    prompt_lookup_num_tokens: int | None = None,
) -> PeerRun:
    """One ``generate()`` call on the target's transformers module, timed per pass."""
    hf = hf_module(target, "target")
    device = getattr(target, "device", "cpu")
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, n]
    eos = sorted(target.eos_token_ids)
    kwargs: dict[str, Any] = {
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": 0,
        "eos_token_id": eos or None,
        "pad_token_id": eos[0] if eos else 0,
    }
    if params.greedy:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        kwargs.update(
            do_sample=True,
            temperature=params.temperature,
            top_k=params.top_k or None,
            top_p=params.top_p,
        )
        torch.manual_seed(params.seed if params.seed is not None else 0)
    if assistant is not None:
        kwargs["assistant_model"] = hf_module(assistant, "draft")
    if prompt_lookup_num_tokens is not None:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
    start = time.perf_counter()
    timer = _PassTimer(start)
    with torch.inference_mode(), quiet_transformers():
        out = hf.generate(ids, streamer=timer, **kwargs)  # [1, n + new]
    total = time.perf_counter() - start
    return PeerRun(
        token_ids=[int(t) for t in out[0, len(prompt_ids) :].tolist()],
        time_total=total,
        pass_ends=timer.ends,
        pass_tokens=timer.tokens,
    )
