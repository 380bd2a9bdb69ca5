"""The playground page end to end in headless Chromium (Debian's package, driven by Playwright):
open it, move sliders, pick a method, generate, see streamed text and live stats."""
import shutil

import pytest
from test_server import MODEL, Running

from personamix import Generator
from personamix.serving import create_app
from personamix.testing import save_chat_tiny, save_lora

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed "
                                                         "(.ci/run installs it)")


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    root = tmp_path_factory.mktemp("playground")
    base = save_chat_tiny(root / "base", max_positions=256)
    adapters = {name: save_lora(base, root / name, seed=i) for i, name in enumerate("ENTJ")}
    running = Running(create_app(Generator.from_pretrained(base, adapters=adapters, device="cpu"), MODEL))
    yield running.url
    running.stop()


def test_playground_generates_with_sliders_and_presets(url, tmp_path):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#w-E")
        assert page.locator("#sliders input[type=range]").count() == 4
        page.select_option("#preset", "ENTJ")                        # a preset sets the four sliders
        assert page.locator("#v-E").inner_text() == "0.25"
        page.locator("#w-N").fill("-0.5")                           # move a slider by hand
        assert page.locator("#v-N").inner_text() == "-0.5"
        page.select_option("#method", "token")
        page.fill("#prompt", "what do you like")
        page.fill("#max_tokens", "40")
        page.click("#go")
        page.wait_for_function("document.getElementById('stats').textContent.includes('tok/s')", timeout=30_000)
        assert page.locator("#output").inner_text().strip()
        stats = page.locator("#stats").inner_text()
        assert "token:" in stats and '"N":-0.5' in stats and "acceptance" in stats
        page.select_option("#method", "scr")
        page.locator("#w-E").fill("0")
        page.locator("#w-N").fill("0")
        page.locator("#w-T").fill("0")
        page.locator("#w-J").fill("-1")                              # only a negative weight: a clear error
        page.click("#go")
        page.wait_for_function("document.getElementById('output').textContent.startsWith('Error')", timeout=30_000)
        assert "positive" in page.locator("#output").inner_text()
        browser.close()
