"""`tuneforge demo` on loopback, driven by Debian's headless Chromium through Playwright.

Never downloads a browser: Playwright launches /usr/bin/chromium (the README's test
command installs it with apt). Screenshots go to test-artifacts/ at the repo root.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from tests.live import free_port, running
from tuneforge.config import load_experiment

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
# without the background-networking flags Chromium keeps calling Google, which this machine refuses
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps"]
ANSWER_TIMEOUT_MS = 90_000  # two CPU cores shared with other work; a 16-token answer takes seconds when idle


def _page_served(url: str):
    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    return ready


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory, smollm_location):
    workdir = tmp_path_factory.mktemp("demo")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with running(["demo", str(REPO / "configs" / "quickstart.yaml"), "--port", str(port), "--run-dir", str(workdir / "run")],
                 workdir, _page_served(url), timeout=120):
        yield url


@pytest.fixture(scope="module")
def page(demo_url):
    from playwright.sync_api import sync_playwright

    # the README's test command installs it; a missing browser is a failure, never a silent skip
    assert CHROMIUM.exists(), "needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.requested = []
        page.on("request", lambda request: page.requested.append(request.url))
        page.goto(demo_url)
        page.wait_for_selector("#message textarea")
        yield page
        browser.close()


def _set_max_tokens(page, value: int) -> None:
    box = page.locator("#max-tokens input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _wait_until_done(page, selector: str) -> None:
    """Until the element's timing line says done (null-safe: Gradio re-renders elements while streaming)."""
    page.wait_for_function(f"(document.querySelector('{selector}')?.innerText || '').includes('done in')", timeout=ANSWER_TIMEOUT_MS)


def _screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


# Records each distinct text of the newest answer bubble, as the browser renders it.
WATCH_ANSWER = """() => {
  window.seen = [];
  const chat = document.querySelector('#chatbot');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('[data-testid="bot"]');
    const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
    if (text && window.seen[window.seen.length - 1] !== text) window.seen.push(text);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def test_chat_streams_the_answer(page, demo_url):
    _set_max_tokens(page, 16)
    page.evaluate(WATCH_ANSWER)
    page.locator("#message textarea").fill("What is the capital of France?")
    page.locator("#send").click()
    _wait_until_done(page, "#chat-status")
    final = page.locator('#chatbot [data-testid="bot"]').last.inner_text().strip()
    assert "Paris" in final
    assert page.locator("#chat-status").inner_text().startswith("base:")
    partials = [t for t in page.evaluate("window.seen") if t not in ("…", final)]
    # the answer arrived in pieces: at least two shorter texts were on screen before the final one
    assert len({len(t) for t in partials if len(t) < len(final)}) >= 2, page.evaluate("window.seen")
    _screenshot(page, "demo-chat.png")
    # the page itself asks nothing of the internet
    assert all(url.startswith(demo_url) or url.startswith("data:") for url in page.requested), \
        [u for u in page.requested if not u.startswith(demo_url)]


def test_compare_shows_two_answers_side_by_side(page):
    page.get_by_role("tab", name="Compare").click()
    _set_max_tokens(page, 16)
    page.locator("#compare-prompt textarea").fill("Which colours is the Kestrel K2 available in?")
    page.locator("#compare-run").click()
    for column in ("#compare-0", "#compare-1"):
        _wait_until_done(page, column)
    left, right = page.locator("#compare-0").inner_text(), page.locator("#compare-1").inner_text()
    assert left.startswith("base\n") and right.startswith("base+rag\n")
    k = load_experiment(REPO / "configs" / "quickstart.yaml").rag.k
    assert f"Sources ({k} passages)" in right and "Sources" not in left
    assert "Error" not in left + right
    assert not page.locator("#compare-2").is_visible()
    page.locator("#compare-1 summary").click()
    assert "product-overview.md" in page.locator("#compare-1").inner_text()
    _screenshot(page, "demo-compare.png")


def test_a_system_that_cannot_answer_says_why_and_keeps_the_message(page):
    page.get_by_role("tab", name="Chat").click()
    box = page.locator("#system input")
    box.click()
    box.fill("finetuned")  # typed, like openai:<model>: this run has no adapter yet
    box.press("Enter")
    page.locator("#message textarea").fill("Hello?")
    page.locator("#send").click()
    page.get_by_text("run `tuneforge train` first").first.wait_for(timeout=30_000)
    assert page.locator("#message textarea").input_value() == "Hello?"
    assert "finetuned: error" in page.locator("#chat-status").inner_text()
