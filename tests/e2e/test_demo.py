"""`tuneforge demo` on loopback, driven by Debian's headless Chromium through Playwright.

Never downloads a browser: Playwright launches /usr/bin/chromium (the README's test
command installs it with apt). Screenshots go to test-artifacts/ at the repo root.
"""

from __future__ import annotations

import json
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
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
]
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
def demo_run(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo") / "run"


@pytest.fixture(scope="module")
def demo_url(demo_run, smollm_location):
    workdir = demo_run.parent
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with running(
        ["demo", str(REPO / "configs" / "quickstart.yaml"), "--port", str(port), "--run-dir", str(workdir / "run")],
        workdir,
        _page_served(url),
        timeout=120,
    ):
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
        page.wait_for_selector("#chatbot")
        yield page
        browser.close()


def _set_max_tokens(page, value: int) -> None:
    box = page.locator("#max-tokens input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _wait_until_done(page, selector: str) -> None:
    """Until the element's timing line says done (null-safe: Gradio re-renders elements while streaming)."""
    page.wait_for_function(
        f"(document.querySelector('{selector}')?.innerText || '').includes('done in')", timeout=ANSWER_TIMEOUT_MS
    )


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
    elsewhere = [u for u in page.requested if not u.startswith(demo_url)]
    assert all(url.startswith(demo_url) or url.startswith("data:") for url in page.requested), elsewhere


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


def test_feedback_is_captured_where_answers_are_read_and_shows_in_the_arena(page, demo_url, demo_run):
    from playwright.sync_api import expect

    from tuneforge.feedback.store import FeedbackStore

    store = FeedbackStore(demo_run / "feedback")
    before = len(store.read()[0])
    # Chat: a thumb, then a better answer written over the model's own
    page.get_by_role("tab", name="Chat").click()
    box = page.locator("#system input")
    box.click()
    box.fill("base")
    box.press("Enter")
    _set_max_tokens(page, 12)
    page.locator("#message textarea").fill("What does error E3 mean on a thermostat?")
    page.locator("#send").click()
    _wait_until_done(page, "#chat-status")
    answer = page.locator('#chatbot [data-testid="bot"]').last.inner_text().strip()
    page.locator("#thumb-up").click()
    page.get_by_text("Saved: thumbs up for base").wait_for(timeout=30_000)
    page.get_by_text("Write a better answer").click()
    correction = page.locator("#correction textarea")
    assert correction.input_value().strip() == answer  # prefilled with the answer, to edit
    correction.fill("E3 means the batteries are low: replace both AA cells.")

    # saving fails (the feedback folder cannot be written): the page says why and keeps the typed text
    folder = demo_run / "feedback"
    folder.rename(demo_run / "feedback-away")
    folder.write_text("not a folder")
    try:
        page.locator("#save-correction").click()
        page.get_by_text("Not saved:").wait_for(timeout=30_000)
        assert correction.input_value() == "E3 means the batteries are low: replace both AA cells."
    finally:
        folder.unlink()
        (demo_run / "feedback-away").rename(folder)
    page.locator("#save-correction").click()
    page.get_by_text("Saved: your better answer").wait_for(timeout=30_000)

    # Compare: a vote on the pair on screen
    page.get_by_role("tab", name="Compare").click()
    # an earlier test's answers may still show
    earlier = [page.locator(c).inner_text() for c in ("#compare-0", "#compare-1")]
    page.locator("#compare-prompt textarea").fill("How do I pair the K2 with my phone?")
    page.locator("#compare-run").click()
    for column, old in zip(("#compare-0", "#compare-1"), earlier):
        text = f"(document.querySelector('{column}')?.innerText || '')"
        page.wait_for_function(
            f"(t => t.includes('done in') && t !== {json.dumps(old)})({text})", timeout=ANSWER_TIMEOUT_MS
        )
    # the votes open, on the pair on screen, once every answer is complete
    page.wait_for_function(
        "document.querySelector('#vote-right') && !document.querySelector('#vote-right').disabled",
        timeout=ANSWER_TIMEOUT_MS,
    )
    assert page.locator("#vote-pair input:checked").input_value() == "1. base  vs  2. base+rag"
    # the label shows (Gradio may still be drawing the new choices: wait for it rather than read once)
    expect(page.locator("#vote-pair").get_by_text("1. base  vs  2. base+rag")).to_be_visible(timeout=30_000)
    page.locator("#vote-right").click()
    page.get_by_text("Saved: base+rag is better").wait_for(timeout=30_000)

    # Contribute: a prompt and its ideal answer
    page.get_by_role("tab", name="Contribute").click()
    page.locator("#contribute-prompt textarea").fill("Can the K2 run on a schedule?")
    page.locator("#contribute-answer textarea").fill("Yes: set up to four periods a day in the app, under Schedule.")
    page.locator("#contribute-save").click()
    page.get_by_text("Saved: thank you").wait_for(timeout=30_000)

    page.get_by_role("tab", name="Arena").click()
    page.get_by_text("Leaderboard").first.wait_for(timeout=30_000)
    assert "base+rag" in page.locator("#arena").inner_text()
    _screenshot(page, "demo-arena.png")

    records, problems = store.read()
    assert problems == [] and [r["kind"] for r in records[before:]] == ["thumb", "correction", "vote", "contribution"]
    thumb, fixed, vote, contributed = records[before:]
    assert thumb["answer"]["text"].strip() == answer and thumb["answer"]["identity"] == "builtin:smollm2-135m-instruct"
    assert thumb["settings"] == {"temperature": 0.0, "max_tokens": 12}
    assert thumb["messages"][-1]["content"].startswith("What does error E3")
    assert fixed["corrected"].startswith("E3 means the batteries are low") and fixed["answer"]["text"].strip() == answer
    assert vote["verdict"] == "right" and vote["left"]["system"] == "base" and vote["right"]["system"] == "base+rag"
    assert vote["right"]["sources"] and not vote["left"]["sources"]  # the +rag answer keeps what it retrieved
    assert contributed["answer"].startswith("Yes: set up to four periods")


def test_the_feedback_becomes_a_dpo_round_that_eval_compares_with_the_adapter_before(demo_run, tmp_path):
    """After the browser test: summary and export from the CLI, then one feedback round on a run with an adapter."""
    import json
    import shutil
    import subprocess
    import sys

    from tuneforge.data.prepare import prepare
    from tuneforge.models import load_tokenizer
    from tuneforge.run import RunDir
    from tuneforge.train.local import train_local

    config = REPO / "configs" / "quickstart.yaml"

    def tuneforge(*args):
        return subprocess.run(
            [sys.executable, "-m", "tuneforge", *args], capture_output=True, text=True, timeout=900, cwd=tmp_path
        )

    summary = tuneforge("feedback", str(config), "--run-dir", str(demo_run))
    assert summary.returncode == 0, summary.stderr
    assert (
        "Leaderboard" in summary.stdout
        and "base+rag" in summary.stdout
        and (demo_run / "feedback" / "summary.json").exists()
    )
    exported = tuneforge("feedback", "export", str(config), "--run-dir", str(demo_run))
    assert exported.returncode == 0, exported.stderr
    preference = demo_run / "feedback" / "export" / "preference.jsonl"
    pairs = [json.loads(line) for line in preference.read_text().splitlines()]
    preferred = {p["preferred_output"][0]["content"] for p in pairs}
    assert "E3 means the batteries are low: replace both AA cells." in preferred

    # a run that already has an adapter (2 SFT steps), given the demo's feedback
    small = ["model.quantization=none", "data.max_length=256", "data.rag=false"]
    experiment = load_experiment(config, [*small, "data.sample=12", "train.max_steps=2"])
    run = RunDir(experiment, tmp_path / "round").start("train")
    prepare(experiment, run, load_tokenizer(experiment.model), progress=False)
    train_local(experiment, run, progress=False)
    before = (run.sub("adapter") / "adapter_model.safetensors").read_bytes()
    shutil.copytree(demo_run / "feedback", run.sub("feedback"), ignore=shutil.ignore_patterns("export", "summary.*"))
    (tmp_path / "eval.jsonl").write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in [("What does E3 mean?", "Low batteries."), ("Can it run a schedule?", "Yes, in the app.")]
        )
    )
    round_ = tuneforge(
        "run",
        str(config),
        "--run-dir",
        str(run.path),
        *small,
        "data.feedback=true",
        "train.method=dpo",
        "train.max_steps=2",
        "data.valid_split=0",
        f"eval.data={tmp_path / 'eval.jsonl'}",
        "eval.systems=[finetuned]",
        "eval.max_new_tokens=8",
    )
    assert round_.returncode == 0, round_.stdout[-2000:] + round_.stderr[-3000:]
    assert "training continues from it" in round_.stdout
    kept = json.loads(run.sub("adapters", "previous.json").read_text())
    # the adapter before the round, kept
    assert (Path(kept["path"]) / "adapter_model.safetensors").read_bytes() == before
    assert (run.sub("adapter") / "adapter_model.safetensors").read_bytes() != before  # the round changed it
    metrics = json.loads(run.sub("eval", "metrics.json").read_text())
    assert set(metrics) >= {"previous", "finetuned"}
    report = run.sub("eval", "report.md").read_text()
    assert "previous" in report and "finetuned" in report
