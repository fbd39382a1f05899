"""The chat page in headless Chromium: attach an image, ask, watch the answer stream in.

Needs the ``playwright`` Python package and a Chromium binary; Playwright drives the
system one ($FASTVLM_CHROMIUM if set, else ``/usr/bin/chromium`` from Debian's
``chromium`` package), so no browser download is needed. Without them the tests skip on
a workstation but fail with one line when ``CI=true``: a CI image that lost its
browser must not pass by skipping. A screenshot goes to ``artifacts/chat_page.png``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import builders
from fastvlm.generation.engine import Engine
from test_server import MODEL, load_tiny, serve

try:
    from playwright import sync_api
except ImportError:
    sync_api = None

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
IN_CI = os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def chromium_path() -> str | None:
    """$FASTVLM_CHROMIUM when set (even if it does not exist), else the usual system paths."""
    configured = os.environ.get("FASTVLM_CHROMIUM")
    if configured is not None:
        return configured if Path(configured).is_file() else None
    candidates = ["/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")]
    candidates.append(shutil.which("google-chrome"))
    return next((c for c in candidates if c and Path(c).is_file()), None)


CHROMIUM = chromium_path()


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


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
    # Checked before the model loads: tests list ``browser`` ahead of ``tiny``.
    if sync_api is None:
        _unavailable("the playwright package is missing: pip install playwright")
    if CHROMIUM is None:
        _unavailable("no Chromium binary: apt-get install -y chromium, or set FASTVLM_CHROMIUM")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def ask(page, question: str | None) -> None:
    if question is not None:
        page.fill("#prompt", question)
    page.click("#send")
    page.wait_for_function(
        "document.body.dataset.state === 'idle' && !document.querySelector('.streaming')", timeout=WAIT_MS
    )


@pytest.mark.slow
def test_chat_page_streams_an_answer_about_an_image(browser, tiny):
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
        sync_api.expect(page.locator("#previews img")).to_have_count(1, timeout=WAIT_MS)
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


def _sent_images(page, action) -> list[list[str]]:
    """The image URLs of each message of the chat request that ``action`` makes the page send."""
    with page.expect_request("**/v1/chat/completions") as info:
        action()
    messages = info.value.post_data_json["messages"]
    return [
        [p["image_url"]["url"] for p in m["content"] if p["type"] == "image_url"]
        for m in messages
        if isinstance(m["content"], list)
    ]


@pytest.mark.slow
def test_chat_page_sends_several_images_across_turns(browser, tiny):
    model, processor = tiny
    folder = builders.shared_assets() / "images"
    files = [str(folder / name) for name in ("000000039769.png", "waterview.jpg", "ocr_example3.jpg")]
    # 4 context tokens per tiny image: 64 hold three images and two short turns, not eight more.
    engine = Engine(model, processor, max_batch=2, max_seq_len=64)
    with serve(model, processor, engine=engine) as live:
        page = browser.new_page(viewport={"width": 900, "height": 760})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(live.url, wait_until="networkidle")
        sync_api.expect(page.locator("#model-name")).to_have_text(MODEL, timeout=WAIT_MS)
        page.click("#settings summary")
        page.fill("#max-tokens", "4")

        page.set_input_files("#image-input", files[:2])  # two at once, in this order
        sync_api.expect(page.locator("#previews img")).to_have_count(2, timeout=WAIT_MS)
        page.fill("#prompt", "Compare them.")
        first = _sent_images(page, lambda: ask(page, None))
        assert len(first) == 1 and [u[:15] for u in first[0]] == ["data:image/png;", "data:image/jpeg"]
        assert page.locator(".msg.user").first.locator("img").count() == 2

        page.set_input_files("#image-input", files[2])  # one more in a later turn
        sync_api.expect(page.locator("#previews img")).to_have_count(1, timeout=WAIT_MS)
        page.fill("#prompt", "And this one?")
        second = _sent_images(page, lambda: ask(page, None))
        assert second[0] == first[0] and len(second) == 2 and len(second[1]) == 1  # the history keeps them
        assert page.locator("#error").is_hidden() and page.locator(".msg").count() == 4

        page.set_input_files("#image-input", [files[0]] * 4)  # more than the context holds
        sync_api.expect(page.locator("#previews img")).to_have_count(4, timeout=WAIT_MS)
        ask(page, "What about all of these?")
        sync_api.expect(page.locator("#error")).to_contain_text("400", timeout=WAIT_MS)
        error = page.locator("#error").inner_text()
        assert "7 images take 28 of them" in error and "context" in error, error
        assert page.locator(".msg.assistant").count() == 2  # the refused turn left no answer
        assert not errors, errors
        page.close()


@pytest.mark.slow
def test_chat_page_asks_for_the_api_key(browser, tiny):
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


@pytest.mark.slow  # a second pytest process: 7-25 s on two busy cores
def test_a_missing_browser_fails_on_ci():
    env = {**os.environ, "CI": "true", "FASTVLM_CHROMIUM": "/nonexistent/chromium"}
    test = f"{__file__}::test_chat_page_asks_for_the_api_key"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1 and "1 error" in run.stdout, run.stdout[-2000:]
    assert "CI=true but no Chromium binary: apt-get install -y chromium" in run.stdout


def test_a_missing_browser_skips_off_ci(monkeypatch):
    monkeypatch.setitem(globals(), "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="no Chromium"):
        _unavailable("no Chromium binary")
    monkeypatch.setitem(globals(), "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="CI=true but no Chromium"):
        _unavailable("no Chromium binary")
