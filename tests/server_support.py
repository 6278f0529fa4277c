"""A real verispec server on 127.0.0.1 for tests: uvicorn in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from helpers import byte_tokenizer, tiny_llama

from verispec.drafting import Draft, DraftRequest, StatelessDrafter, drafter_menu

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def chat_tokenizer() -> Any:
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def noisy_copy(model: Any, *, noise: float = 0.01, seed: int = 5) -> Any:
    """A draft that agrees with ``model`` about half the time (ragged acceptance)."""
    draft = tiny_llama(seed=0, tokenizer=model.tokenizer)
    draft.hf.load_state_dict(model.hf.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.hf.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
    draft.name = "tiny-draft"
    return draft


class GateDrafter(StatelessDrafter):
    """Drafts nothing; while its gate is closed it holds the worker inside a pass, so that
    a test can fill the queue deterministically."""

    name = "gate"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()

    def propose(self, request: DraftRequest) -> Draft:
        self.gate.wait(30)
        return Draft(tokens=[])


def gated_scheduler(target: Any, *, max_batch: int, max_queue: int) -> tuple[Any, GateDrafter]:
    """A scheduler whose default drafter is a :class:`GateDrafter` (k = 1); a request may
    also pick plain decoding or prompt lookup (there is no draft model)."""
    from verispec.server.scheduler import Scheduler

    drafter = GateDrafter()
    drafters = {**drafter_menu(target, None), "gate": drafter}
    scheduler = Scheduler(
        target,
        drafters,
        default="gate",
        max_batch=max_batch,
        max_queue=max_queue,
        num_draft_tokens=1,
    )
    return scheduler, drafter


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    app: Any
    scheduler: Any
    server: Any

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


@contextmanager
def serve(app: Any, scheduler: Any) -> Iterator[RunningServer]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", app, scheduler, server)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_until(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def tiny_target() -> Any:
    """The tiny chat-capable target that the server tests share."""
    return tiny_llama(seed=0, tokenizer=chat_tokenizer())


@contextmanager
def tiny_server(target: Any, *, prefix_cache: int = 0) -> Iterator[RunningServer]:
    """A running server on ``target`` with a noisy-copy draft model (every drafter of
    :func:`~verispec.drafting.drafter_menu`, "model" by default; k = 3, 16 default tokens)."""
    from verispec.server.app import create_app
    from verispec.server.scheduler import Scheduler

    scheduler = Scheduler(
        target,
        drafter_menu(target, noisy_copy(target)),
        default="model",
        max_batch=8,
        max_queue=64,
        num_draft_tokens=3,
        prefix_cache=prefix_cache,
    )
    app = create_app(scheduler, model_name="tiny", max_tokens=16, max_tokens_limit=64)
    with serve(app, scheduler) as running:
        yield running
