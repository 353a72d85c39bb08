"""The chat page at / in a real headless Chromium (Debian's package, driven by Playwright), against real
servers on 127.0.0.1: the CLI on the random demo model, and uvicorn threads for the API-key flow and for
the test-only replay worker (scripted answers: reasoning, Markdown, and an answer that tries XSS)."""

from __future__ import annotations

import json
import re
import shutil
import time

import httpx
import pytest
from servers import MODEL, CliServer, ThreadServer, metric, server_settings

from a8w8_serve.main import build_parser
from engine.tokenizer import HFTokenizer
from loaders.assets import qwen3_tokenizer_dir
from server.app import create_app

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no system Chromium (scripts/test.sh installs Debian's chromium package)"
)

TIMEOUT_MS = 60_000  # the slowest wait: a streamed answer on the 2-core CI machine
MAX_MODEL_LEN = 4096
STREAMED_TOKENS = 120  # the streamed answer of the first test
STOP_MAX_TOKENS = 3000  # far more than are generated before Stop is pressed
IM_END = 151645  # <|im_end|>: ends the replayed answer


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(serve_model):
    s = CliServer(
        serve_model,
        "--served-model-name",
        MODEL,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--kv-cache-memory",
        "64MiB",
    )
    yield s
    s.stop()


class Page:
    """One browser tab (its own storage) on the chat page, recording page errors and the API requests sent."""

    def __init__(self, browser, base: str, **context_kw):
        self.context = browser.new_context(**context_kw)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[dict] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        # uncaught exceptions and console errors (a CSP violation is one); an HTTP error status is logged by
        # the browser as "Failed to load resource", which the tests that provoke one check themselves
        self.page.on(
            "console",
            lambda m: m.type == "error" and "Failed to load resource" not in m.text and self.errors.append(m.text),
        )
        self.page.on(
            "request",
            lambda r: r.url.endswith("/v1/chat/completions") and self.requests.append(r.post_data_json),
        )
        self.base = base

    def open(self, wait_ready: bool = True) -> None:
        self.page.goto(f"{self.base}/")
        if wait_ready:
            self.page.wait_for_function(f"() => document.getElementById('model-name').textContent === {MODEL!r}")

    def settings(self, **fields: str) -> None:
        if self.page.locator("#toggle-sidebar").is_visible():  # on a phone, Settings is in the ☰ menu
            self.page.click("#toggle-sidebar")
        self.page.click("#open-settings")
        for name, value in fields.items():
            selector = f"#settings-form [name={name}]"
            if name == "thinking":
                self.page.select_option(selector, value)
            else:
                self.page.fill(selector, value)
        self.page.click("#settings-save")
        self.page.wait_for_selector("#settings", state="hidden")

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def wait_answer(self, count: int = 1):
        """The ``count``-th answer once it has finished streaming (its stats line or an error is shown)."""
        self.page.wait_for_function(
            "n => { const a = document.querySelectorAll('#messages .message.assistant');"
            " return a.length >= n && !document.querySelector('#send').hidden; }",
            arg=count,
        )
        return self.page.locator("#messages .message.assistant").nth(count - 1)

    def stored_chats(self) -> list[dict]:
        return json.loads(self.page.evaluate("localStorage.getItem('a8w8.chats')") or "[]")

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"errors in the page: {self.errors}"


@pytest.fixture
def tab(browser, server):
    t = Page(browser, server.base)
    t.open()
    yield t
    t.close()


def api_answer(base: str, body: dict) -> str:
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


