"""The server under load and abuse: many clients, dropped clients, generated bad input, shutdown."""

from __future__ import annotations

import gc
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from server_support import gated_scheduler, serve, wait_until

from verispec import generate
from verispec.server.app import create_app


def _idle(scheduler) -> bool:
    return scheduler.num_running == 0 and scheduler.num_waiting == 0


def test_32_concurrent_streams_each_equal_their_sequential_output(chat_server, chat_target) -> None:
    prompts = [f"Request {i}: " + "abcdefgh"[: i % 8] * (1 + i % 3) for i in range(32)]
    lengths = [4 + (i * 7) % 21 for i in range(32)]

    def run(i: int) -> tuple[str, str | None]:
        client = openai.OpenAI(
            base_url=chat_server.base_url, api_key="x", max_retries=0, timeout=120
        )
        stream = client.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0, stream=True
        )
        chunks = list(stream)
        return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, range(32)))
    for prompt, n, (text, reason) in zip(prompts, lengths, results, strict=True):
        alone = generate(chat_target, None, prompt, max_new_tokens=n, chat=False)
        assert text == alone.text
        assert reason == ("length" if alone.finish_reason == "length" else "stop")
    assert wait_until(lambda: _idle(chat_server.scheduler))


def test_dropped_streams_free_everything(chat_server) -> None:
    body = {"prompt": "Tell me a long story", "max_tokens": 64, "temperature": 0, "stream": True}
    url = chat_server.base_url + "/completions"
    scheduler = chat_server.scheduler
    process = psutil.Process(os.getpid())

    def drop() -> None:
        with httpx.Client(timeout=30) as client, client.stream("POST", url, json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break  # one chunk, then hang up mid-stream

    rss = []
    for _ in range(6):
        threads = [threading.Thread(target=drop) for _ in range(12)]  # more than max_batch
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert wait_until(lambda: _idle(scheduler), timeout=15), (
            scheduler.num_running,
            scheduler.num_waiting,
        )
        gc.collect()
        rss.append(process.memory_info().rss)
    cancelled = httpx.get(chat_server.url + "/metrics").text
    assert 'verispec_finished_sequences_total{outcome="cancelled"}' in cancelled
    # After a warm-up round, repeated rounds leave no growth beyond allocator noise.
    assert max(rss[2:]) - rss[1] < 32 * 2**20, [r // 2**20 for r in rss]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_get_no_5xx_and_match_the_schema(chat_server, mode) -> None:
    schema = schemathesis.openapi.from_url(chat_server.url + "/openapi.json")
    checks = [
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
        content_type_conformance,
    ]

    @given(case=schema.as_strategy(generation_mode=mode))
    @settings(
        max_examples=40,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def call(case) -> None:
        case.call_and_validate(timeout=60, checks=checks)

    call()
    assert chat_server.scheduler.alive
    assert wait_until(lambda: _idle(chat_server.scheduler))


def test_shutdown_finishes_in_flight_requests(chat_target) -> None:
    scheduler, drafter = gated_scheduler(chat_target, max_batch=2, max_queue=4)
    app = create_app(scheduler, model_name="tiny", max_tokens_limit=200)
    body = {"prompt": "Shut down", "max_tokens": 40, "temperature": 0, "stream": True}
    events: list[str] = []
    drafter.gate.clear()  # the request stays in flight until the server is told to stop
    with serve(app, scheduler) as running:

        def stream() -> None:
            with httpx.stream("POST", running.base_url + "/completions", json=body) as response:
                events.extend(response.iter_lines())

        thread = threading.Thread(target=stream)
        thread.start()
        assert wait_until(lambda: scheduler.num_running == 1)
        running.server.should_exit = True  # what SIGINT / SIGTERM do
        drafter.gate.set()
    thread.join(30)
    assert not thread.is_alive() and not scheduler.alive
    assert "data: [DONE]" in events
