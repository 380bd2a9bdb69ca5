"""The playground page end to end in headless Chromium (Debian's package, driven by Playwright):
first load on a preset, zero weights, compare mode with three columns streaming at once, a chat
of two turns, an invalid setting shown beside its control, copy as code, a busy server (429) and
a server that went away, each with a retry."""
import json
import shutil

import httpx
import pytest
from test_server import MODEL, Running

from personamix import Generator
from personamix.serving import create_app
from personamix.testing import save_chat_tiny, save_lora

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed "
                                                         "(.ci/run installs it)")
TIMEOUT = 60_000


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    root = tmp_path_factory.mktemp("playground")
    base = save_chat_tiny(root / "base", max_positions=512)
    adapters = {name: save_lora(base, root / name, seed=i) for i, name in enumerate("ENTJ")}
    return Generator.from_pretrained(base, adapters=adapters, device="cpu")


@pytest.fixture(scope="module")
def server(gen):
    running = Running(create_app(gen, MODEL, max_pending=8))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                               "--disable-background-networking"])
        yield b
        b.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url + "/")
    page.wait_for_selector("#w0-E")
    return page


def wait_done(page, i=0):
    page.wait_for_function(f"document.getElementById('out-{i}').dataset.end !== undefined", timeout=TIMEOUT)


def ignore_eos(page):
    """Answers of exactly max_tokens: the tiny model's end-of-sequence token is 1 of its 17 words, so a
    random seed ends some answers at their first token (tested on its own below)."""
    page.locator("#advanced summary").click()
    page.check("#s-ignore_eos")


def test_first_load_is_a_preset_that_answers(server, browser):
    page = open_page(browser, server.url)
    assert page.locator("#preset-0").input_value() == "MBTI poles|ENTJ"      # opens on a preset, not on zeros
    assert page.locator("#v0-E").inner_text() == "0.25" and page.locator("#v0-J").inner_text() == "0.25"
    assert page.locator("#w0-E").get_attribute("data-adapter") == "E"
    assert "MBTI poles" in page.locator("#persona-0").inner_text()            # sliders grouped by adapter set
    page.fill("#s-max_tokens", "12")
    ignore_eos(page)
    page.click("#go")
    wait_done(page)
    assert page.locator("#out-0").inner_text().strip() and "Error" not in page.locator("#out-0").inner_text()
    stats = page.locator("#stats-0").inner_text()
    assert "scr: 12 tokens" in stats and "tok/s" in stats and "acceptance" in stats and "forwards/token" in stats
    page.close()


def test_an_answer_that_ends_at_once_says_so(server, browser):
    page = open_page(browser, server.url)
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/completions") else None)
    page.fill("#s-max_tokens", "4")
    page.click("#go")
    wait_done(page)
    # the page's own request, sent again with seeds until one answer is empty and one is not
    body = {**bodies[0], "stream": False}
    answers = {}
    for seed in range(200):
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "seed": seed}, timeout=30).json()
        answers[seed] = r["choices"][0]["message"]["content"]
        if "" in answers.values() and any(answers.values()):
            break
    assert "" in answers.values() and any(answers.values()), f"seeds 0..199 never gave both: {answers}"
    empty, text = (min(s for s, a in answers.items() if bool(a) == b) for b in (False, True))
    page.locator("#advanced summary").click()
    page.fill("#s-seed", str(empty))
    page.click("#go")
    wait_done(page)
    out = page.locator("#out-0")
    assert "no text: the model ended this answer" in out.inner_text() and "empty" in out.get_attribute("class")
    assert "Error" not in out.inner_text() and "scr:" in page.locator("#stats-0").inner_text()
    page.fill("#s-seed", str(text))                           # a seed that gave text: the note goes away
    page.click("#go")
    wait_done(page)
    assert "no text" not in out.inner_text() and "empty" not in out.get_attribute("class")
    page.close()


def test_zero_weights_run_the_reference_and_say_so(server, browser):
    page = open_page(browser, server.url)
    for a in "ENTJ":
        page.locator(f"#w0-{a}").fill("0")
    page.fill("#s-max_tokens", "8")
    page.click("#go")
    wait_done(page)
    assert "reference alone" in page.locator("#notice").inner_text()
    assert "base:" in page.locator("#stats-0").inner_text() and "Error" not in page.locator("#out-0").inner_text()
    page.close()


