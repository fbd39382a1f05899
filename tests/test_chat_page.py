"""The chat page in headless Chromium: attach an image, ask, watch the answer stream in.

Needs the ``playwright`` Python package and a Chromium binary; Playwright drives the
system one (``/usr/bin/chromium`` from Debian's ``chromium`` package, or
$FASTVLM_CHROMIUM), so no browser download is needed. Skipped when either is missing.
A screenshot goes to ``artifacts/chat_page.png``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'server' extra (fastapi, uvicorn)")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="pip install playwright (the browser itself comes from the system)"
)

import builders  # noqa: E402
from test_server import MODEL, load_tiny, serve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"


def chromium_path() -> str | None:
    candidates = [os.environ.get("FASTVLM_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")]
    candidates += [shutil.which("chromium-browser"), shutil.which("google-chrome")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


CHROMIUM = chromium_path()
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary: apt-get install -y chromium"),
    pytest.mark.skipif(builders.shared_assets() is None, reason="shared/assets (tokenizer, images) missing"),
]
WAIT_MS = 60_000

# Counts how often the assistant's text changes while it streams.
COUNT_UPDATES = """() => {
  window.__updates = 0;
  new MutationObserver(() => { window.__updates += 1; })
    .observe(document.getElementById("log"), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_dir):
    return load_tiny(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def ask(page, question: str) -> None:
    page.fill("#prompt", question)
    page.click("#send")
    page.wait_for_function(
        "document.body.dataset.state === 'idle' && !document.querySelector('.streaming')", timeout=WAIT_MS
    )


def test_chat_page_streams_an_answer_about_an_image(tiny, browser):
    model, processor = tiny
    image = builders.shared_assets() / "images" / "000000039769.png"
    with serve(model, processor) as live:
        page = browser.new_page(viewport={"width": 900, "height": 760})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(live.url, wait_until="networkidle")
        sync_api.expect(page.locator("#model-name")).to_have_text(MODEL, timeout=WAIT_MS)

        page.click("#settings summary")
        page.fill("#max-tokens", "40")
        page.click("#settings summary")
        page.set_input_files("#image-input", str(image))
        sync_api.expect(page.locator("#preview")).to_be_visible(timeout=WAIT_MS)
        page.evaluate(COUNT_UPDATES)
        ask(page, "Describe this picture.")

        answer = page.locator(".msg.assistant .text").first
        assert answer.inner_text().strip()
        assert page.evaluate("window.__updates") > 2  # the text arrived in pieces
        assert page.locator(".msg.user img").count() == 1
        stats = page.locator("#stats").inner_text()
        assert "TTFT" in stats and "tokens/s" in stats, stats
        assert page.locator("#error").is_hidden()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat_page.png"))

        ask(page, "And what colour is it?")  # a second turn carries the history
        assert page.locator(".msg").count() == 4
        page.click("#reset")
        assert page.locator(".msg").count() == 0
        assert not errors, errors
        page.close()


def test_chat_page_asks_for_the_api_key(tiny, browser):
    model, processor = tiny
    with serve(model, processor, api_key="sekret") as live:
        page = browser.new_page()
        page.goto(live.url, wait_until="networkidle")
        sync_api.expect(page.locator("#error")).to_contain_text("API key", timeout=WAIT_MS)
        page.fill("#api-key", "sekret")
        page.dispatch_event("#api-key", "change")
        sync_api.expect(page.locator("#model-name")).to_have_text(MODEL, timeout=WAIT_MS)
        page.fill("#max-tokens", "8")  # the settings opened to ask for the key
        ask(page, "Hello?")
        assert page.locator(".msg.assistant .text").first.inner_text().strip()
        page.close()