# ---- the page and its routes ------------------------------------------------------------------------
def test_page_routes_headers_and_no_web_ui(serve_model, server):
    page = httpx.get(f"{server.base}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
    assert 'src="ui/app.js"' in page.text  # relative: the page also works behind a path prefix
    for path in ("ui/app.js", "ui/style.css", "ui/vendor/markdown-it-14.3.3.min.js", "ui/vendor/LICENSE-markdown-it"):
        assert httpx.get(f"{server.base}/{path}").status_code == 200, path
    for escape in ("ui/%2e%2e/web_ui.py", "ui/..%2fweb_ui.py"):  # encoded: httpx would fold a plain ".."
        assert httpx.get(f"{server.base}/{escape}").status_code == 404, escape

    # the page adds exactly / and /ui, and --no-web-ui removes them
    with_ui = {
        getattr(r, "path", None) for r in create_app(server_settings(serve_model)).routes
    }  # (the API: one router)
    without = {getattr(r, "path", None) for r in create_app(server_settings(serve_model, web_ui=False)).routes}
    assert with_ui - without == {"/", "/ui"} and without <= with_ui
    assert build_parser().parse_args(["serve", "--no-web-ui"]).web_ui is False
    assert build_parser().parse_args(["serve"]).web_ui is True
    s = ThreadServer(create_app(server_settings(serve_model, web_ui=False)))
    try:
        for path in ("/", "/ui/app.js"):
            r = httpx.get(f"{s.base}{path}")
            assert r.status_code == 404 and r.json()["error"]["code"] == 404, path
        assert httpx.get(f"{s.base}/v1/models").status_code == 200
    finally:
        s.stop()


# ---- streaming, keyboard, regenerate, persistence --------------------------------------------------
def test_streamed_answer_grows_in_the_page_and_matches_the_api(tab, server):
    p = tab.page
    # (120 tokens: the test model writes 40 in a few frames' time, which a loaded machine's browser may read and
    # paint in two; one full-suite run saw [4, 194, 194])
    tab.settings(temperature="0", maxTokens=str(STREAMED_TOKENS), extraBody='{"ignore_eos": true}')
    # every DOM update of the answer records its text length
    p.evaluate(
        """() => { window.__lengths = [];
        new MutationObserver(() => { const c = document.querySelectorAll('.message.assistant .content');
          if (c.length) window.__lengths.push(c[c.length - 1].textContent.length); })
        .observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true}); }"""
    )
    p.fill("#input", "line one")
    p.press("#input", "Shift+Enter")
    p.locator("#input").press_sequentially("line two")
    assert p.input_value("#input") == "line one\nline two"
    assert p.locator(".message.user").count() == 0  # Shift+Enter is a new line, not a send
    p.press("#input", "Enter")
    answer = tab.wait_answer()
    assert p.input_value("#input") == ""
    assert p.locator(".message.user").inner_text().startswith("line one\nline two")

    lengths = [n for n in p.evaluate("window.__lengths") if n > 0]
    growth = sorted(set(lengths))
    assert len(growth) >= 3, f"the answer appeared in fewer than 3 steps: {lengths}"
    assert lengths == sorted(lengths)  # it only grows

    body = tab.requests[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == MODEL and body["max_tokens"] == STREAMED_TOKENS and body["temperature"] == 0
    assert body["ignore_eos"] is True and "top_p" not in body and "chat_template_kwargs" not in body
    assert body["messages"] == [{"role": "user", "content": "line one\nline two"}]
    # the page assembled exactly what the API answers to the same request
    expected = api_answer(server.base, body)
    chats = tab.stored_chats()
    assert chats[0]["messages"][1]["content"] == expected
    stats = answer.locator(".stats").inner_text()
    assert re.fullmatch(rf"{STREAMED_TOKENS} tokens · [0-9.]+ tok/s · TTFT [0-9]+ ms · cut at max tokens", stats), stats
    assert chats[0]["title"].startswith("line one")

    # regenerate the last answer: the same history is sent again, and it replaces the answer
    answer.locator("button.regenerate").click()
    tab.wait_answer()
    assert len(tab.requests) == 2 and tab.requests[1]["messages"] == body["messages"]
    assert p.locator(".message.assistant").count() == 1
    assert tab.stored_chats()[0]["messages"][1]["content"] == expected  # greedy: the same text

    # the conversation survives a reload; a new chat starts empty; a chat can be deleted
    p.reload()
    p.wait_for_function(f"() => document.getElementById('model-name').textContent === {MODEL!r}")
    assert p.locator(".message.user").count() == 1 and p.locator(".message.assistant").count() == 1
    p.click("#new-chat")
    assert p.locator(".message").count() == 0 and p.locator("#chat-list li").count() == 2
    p.locator("#chat-list li").nth(1).locator(".chat-title").click()
    assert p.locator(".message.assistant").count() == 1
    p.locator("#chat-list li").nth(0).locator(".chat-delete").click()
    assert p.locator("#chat-list li").count() == 1 and len(tab.stored_chats()) == 1


def test_unset_sampling_is_left_to_the_server_and_answers_end_by_themselves(browser, server):
    """A fresh page sends no sampling fields (the model's generation config decides) and max_tokens 1024, so a
    runaway answer ends; settings saved by the page before that default (maxTokens "") get it too, and a
    maxTokens emptied on purpose now is kept."""
    old = Page(browser, server.base)
    old.page.goto(f"{server.base}/ui/style.css")  # same origin: write the old page's saved settings first
    old.page.evaluate(
        """() => localStorage.setItem('a8w8.settings', JSON.stringify({systemPrompt: "", temperature: "",
        topP: "", maxTokens: "", thinking: "default", extraBody: ""}))"""
    )
    fresh = Page(browser, server.base)
    try:
        for t in (fresh, old):
            t.open()
            t.send("Hello")
            t.wait_answer()
            body = t.requests[-1]
            assert body["max_tokens"] == 1024, body
            assert not {"temperature", "top_p", "top_k", "min_p"} & set(body), body
        # (max_completion_tokens through the extra fields only keeps this answer short; it is not max_tokens)
        fresh.settings(maxTokens="", extraBody='{"max_completion_tokens": 8}')
        fresh.page.reload()
        fresh.page.wait_for_function(f"() => document.getElementById('model-name').textContent === {MODEL!r}")
        fresh.send("Again")
        fresh.wait_answer(2)
        assert "max_tokens" not in fresh.requests[-1], fresh.requests[-1]
    finally:
        fresh.close()
        old.close()


def test_stop_aborts_the_request_and_frees_the_server(tab, server):
    p = tab.page
    generated_before = metric(server.base, "vllm:generation_tokens_total")
    tab.settings(maxTokens=str(STOP_MAX_TOKENS), extraBody='{"ignore_eos": true}')
    tab.send("Tell me a long story.")
    p.wait_for_selector("#stop", state="visible")
    p.wait_for_function(
        "() => { const c = document.querySelector('.message.assistant .content');"
        " return c && c.textContent.length > 40; }"
    )
    assert metric(server.base, "vllm:num_requests_running") == 1
    p.click("#stop")
    answer = tab.wait_answer()
    assert "stopped" in answer.locator(".stats").inner_text()
    assert answer.locator(".content").inner_text().strip()  # the partial answer stays
    deadline = time.monotonic() + 20
    while metric(server.base, "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the stopped request is still running on the server"
        time.sleep(0.2)
    generated = metric(server.base, "vllm:generation_tokens_total") - generated_before
    assert 0 < generated < STOP_MAX_TOKENS
    assert tab.stored_chats()[0]["messages"][1]["stopped"] is True


def test_too_long_prompt_error_is_shown_and_the_turn_can_be_edited(tab):
    p = tab.page
    long_text = "word " * (MAX_MODEL_LEN + 500)
    tab.send(long_text)
    answer = tab.wait_answer()
    assert "error" in (answer.get_attribute("class") or "")
    text = answer.inner_text()
    assert text.startswith("Error 400: ") and f"maximum context length is {MAX_MODEL_LEN} tokens" in text
    # Edit puts the message back into the composer and removes the failed turn
    p.locator(".message.user button.edit").click()
    assert p.input_value("#input") == long_text
    assert p.locator(".message").count() == 0
    tab.settings(maxTokens="3")
    tab.send("short")
    assert tab.wait_answer().locator(".stats").count() == 1
    assert tab.requests[-1]["messages"] == [{"role": "user", "content": "short"}]  # the error is not sent back


def test_phone_viewport(browser, server):
    t = Page(browser, server.base, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        t.open()
        p = t.page
        sidebar = p.locator("#sidebar")
        assert sidebar.bounding_box()["x"] + sidebar.bounding_box()["width"] <= 0  # off screen
        p.click("#toggle-sidebar")
        p.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().left >= 0")
        p.mouse.click(370, 400)  # on the scrim, beside the sidebar
        p.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().right <= 0")
        t.settings(maxTokens="30", extraBody='{"ignore_eos": true}')
        t.send("```\n" + "x" * 300 + "\n```\n" + "y" * 300)
        t.wait_answer()
        assert p.evaluate("document.documentElement.scrollWidth") <= 390
        assert p.locator("#send").bounding_box()["x"] + p.locator("#send").bounding_box()["width"] <= 390
    finally:
        t.close()


# ---- API key ----------------------------------------------------------------------------------------
def test_api_key_is_asked_once_and_kept(browser, serve_model):
    s = ThreadServer(create_app(server_settings(serve_model, api_key="sekret")))
    t = Page(browser, s.base)
    try:
        t.open(wait_ready=False)
        p = t.page
        p.wait_for_selector("#api-key-dialog", state="visible")
        p.fill("#api-key-input", "wrong")
        p.click("#api-key-save")
        p.wait_for_function("() => document.getElementById('api-key-reason').textContent.includes('refused')")
        p.fill("#api-key-input", "sekret")
        p.click("#api-key-save")
        p.wait_for_function(f"() => document.getElementById('model-name').textContent === {MODEL!r}")
        t.settings(maxTokens="5")
        t.send("hello")
        assert t.wait_answer().locator(".stats").inner_text().startswith("5 tokens")
        p.reload()
        p.wait_for_function(f"() => document.getElementById('model-name').textContent === {MODEL!r}")
        assert not p.locator("#api-key-dialog").is_visible()  # kept in the browser
        assert p.evaluate("localStorage.getItem('a8w8.apiKey')") == "sekret"
    finally:
        t.close()
        s.stop()


# ---- reasoning and XSS, with the test-only replay worker -------------------------------------------
XSS_IN_REASONING = '<img src=x onerror="window.__pwned=1">'
XSS_IN_ANSWER = (
    '<img src=x onerror="window.__pwned=2"> <script>window.__pwned=3</script> '
    '[click me](javascript:window.__pwned=4) <a href="javascript:window.__pwned=5">link</a>'
)
REPLAYED = (
    f"<think>\nThe user wants a number. {XSS_IN_REASONING}\n</think>\n\n"
    f"The answer is **42**.\n\n- one\n- two\n\n```python\nprint(42)\n```\n\n{XSS_IN_ANSWER}"
)


@pytest.fixture(scope="module")
def replay_server(serve_model):
    ids = HFTokenizer(qwen3_tokenizer_dir()).encode(REPLAYED) + [IM_END]
    s = ThreadServer(create_app(server_settings(serve_model, worker={"replay_token_ids": ids})))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def replayed_answer(browser, replay_server):
    t = Page(browser, replay_server.base)
    t.open()
    t.send("What is the answer?")
    answer = t.wait_answer()
    yield t, answer
    t.close()


def test_reasoning_is_a_separate_collapsible_block(replayed_answer):
    t, answer = replayed_answer
    # (this server's context is 1024 tokens: the page's default max tokens, 1024, was cut to the room left)
    assert 900 < t.requests[-1]["max_tokens"] < 1024
    thinking = answer.locator("details.thinking")
    assert thinking.count() == 1
    assert thinking.locator("summary").inner_text().startswith("Thought for ")
    assert thinking.get_attribute("open") is None  # collapsed once the answer came
    thinking.locator("summary").click()
    assert thinking.locator(".thinking-text").inner_text().strip() == f"The user wants a number. {XSS_IN_REASONING}"
    content = answer.locator(".content")
    assert "The user wants a number" not in content.inner_text()
    assert content.locator("strong").inner_text() == "42"
    assert content.locator("li").count() == 2
    assert content.locator("pre code").inner_text().strip() == "print(42)"
    stored = t.stored_chats()[0]["messages"][1]
    assert stored["content"].startswith("The answer is **42**.") and "<think>" not in stored["content"]


def test_model_output_is_never_html(replayed_answer):
    t, answer = replayed_answer
    p = t.page
    p.wait_for_timeout(300)  # a broken image would have fired its onerror by now
    assert p.evaluate("window.__pwned === undefined")
    assert answer.locator("img, script").count() == 0
    assert answer.locator("a[href^='javascript']").count() == 0
    text = answer.locator(".content").inner_text()
    assert XSS_IN_ANSWER.split(" <script>")[0] in text and "<script>window.__pwned=3</script>" in text


def test_full_browser_storage_is_reported_not_fatal(tab):
    p = tab.page
    # fill this origin's localStorage up to its quota
    p.evaluate(
        """() => { let i = 0;
        for (let size = 1 << 20; size >= 1; size >>= 1) {  // big pieces, then smaller ones into what is left
          const chunk = "x".repeat(size);
          for (;;) { try { localStorage.setItem("filler" + i++, chunk); } catch (e) { break; } } } }"""
    )
    tab.settings(maxTokens="3")
    tab.send("hello")
    assert tab.wait_answer().locator(".stats").inner_text().startswith("3 tokens")
    assert "not saved" in p.inner_text("#server-status")
    p.evaluate("() => localStorage.clear()")


# ---- the API documentation, offline ------------------------------------------------------------------
def test_api_docs_render_without_network(browser, server):
    """/docs and /redoc with every request that leaves the server refused (a self-hosted machine without
    internet): the operations list renders from the packaged Swagger UI and ReDoc."""
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    outside: list[str] = []

    def only_the_server(route) -> None:
        if route.request.url.startswith(server.base):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_server)
    errors: list[str] = []
    try:
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{server.base}/docs")
        page.wait_for_selector(".opblock-summary-path")
        paths = set(page.locator(".opblock-summary-path").all_inner_texts())
        assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= {p.strip() for p in paths}, paths
        page.goto(f"{server.base}/redoc")
        summary = httpx.get(f"{server.base}/openapi.json").json()["paths"]["/v1/chat/completions"]["post"]["summary"]
        page.locator("h2", has_text=summary).first.wait_for()  # an operation's section, rendered by ReDoc
        assert not outside, f"the docs pages asked for files outside the server: {outside}"
        assert not errors, errors
    finally:
        context.close()
