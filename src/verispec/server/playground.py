"""The playground: a page at ``/`` that shows the drafter and the target at work.

Plain static files shipped in the package (``static/``: no build step, nothing
fetched from the internet). The page talks to the server's own API: it streams
chat or text completions with ``verispec: {"provenance": true, ...}`` and marks
every token by its origin (:mod:`verispec.server.provenance`). It reads its
settings from ``GET /playground/config``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from verispec.server.scheduler import Scheduler

STATIC = Path(__file__).parent / "static"


class PlaygroundConfig(BaseModel):
    """What the playground page needs to know about this server."""

    model: str = Field(description="The model id clients see")
    target: str = Field(description="The target model")
    draft: str | None = Field(description="The draft model, if the server has one")
    drafter: str = Field(
        description="The server's drafter: model, prompt-lookup, hybrid, none, or another's name"
    )
    drafters: list[str] = Field(description="What a request's verispec.drafter may pick")
    num_draft_tokens: int | Literal["auto"] = Field(description="The server's draft length")
    max_tokens: int = Field(description="max_tokens when a request gives none")
    max_tokens_limit: int
    chat: bool = Field(description="The target has a chat template")
    api_key: bool = Field(description="Requests need 'Authorization: Bearer <key>'")


def add_playground(
    app: FastAPI,
    scheduler: Scheduler,
    *,
    model_name: str,
    max_tokens: int,
    max_tokens_limit: int,
    api_key_required: bool,
) -> None:
    """Serve the page at ``/``, its assets under ``/playground/`` and its settings."""
    drafter = scheduler.drafter
    draft_model = drafter.draft_model if drafter is not None else None
    config = PlaygroundConfig(
        model=model_name,
        target=scheduler.target.name,
        draft=None if draft_model is None else draft_model.name,
        drafter=scheduler.default,
        drafters=sorted(scheduler.drafters),
        num_draft_tokens=scheduler.num_draft_tokens if drafter is not None else 0,
        max_tokens=max_tokens,
        max_tokens_limit=max_tokens_limit,
        chat=bool(getattr(scheduler.target.tokenizer, "chat_template", None)),
        api_key=api_key_required,
    )

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/playground/config", response_model=PlaygroundConfig)
    async def playground_config() -> PlaygroundConfig:
        return config

    app.mount("/playground", StaticFiles(directory=STATIC), name="playground")
