"""Request and response bodies of the OpenAI-compatible API (they make ``/openapi.json``).

Requests are strict: a field of the wrong type, a value out of range or an
unknown field is a 400 in OpenAI's error shape. OpenAI fields that verispec
does not implement are accepted only at their neutral value (a
``frequency_penalty`` of 0, ``logprobs`` off, ...), so that clients that always
send them keep working while nothing is silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4
SEED_MAX = 2**63 - 1


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
    "logit_bias": ({},),
}


class VerispecOptions(BaseModel):
    """Extension: per-request speculation settings (ordinary clients leave it out)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    drafter: Literal["model", "prompt-lookup", "hybrid", "none"] | None = Field(
        None,
        description="Where draft tokens come from for this request: the server's draft model, "
        "prompt lookup (n-gram), hybrid (per pass, prompt lookup or the draft model, whichever "
        "its acceptance rates predict to be faster; only where the server has a draft model, as "
        "model), or none (plain decoding). Default: the server's drafter.",
    )
    num_draft_tokens: int | None = Field(
        None, ge=0, le=64, description="Fixed draft length; default: the server's policy."
    )
    provenance: bool = Field(
        False,
        description="Stream each token's origin in a `verispec` field of the chunks "
        "(needs stream: true).",
    )


class _GenerationFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="Accepted for compatibility; one model is served.")
    max_tokens: int | None = Field(None, ge=1, description="Default: the server's --max-tokens.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="Extension: keep the k most likely tokens; 0 = off.")
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    verispec: VerispecOptions | None = Field(None, description="Extension: speculation.")
    # OpenAI fields accepted at their neutral value only.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator(
        "frequency_penalty",
        "presence_penalty",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        check_fields=False,
    )
    @classmethod
    def _neutral(cls, value: Any, info: Any) -> Any:
        if value is not None and value not in _NEUTRAL[info.field_name]:
            raise ValueError(f"{info.field_name} is not supported by verispec (leave it unset)")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_GenerationFields):
    prompt: (
        str
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1, max_length=1)]
    ) = Field(description="Text, or token ids; a list of strings must hold exactly one.")
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("echo", "best_of", "suffix")
    @classmethod
    def _neutral_completion(cls, value: Any, info: Any) -> Any:
        if value is not None and value not in _NEUTRAL[info.field_name]:
            raise ValueError(f"{info.field_name} is not supported by verispec (leave it unset)")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens.")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(
        description="Prompt tokens reused from an earlier request's cache (not scored again)"
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class Speculation(BaseModel):
    """Extension: this request's speculative decoding statistics."""

    drafted: int = Field(description="Draft tokens proposed")
    accepted: int = Field(description="Draft tokens the target accepted")
    free_drafted: int = Field(
        description="Of the drafted tokens, those proposed by prompt lookup (free); the rest "
        "came from the draft model (both happen with the hybrid drafter)",
    )
    acceptance_rate: float = Field(description="accepted / drafted (0 when nothing was drafted)")
    mean_accepted_length: float = Field(description="Tokens generated per target pass")
    target_passes: int


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    speculation: Speculation | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    speculation: Speculation


Origin = Literal["draft", "recovered", "bonus", "target"]


class TokenPiece(BaseModel):
    """Extension: the text one token wrote, and where the token came from."""

    text: str
    index: int = Field(
        description="The token's place in the completion, from 0 (a token's text may be split "
        "over two chunks; tokens that write no text have no piece)"
    )
    origin: Origin = Field(
        description="draft: proposed by the drafter and accepted; recovered: written by the "
        "target in place of the draft token it rejected; bonus: the target's extra token after "
        "a fully accepted draft; target: written by the target in a pass without a draft"
    )
    position: int = Field(
        description="Place in its target pass, from 1: accepted draft tokens 1..n, then the "
        "recovered (n + 1) or bonus (k + 1) token"
    )
    target_pass: int = Field(description="The target pass that wrote it, from 1")
    p_target: float | None = Field(
        None,
        description="Sampled drafts only: the target's probability of the draft token (for a "
        "recovered token: of the rejected one); kept with probability min(1, p_target / p_draft)",
    )
    p_draft: float | None = Field(
        None, description="The drafter's probability of that draft token (1 for prompt lookup)"
    )
    rejected: str | None = Field(
        None, description="Recovered tokens: the text of the draft token the target rejected"
    )


class PassRecord(BaseModel):
    drafted: int = Field(description="Draft tokens the target pass checked")
    accepted: int = Field(description="Of those, accepted")
    tokens: int = Field(description="Tokens the pass added to the completion")


class Provenance(BaseModel):
    """Extension (``verispec: {"provenance": true}`` in a streamed request): the ``verispec``
    field of a chunk. Ordinary clients ignore it."""

    pieces: list[TokenPiece] = Field(description="The chunk's text, token by token")
    passes: list[PassRecord] = Field(
        description="Target passes since the previous chunk (a pass whose text is held back, "
        "e.g. by a possible stop string, is reported with the next chunk)"
    )


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (``data: {...}``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    speculation: Speculation | None = None
    verispec: Provenance | None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (``data: {...}``)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    speculation: Speculation | None = None
    verispec: Provenance | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "verispec"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    running: int = Field(description="Sequences in the running batch")
    waiting: int = Field(description="Requests waiting for a batch slot")