def test_compare_mode_streams_three_columns_at_once_with_one_seed(server, browser):
    page = open_page(browser, server.url)
    page.click("#mode-compare")
    assert all(page.locator(f"#col-{i}").is_visible() for i in range(3))
    page.select_option("#method-2", "token")
    page.select_option("#aggregation-2", "geometric")
    page.fill("#s-max_tokens", "40")
    ignore_eos(page)
    page.click("#go")
    for i in range(3):
        wait_done(page, i)
    times = page.evaluate("[0, 1, 2].map(i => { const d = document.getElementById('out-' + i).dataset;"
                          " return [Number(d.start), Number(d.end)]; })")
    assert max(s for s, _ in times) < min(e for _, e in times)            # all three were in flight together
    stats = [page.locator(f"#stats-{i}").inner_text() for i in range(3)]
    assert stats[0].startswith("base:") and stats[1].startswith("scr:") and stats[2].startswith("token:")
    seeds = {s.split("seed ")[1].split(",")[0] for s in stats}
    assert len(seeds) == 1 and "seed" in page.locator("#notice").inner_text()
    assert all(page.locator(f"#out-{i}").inner_text().strip() for i in range(3))
    page.close()


def test_chat_keeps_the_conversation_over_two_turns(server, browser):
    page = open_page(browser, server.url)
    bodies = []
    def record(request):
        if request.url.endswith("/chat/completions"):
            bodies.append(json.loads(request.post_data))

    page.on("request", record)
    page.click("#mode-chat")
    page.fill("#s-max_tokens", "10")
    ignore_eos(page)
    for turn, text in enumerate(["what do you like", "what do you do today"]):
        page.fill("#chat-input", text)
        page.click("#go")
        page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length === {turn + 1} && "
                               "!document.getElementById('go').disabled", timeout=TIMEOUT)
    assert page.locator(".msg.user").count() == 2 and page.locator(".msg.assistant").count() == 2
    assert [m["role"] for m in bodies[1]["messages"]] == ["user", "assistant", "user"]
    assert bodies[1]["messages"][1]["content"] == page.locator(".msg.assistant .text").first.inner_text()
    assert bodies[1]["weights"] == {"E": 0.25, "N": 0.25, "T": 0.25, "J": 0.25}
    page.close()


def test_an_invalid_setting_is_shown_beside_its_control(server, browser):
    page = open_page(browser, server.url)
    page.locator("#advanced summary").click()
    page.fill("#s-k", "0")
    page.click("#go")
    wait_done(page)
    assert "Error" in page.locator("#out-0").inner_text()
    assert "k (chunk size) must be" in page.locator("#err-k").inner_text()
    page.fill("#s-k", "4")
    page.fill("#s-max_tokens", "6")
    page.click("#go")
    wait_done(page)
    assert page.locator("#err-k").inner_text() == "" and "Error" not in page.locator("#out-0").inner_text()
    page.close()


def test_copy_as_code(server, browser):
    page = open_page(browser, server.url)
    page.locator("#code summary").click()
    page.click("#code-curl")
    curl = page.locator("#code-text").inner_text()
    assert curl.startswith("curl ") and '"weights":{"E":0.25' in curl and "/v1/chat/completions" in curl
    page.click("#code-python")
    python = page.locator("#code-text").inner_text()
    assert "from openai import OpenAI" in python and "extra_body=" in python and '"method": "scr"' in python
    page.click("#code-personamix")
    lib = page.locator("#code-text").inner_text()
    assert "Generator.from_pretrained" in lib and "max_new_tokens=96" in lib and 'weights={"E": 0.25' in lib
    page.close()


def test_a_busy_server_and_a_dead_one_are_told_plainly_with_a_retry(gen, browser):
    running = Running(create_app(gen, MODEL, max_pending=1))
    page = open_page(browser, running.url)
    page.fill("#s-max_tokens", "6")
    admission = running.app.state.server.admission
    admission.active = 1                                       # the only slot is taken
    page.click("#go")
    wait_done(page)
    assert "busy (429)" in page.locator("#out-0").inner_text() and page.locator("#retry").is_visible()
    admission.active = 0
    page.click("#retry")
    wait_done(page)
    assert "Error" not in page.locator("#out-0").inner_text() and not page.locator("#retry").is_visible()
    running.stop()
    page.click("#go")
    wait_done(page)
    assert "Connection failed" in page.locator("#out-0").inner_text() and page.locator("#retry").is_visible()
    page.close()
