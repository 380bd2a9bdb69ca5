"""docs/playground.png: the playground on the real default model with the shipped MBTI adapters
(starts `personamix serve`, opens / in headless Chromium, compare mode: the reference, ENTJ with
SCR and ISFP with token, streamed at once with one seed).

    python bench/playground_screenshot.py [--out docs/playground.png]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadtest import free_port, start_server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "playground.png"))
    ap.add_argument("--url", default=None, help="an already running server (e.g. personamix serve --engine ...)")
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    proc = None
    url = a.url
    if url is None:
        port = free_port()
        proc = start_server(port, max_pending=4)
        url = f"http://127.0.0.1:{port}"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--no-sandbox", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url + "/")
            page.wait_for_selector("#w0-E")
            page.click("#mode-compare")
            page.select_option("#preset-2", "MBTI poles|ISFP")
            page.select_option("#method-2", "token")
            page.fill("#s-max_tokens", "64")
            page.locator("#advanced summary").click()
            page.fill("#s-seed", "3")
            page.click("#go")
            for i in range(3):
                page.wait_for_function(f"document.getElementById('out-{i}').dataset.end !== undefined",
                                       timeout=300_000)
            page.screenshot(path=a.out, full_page=True)
            browser.close()
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
