"""The playground page at ``/``, driven in a real browser (Playwright + Debian's Chromium),
and the provenance extension of the stream it reads."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from server_support import noisy_copy, serve, wait_until

from verispec import generate
from verispec.drafting import Draft, DraftRequest, StatelessDrafter, drafter_menu
from verispec.server.app import create_app
from verispec.server.scheduler import Scheduler

CHROMIUM = os.environ.get("VERISPEC_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PROMPT = "The quick brown fox"
STATIC = Path(__file__).parents[1] / "src" / "verispec" / "server" / "static"


def _app(target, drafters, *, default, max_tokens=24, max_tokens_limit=64):
    scheduler = Scheduler(
        target, drafters, default=default, max_batch=4, max_queue=8, num_draft_tokens=3
    )
    app = create_app(
        scheduler, model_name="tiny", max_tokens=max_tokens, max_tokens_limit=max_tokens_limit
    )
    return app, scheduler


@pytest.fixture(scope="module")
def server(chat_target):
    app, scheduler = _app(
        chat_target, drafter_menu(chat_target, noisy_copy(chat_target)), default="model"
    )
    with serve(app, scheduler) as running:
        yield running


class SlowDrafter(StatelessDrafter):
    """Drafts nothing, slowly: a generation long enough to stop in the middle."""

    name = "slow"

    def propose(self, request: DraftRequest) -> Draft:
        time.sleep(0.05)
        return Draft(tokens=[])


@pytest.fixture(scope="module")
def slow_server(chat_target):
    drafters = {**drafter_menu(chat_target, None), "slow": SlowDrafter()}
    app, scheduler = _app(
        chat_target, drafters, default="slow", max_tokens=200, max_tokens_limit=200
    )
    with serve(app, scheduler) as running:
        yield running


# -- the stream's provenance extension (no browser) ---------------------------------------


def _stream(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_provenance_covers_the_text_and_matches_the_statistics(server, temperature) -> None:
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": temperature, "seed": 3}
    chunks = _stream(server.base_url + "/completions", {**body, "verispec": {"provenance": True}})
    plain = _stream(server.base_url + "/completions", body)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == "".join(c["choices"][0]["text"] for c in plain)  # the extension changes nothing
    assert all("verispec" not in c for c in plain)
    pieces = [p for c in chunks for p in c["verispec"]["pieces"]]
    passes = [p for c in chunks for p in c["verispec"]["passes"]]
    assert "".join(p["text"] for p in pieces) == text
    spec = chunks[-1]["speculation"]
    assert len(passes) == spec["target_passes"]
    assert sum(p["drafted"] for p in passes) == spec["drafted"]
    assert sum(p["accepted"] for p in passes) == spec["accepted"]
    assert sum(p["tokens"] for p in passes) == 40
    # One origin per token, consistent with its pass.
    tokens = {p["index"]: p for p in pieces}
    assert sorted(tokens) == list(tokens) and 0 <= min(tokens) <= max(tokens) < 40  # in order
    origins = {p["origin"] for p in tokens.values()}
    assert "draft" in origins and origins & {"recovered", "bonus"}
    by_pass: dict[int, list[dict]] = {}
    for token in tokens.values():
        by_pass.setdefault(token["target_pass"], []).append(token)
    for number, members in by_pass.items():
        record = passes[number - 1]
        for token in members:
            if token["origin"] == "draft":
                assert token["position"] <= record["accepted"]
            elif token["origin"] == "recovered":
                assert token["position"] == record["accepted"] + 1 < record["drafted"] + 1
                assert "rejected" in token
            elif token["origin"] == "bonus":
                assert token["position"] == record["drafted"] + 1 == record["accepted"] + 1
    sampled = [t for t in tokens.values() if t["origin"] in ("draft", "recovered")]
    if temperature == 0:
        assert all("p_target" not in t for t in tokens.values())
    else:
        assert all(0 <= t["p_target"] <= 1 and 0 < t["p_draft"] <= 1 for t in sampled)


def test_a_request_picks_its_drafter_and_draft_length(server, chat_target) -> None:
    url = server.base_url + "/completions"
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    alone = generate(chat_target, None, PROMPT, max_new_tokens=20, chat=False).text
    plain = _stream(url, {**body, "verispec": {"drafter": "none", "provenance": True}})
    assert "".join(c["choices"][0]["text"] for c in plain) == alone
    assert {p["origin"] for c in plain for p in c["verispec"]["pieces"]} == {"target"}
    assert plain[-1]["speculation"]["drafted"] == 0
    one = httpx.post(url, json={**body, "verispec": {"num_draft_tokens": 1}}).json()
    assert one["choices"][0]["text"] == alone
    # one draft per pass, but none in the prompt pass and none in the last (one token left)
    assert one["speculation"]["drafted"] == one["speculation"]["target_passes"] - 2
    lookup = httpx.post(url, json={**body, "verispec": {"drafter": "prompt-lookup"}}).json()
    assert lookup["choices"][0]["text"] == alone


def test_provenance_requests_are_checked(server, slow_server) -> None:
    url = server.base_url + "/completions"
    cases = [
        ({"verispec": {"provenance": True}}, "stream"),
        ({"verispec": {"drafter": "oracle"}}, "verispec.drafter"),
        ({"verispec": {"num_draft_tokens": 65}}, "verispec.num_draft_tokens"),
        ({"verispec": {"colour": "red"}}, "verispec.colour"),
    ]
    for extra, words in cases:
        response = httpx.post(url, json={"prompt": PROMPT, **extra})
        assert response.status_code == 400 and words in response.text, response.text
    no_model = httpx.post(
        slow_server.base_url + "/completions",
        json={"prompt": PROMPT, "verispec": {"drafter": "model"}},
    )
    assert no_model.status_code == 400 and "no 'model' drafter" in no_model.text


def test_the_extension_is_documented(server) -> None:
    spec = httpx.get(server.url + "/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ("VerispecOptions", "Provenance", "TokenPiece", "CompletionChunk"):
        assert name in schemas, name
    assert "verispec" in schemas["ChatCompletionChunk"]["properties"]
    assert set(schemas["TokenPiece"]["properties"]["origin"]["enum"]) == {
        "draft",
        "recovered",
        "bonus",
        "target",
    }
    assert "/playground/config" in spec["paths"]


def test_the_page_needs_nothing_from_the_internet(server) -> None:
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text()
        assert httpx.get(f"{server.url}/playground/{name}").text == text
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+", text))
        assert urls <= {"http://www.w3.org"}, (name, urls)  # the SVG namespace is no download


# -- in the browser ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"needs Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does it)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@contextmanager
def _open(browser, url: str) -> Iterator:
    """A fresh page on ``url`` that may fetch nothing from anywhere else."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    elsewhere: list[str] = []

    def local_only(route) -> None:
        if route.request.url.startswith(url):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", local_only)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]")
    try:
        yield page
    finally:
        context.close()
    assert not elsewhere, elsewhere
    assert not errors, errors


