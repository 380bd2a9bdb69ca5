"""docs/playground.png: the playground on the real default model with the shipped MBTI adapters
(starts `personamix serve`, opens / in headless Chromium, picks ENTJ, generates with SCR).

    python bench/playground_screenshot.py [--out docs/playground.png]
"""
from __future__ import annotations

import argparse
import shutil
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadtest import start_server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "playground.png"))
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(port, max_pending=4)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#w-E")
            page.select_option("#preset", "ENTJ")
            page.fill("#max_tokens", "80")
            page.click("#go")
            page.wait_for_function("document.getElementById('stats').textContent.includes('tok/s')", timeout=300_000)
            page.screenshot(path=a.out, full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
