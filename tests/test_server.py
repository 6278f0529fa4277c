"""The OpenAI-compatible server, driven by the official ``openai`` client over real HTTP."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from server_support import gated_scheduler, noisy_copy, serve, tiny_server, wait_until

from verispec import generate
from verispec.server.app import create_app

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def client(chat_server):
    return openai.OpenAI(base_url=chat_server.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def guarded(chat_target):
    """One sequence at a time, one waiting, an API key."""
    scheduler, drafter = gated_scheduler(chat_target, max_batch=1, max_queue=1)
    app = create_app(scheduler, model_name="tiny", api_key="sesame", max_tokens_limit=200)
    with serve(app, scheduler) as running:
        running.gate = drafter.gate
        yield running


def _sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def test_models_and_health(chat_server, client) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]
    health = httpx.get(chat_server.url + "/health").json()
    assert health["status"] == "ok" and health["running"] >= 0


def test_completion_equals_the_library_and_reports_usage(chat_server, client, chat_target) -> None:
    response = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    alone = generate(chat_target, None, PROMPT, max_new_tokens=20, chat=False)
    choice = response.choices[0]
    assert choice.text == alone.text
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(alone.prompt_ids)
    assert response.usage.completion_tokens == 20
    assert response.usage.total_tokens == len(alone.prompt_ids) + 20
    spec = response.model_extra["speculation"]
    assert spec["drafted"] > 0 and 0 <= spec["accepted"] <= spec["drafted"]
    assert spec["mean_accepted_length"] >= 1.0 and spec["target_passes"] >= 1


def test_streamed_completion_matches_and_ends_with_done(chat_server, client) -> None:
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", chat_server.base_url + "/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(response)
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] == "length"
    assert "speculation" in last


def test_chat_streaming_and_not(chat_server, client, chat_target) -> None:
    whole = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=0
    )
    alone = generate(chat_target, None, MESSAGES, max_new_tokens=12)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == alone.text
    assert whole.usage.prompt_tokens == len(alone.prompt_ids)
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == alone.text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []


def test_a_chats_next_turn_reuses_the_cached_conversation(chat_target) -> None:
    """With --prefix-cache, the second turn's prompt pass skips what the first turn's caches
    hold (reported as usage.prompt_tokens_details.cached_tokens) and decodes the same."""
    with tiny_server(chat_target, prefix_cache=2) as running:
        chat = openai.OpenAI(base_url=running.base_url, api_key="x", max_retries=0)
        first = chat.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=12, temperature=0
        )
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        turn2 = [
            *MESSAGES,
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "Again."},
        ]
        second = chat.chat.completions.create(
            model="tiny", messages=turn2, max_tokens=12, temperature=0
        )
        assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
        assert (
            second.choices[0].message.content
            == generate(chat_target, None, turn2, max_new_tokens=12).text
        )
        assert len(running.scheduler.prefix) == 1  # turn 2 took turn 1's entry, left its own


def test_stop_strings(chat_server, client, chat_target) -> None:
    alone = generate(chat_target, None, PROMPT, max_new_tokens=30, chat=False).text
    start = next(i for i in range(4, 25) if alone[i : i + 2].isascii())
    stop = alone[start : start + 2]
    for stream in (False, True):
        response = client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=30,
            temperature=0,
            stop=[stop, "\x00\x01"],
            stream=stream,
        )
        chunks = list(response) if stream else [response]
        text = "".join(c.choices[0].text for c in chunks)
        assert text == alone[: alone.find(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client) -> None:
    def sample(seed: int) -> str:
        response = client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=24,
            temperature=1.0,
            top_p=0.95,
            seed=seed,
            extra_body={"top_k": 100},
        )
        return response.choices[0].text

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": PROMPT, "temperature": "hot"}, "temperature"),
        ({"prompt": PROMPT, "temperature": 3.0}, "temperature"),
        ({"prompt": PROMPT, "top_p": 0}, "top_p"),
        ({"prompt": PROMPT, "top_k": -1}, "top_k"),
        ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"prompt": PROMPT, "max_tokens": 65}, "max_tokens"),
        ({"prompt": PROMPT, "n": 2}, "n"),
        ({"prompt": PROMPT, "seed": -1}, "seed"),
        ({"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": PROMPT, "stream": "yes"}, "stream"),
        ({"prompt": PROMPT, "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"prompt": PROMPT, "mystery": 1}, "mystery"),
        ({"prompt": "x" * 300}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": [1, 2, 999]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"max_tokens": 4}, "prompt"),
    ],
)
def test_bad_completion_requests_are_400_in_openai_shape(chat_server, body, param) -> None:
    response = httpx.post(chat_server.base_url + "/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["param"] or "").startswith(param), error


def test_limits_are_named(chat_server) -> None:
    too_many = httpx.post(
        chat_server.base_url + "/completions", json={"prompt": PROMPT, "max_tokens": 999}
    )
    assert "64" in too_many.json()["error"]["message"]  # the server limit
    too_long = httpx.post(chat_server.base_url + "/completions", json={"prompt": "x" * 300}).json()
    assert too_long["error"]["code"] == "context_length_exceeded"
    assert "256" in too_long["error"]["message"]  # the context window


def test_malformed_and_misrouted_requests(chat_server, client) -> None:
    url = chat_server.base_url + "/chat/completions"
    headers = {"content-type": "application/json"}
    for raw in (b"{not json", b"", b"[]", b"null", b'{"messages": []}', b'{"messages": [{}]}'):
        response = httpx.post(url, content=raw, headers=headers)
        assert response.status_code == 400, (raw, response.text)
        assert "error" in response.json()
    assert httpx.get(url).status_code == 405
    assert httpx.get(chat_server.url + "/nowhere").json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "wizard", "content": "hi"}], max_tokens=4
        )
    assert httpx.get(chat_server.url + "/health").json()["status"] == "ok"  # nothing crashed


def test_api_key(guarded) -> None:
    for key in ("wrong", None):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        response = httpx.get(guarded.base_url + "/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.base_url, api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=guarded.base_url, api_key="sesame", max_retries=0)
    assert ok.models.list().data[0].id == "tiny"
    assert httpx.get(guarded.url + "/health").status_code == 200  # health needs no key


def test_full_queue_is_429_with_retry_after(guarded) -> None:
    headers = {"authorization": "Bearer sesame"}
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    url = guarded.base_url + "/completions"
    scheduler = guarded.scheduler

    def hold() -> None:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
            for _ in response.iter_lines():
                pass

    threads = [threading.Thread(target=hold) for _ in range(2)]
    guarded.gate.clear()  # the first request's first pass waits at the gate
    try:
        threads[0].start()
        assert wait_until(lambda: scheduler.num_running == 1)
        threads[1].start()
        assert wait_until(lambda: scheduler.num_waiting == 1)
        response = httpx.post(url, json=body, headers=headers)
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(
                base_url=guarded.base_url, api_key="sesame", max_retries=0
            ).completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
    finally:
        guarded.gate.set()
    for thread in threads:
        thread.join(60)
    assert wait_until(lambda: scheduler.num_running == 0 and scheduler.num_waiting == 0)


def test_metrics_and_openapi(chat_server, client) -> None:
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    text = httpx.get(chat_server.url + "/metrics").text
    for name in (
        "verispec_requests_total",
        "verispec_generation_tokens_total",
        "verispec_target_passes_total",
        "verispec_drafted_tokens_total",
        "verispec_accepted_tokens_total",
        'verispec_accepted_by_position_total{position="1"}',
        "verispec_queue_depth",
        "verispec_request_latency_seconds_bucket",
        "verispec_time_to_first_token_seconds_bucket",
    ):
        assert name in text, name
    spec = httpx.get(chat_server.url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(
        spec["paths"]
    )
    post = spec["paths"]["/v1/completions"]["post"]
    assert {"200", "400", "429"} <= set(post["responses"])
    assert "text/event-stream" in post["responses"]["200"]["content"]


def _counter(url: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", httpx.get(url + "/metrics").text, re.MULTILINE)
    assert match is not None, name
    return float(match.group(1))


# Prompts that repeat themselves (prompt lookup finds continuations) and one that does not.
HYBRID_PROMPTS = [PROMPT, "abc abc abc abc ab", "x = [1, 2]; y = [1, 2]; z = [1,", "Hello"]


def test_hybrid_requests_equal_plain_decoding(chat_server, client, chat_target) -> None:
    """A request picks the hybrid drafter (the server has a draft model): greedy output
    equals plain decoding alone and side by side, and its drafts are counted."""

    def ask(prompt: str) -> openai.types.Completion:
        return client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=20,
            temperature=0,
            extra_body={"verispec": {"drafter": "hybrid"}},
        )

    drafted_before = _counter(chat_server.url, "verispec_drafted_tokens_total")
    free_before = _counter(chat_server.url, "verispec_free_drafted_tokens_total")
    one = ask(PROMPT)
    assert (
        one.choices[0].text
        == generate(chat_target, None, PROMPT, max_new_tokens=20, chat=False).text
    )
    spec = one.model_extra["speculation"]
    assert spec["drafted"] > 0 and 0 <= spec["free_drafted"] <= spec["drafted"]
    assert (
        _counter(chat_server.url, "verispec_drafted_tokens_total") - drafted_before
        == spec["drafted"]
    )
    free = _counter(chat_server.url, "verispec_free_drafted_tokens_total") - free_before
    assert free == spec["free_drafted"]
    with ThreadPoolExecutor(len(HYBRID_PROMPTS)) as pool:  # batched side by side
        together = list(pool.map(ask, HYBRID_PROMPTS))
    for prompt, response in zip(HYBRID_PROMPTS, together, strict=True):
        alone = generate(chat_target, None, prompt, max_new_tokens=20, chat=False)
        assert response.choices[0].text == alone.text
    specs = [r.model_extra["speculation"] for r in together]
    # Both sources drafted: prompt lookups (free) and the draft model.
    assert sum(s["drafted"] for s in specs) > sum(s["free_drafted"] for s in specs) > 0


def test_hybrid_needs_a_draft_model(guarded) -> None:
    response = httpx.post(
        guarded.base_url + "/completions",
        headers={"authorization": "Bearer sesame"},
        json={"prompt": PROMPT, "max_tokens": 4, "verispec": {"drafter": "hybrid"}},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "verispec.drafter"
    assert "no 'hybrid' drafter" in error["message"]
    assert "available: none, prompt-lookup" in error["message"]
    ok = openai.OpenAI(base_url=guarded.base_url, api_key="sesame", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="hybrid"):
        ok.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=4,
            extra_body={"verispec": {"drafter": "hybrid"}},
        )


def test_serve_refuses_a_negative_prefix_cache() -> None:
    from verispec.cli import main as cli
    from verispec.errors import InvalidArgumentError
    from verispec.server import command

    args = cli.build_parser().parse_args(["serve", "--prefix-cache", "-1"])
    with pytest.raises(InvalidArgumentError, match="--prefix-cache must be >= 0"):
        command.run(args)


def test_serve_command_with_the_hybrid_drafter(chat_target, monkeypatch, tmp_path) -> None:
    """`verispec serve --drafter hybrid -k auto` on tiny models: every drafter on the menu
    (the hybrid one the default, its draft model shared with the "model" drafter), the
    per-machine cost model measured into --cache-dir, and greedy output equal to plain
    decoding, with the policy's draft length and with a fixed one."""
    import uvicorn

    from verispec import models
    from verispec.cli.main import build_parser
    from verispec.drafting import DraftModelDrafter, HybridDrafter, PromptLookupDrafter
    from verispec.policy.costs import CostModel
    from verispec.server import command

    draft = noisy_copy(chat_target)
    loaded: dict = {}

    def load_model(name, **kw):
        loaded[name] = kw
        return {"T": chat_target, "D": draft}[name]

    monkeypatch.setattr(models, "load_model", load_model)
    built: dict = {}

    def build_scheduler(*args, **kwargs):
        built["scheduler"] = scheduler = build(*args, **kwargs)
        return scheduler

    build = command.build_scheduler
    monkeypatch.setattr(command, "build_scheduler", build_scheduler)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: built.update(app=app))
    # Nothing may land in the user's cache: --cache-dir names a fresh folder, and the
    # default one (VERISPEC_CACHE) another that must stay empty.
    cache_dir, default_cache = tmp_path / "cache", tmp_path / "default-cache"
    monkeypatch.setenv("VERISPEC_CACHE", str(default_cache))
    argv = ["serve", "--target", "T", "--draft", "D", "--drafter", "hybrid", "-k", "auto"]
    args = build_parser().parse_args(
        [*argv, "--ngram", "4", "--max-batch", "2", "--cache-dir", str(cache_dir)]
    )
    assert command.run(args) == 0
    # The server leaves --draft-compile to its default (auto), as generate does.
    assert loaded["D"]["compile_steps"] == "auto"
    assert loaded["T"]["cache_dir"] == loaded["D"]["cache_dir"] == str(cache_dir)
    scheduler = built["scheduler"]
    assert scheduler.prefix is not None and scheduler.prefix.max_sequences == 4  # the default
    assert scheduler.max_batch == 2
    # Every drafter a request may pick; the one asked for is the default.
    assert list(scheduler.drafters) == ["none", "prompt-lookup", "model", "hybrid"]
    assert scheduler.drafters["none"] is None
    assert scheduler.default == "hybrid" and scheduler.drafter is scheduler.drafters["hybrid"]
    hybrid, model = scheduler.drafters["hybrid"], scheduler.drafters["model"]
    assert isinstance(hybrid, HybridDrafter) and hybrid.lookup.max_ngram == 4
    lookup = scheduler.drafters["prompt-lookup"]
    assert isinstance(lookup, PromptLookupDrafter) and lookup.max_ngram == 4
    assert isinstance(model, DraftModelDrafter) and model.model is draft
    assert hybrid.model_drafter is model and hybrid.draft_model is draft  # one draft model
    # -k auto: the per-machine cost model, measured once into --cache-dir.
    assert scheduler.num_draft_tokens == "auto"
    assert isinstance(scheduler.costs, CostModel) and scheduler.costs.max_k >= 1
    assert scheduler.costs.c_verify[0] == 1.0 and scheduler.costs.c_draft > 0
    assert len(list((cache_dir / "costs").glob("*.json"))) == 1
    assert not default_cache.exists()
    with serve(built["app"], scheduler) as running:
        config = httpx.get(running.url + "/playground/config").json()
        assert config["drafter"] == "hybrid" and config["num_draft_tokens"] == "auto"
        assert config["drafters"] == sorted(["none", "prompt-lookup", "model", "hybrid"])
        assert config["draft"] == draft.name
        client = openai.OpenAI(base_url=running.base_url, api_key="x", max_retries=0)

        def ask(prompt: str, k: int | None = None) -> openai.types.Completion:
            return client.completions.create(
                model="T",
                prompt=prompt,
                max_tokens=16,
                temperature=0,
                extra_body={"verispec": {"num_draft_tokens": k}},
            )

        with ThreadPoolExecutor(3) as pool:
            auto = list(pool.map(ask, HYBRID_PROMPTS[:3]))
            fixed = list(pool.map(ask, HYBRID_PROMPTS[:3], [3] * 3))
    for prompt, a, f in zip(HYBRID_PROMPTS, auto, fixed, strict=False):
        alone = generate(chat_target, None, prompt, max_new_tokens=16, chat=False).text
        assert a.choices[0].text == alone and f.choices[0].text == alone
        assert f.model_extra["speculation"]["drafted"] > 0


def test_serve_without_speculation_offers_no_drafter(chat_target, monkeypatch) -> None:
    """`verispec serve -k 0`: plain decoding only; a request that names a drafter gets a
    400 that says which drafters this server has."""
    import uvicorn
    from fastapi.testclient import TestClient

    from verispec import models
    from verispec.cli.main import build_parser
    from verispec.server import command

    monkeypatch.setattr(models, "load_model", lambda *a, **kw: chat_target)
    built = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: built.update(app=app))
    args = build_parser().parse_args(["serve", "--drafter", "prompt-lookup", "-k", "0"])
    assert command.run(args) == 0
    with TestClient(built["app"]) as client:
        body = {"model": "m", "prompt": "hello", "max_tokens": 4, "temperature": 0}
        assert client.post("/v1/completions", json=body).status_code == 200
        picked = {**body, "verispec": {"drafter": "prompt-lookup"}}
        reply = client.post("/v1/completions", json=picked)
        assert reply.status_code == 400
        assert "available: none" in reply.json()["error"]["message"]