def _wait_status(page, words: str, timeout: float = 30_000) -> str:
    page.wait_for_function(
        "words => document.getElementById('run-status').textContent.includes(words)",
        arg=words,
        timeout=timeout,
    )
    return page.text_content("#run-status") or ""


def _hover_first_draft(page) -> None:
    """Hover the first draft token that shows something: sampled text can start with a token
    that renders empty (part of a UTF-8 character) or as a bare line break, which has no box
    to hover, and Playwright would wait for it until its timeout."""
    shown = page.locator("#output .origin-draft").filter(visible=True, has_text=re.compile(r"\S"))
    shown.first.hover()


def test_generate_marks_every_token_and_shows_figures(
    browser, server, chat_target, tmp_path
) -> None:
    with _open(browser, server.url) as page:
        pair = page.text_content("#pair") or ""
        assert "tiny-llama-0" in pair and "tiny-draft" in pair
        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        page.get_by_label("Max tokens", exact=True).fill("30")
        page.get_by_label("Temperature", exact=True).fill("0")
        page.get_by_label("Prompt", exact=True).press("Enter")
        assert "Done: 30 tokens" in _wait_status(page, "Done")
        alone = generate(
            chat_target, None, [{"role": "user", "content": PROMPT}], max_new_tokens=30
        )
        assert page.text_content("#output") == alone.text
        tokens = page.locator("#output .tok")
        assert tokens.count() > 10
        origins = set(page.eval_on_selector_all("#output .tok", "ts => ts.map(t => t.className)"))
        assert "tok origin-draft" in origins
        assert origins & {"tok origin-recovered", "tok origin-bonus"}
        assert int(page.text_content("#fig-passes") or 0) >= 1
        assert float(page.text_content("#fig-tps") or 0) > 0
        assert (page.text_content("#fig-acceptance") or "").endswith("%")
        assert float(page.text_content("#fig-mal") or 0) > 1.0
        assert page.locator("#chart rect").count() >= 1
        assert "position 1" in (page.text_content("#chart-summary") or "")
        # Hover explains a token; so does keyboard focus.
        _hover_first_draft(page)
        tip = page.locator("#tooltip")
        assert tip.is_visible() and "Draft token, position" in (tip.text_content() or "")
        tokens.first.focus()
        page.keyboard.press("ArrowRight")
        assert page.evaluate("document.activeElement.className").startswith("tok")
        assert "position" in (tip.text_content() or "")
        page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    assert (tmp_path / "playground.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sampled_drafts_show_their_probabilities(browser, server) -> None:
    with _open(browser, server.url) as page:
        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        page.get_by_label("Temperature", exact=True).fill("1")
        page.get_by_role("button", name="Generate").click()
        _wait_status(page, "Done")
        _hover_first_draft(page)
        text = page.text_content("#tooltip") or ""
        assert "p_target" in text and "p_draft" in text and "kept with probability" in text


def test_race_shows_identical_greedy_texts(browser, server) -> None:
    with _open(browser, server.url) as page:
        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        page.get_by_label("Max tokens", exact=True).fill("40")
        page.get_by_label("Draft length", exact=True).select_option("3")
        page.get_by_role("button", name="Race: speculation on vs off").click()
        page.wait_for_function(
            "document.getElementById('race-verdict').textContent.includes('Speedup')"
        )
        verdict = page.locator("#race-verdict")
        assert verdict.get_attribute("data-identical") == "true"
        assert "identical" in (verdict.text_content() or "")
        spec, plain = page.text_content("#output-spec"), page.text_content("#output-plain")
        assert spec and spec == plain
        assert page.locator("#output-spec .origin-draft").count() > 0
        assert (
            page.locator("#output-plain .tok").count()
            == page.locator("#output-plain .origin-target").count()
        )
        for lane in ("spec", "plain"):
            assert float((page.text_content(f"#clock-{lane}") or "0 s").split()[0]) > 0
            assert "40 tokens" in (page.text_content(f"#figures-{lane}") or "")


def test_stop_mid_stream(browser, slow_server) -> None:
    with _open(browser, slow_server.url) as page:
        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        page.get_by_label("Max tokens", exact=True).fill("200")
        page.get_by_role("button", name="Generate").click()
        page.wait_for_function("document.querySelectorAll('#output .tok').length >= 5")
        assert page.get_by_role("button", name="Generate").is_disabled()
        page.get_by_role("button", name="Stop").click()
        status = _wait_status(page, "Stopped after")
        assert int(re.search(r"after (\d+) tokens", status).group(1)) < 200  # type: ignore[union-attr]
        assert wait_until(lambda: slow_server.scheduler.num_running == 0)  # the server let go
        assert page.get_by_role("button", name="Generate").is_enabled()
        assert page.get_by_role("button", name="Stop").is_disabled()


def test_a_bad_parameter_is_explained_and_the_page_recovers(browser, server) -> None:
    with _open(browser, server.url) as page:
        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        page.get_by_label("Temperature", exact=True).fill("5")
        page.get_by_role("button", name="Generate").click()
        alert = page.get_by_role("alert")
        alert.wait_for()
        assert "rejected" in (alert.text_content() or "")
        assert "temperature" in (alert.text_content() or "")
        page.get_by_label("Temperature", exact=True).fill("0")
        page.get_by_label("Max tokens", exact=True).fill("9999")
        page.get_by_role("button", name="Generate").click()
        page.wait_for_function("document.getElementById('error').textContent.includes('9999')")
        assert "64" in (alert.text_content() or "")  # the server's limit, named
        page.get_by_label("Max tokens", exact=True).fill("8")
        page.get_by_role("button", name="Generate").click()
        _wait_status(page, "Done: 8 tokens")
        assert alert.is_hidden()


def test_a_full_queue_is_explained(browser, server) -> None:
    with _open(browser, server.url) as page:
        body = {"error": {"message": "the queue is full (8 waiting requests)", "type": "x"}}
        page.route(
            "**/v1/chat/completions",
            lambda route: route.fulfill(status=429, json=body, headers={"Retry-After": "1"}),
        )
        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        page.get_by_role("button", name="Generate").click()
        alert = page.get_by_role("alert")
        alert.wait_for()
        assert "busy" in (alert.text_content() or "") and "1 s" in (alert.text_content() or "")
        assert page.get_by_role("button", name="Generate").is_enabled()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _serve_on(app, port: int) -> Iterator[None]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started, timeout=30)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_server_that_goes_away_is_explained_and_found_again(browser, chat_target) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"

    def plain_app():  # a server without speculation (a fresh one each time)
        return _app(chat_target, drafter_menu(chat_target, None), default="none")[0]

    context = browser.new_context()
    page = context.new_page()
    try:
        with _serve_on(plain_app(), port):
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready=true]")
        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        page.get_by_role("button", name="Generate").click()
        alert = page.get_by_role("alert")
        alert.wait_for()
        assert "cannot be reached" in (alert.text_content() or "")
        assert page.get_by_role("button", name="Generate").is_enabled()
        with _serve_on(plain_app(), port):
            page.wait_for_function(
                "document.getElementById('server-status').textContent.includes('back')",
                timeout=15_000,
            )
            assert alert.is_hidden()
            page.get_by_role("button", name="Generate").click()
            _wait_status(page, "Done")
    finally:
        context.close()
