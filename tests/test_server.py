"""The OpenAI-compatible server, started for real (uvicorn on 127.0.0.1) over a tiny chat model
with two LoRA adapters, driven by the official `openai` client and by raw HTTP."""
import concurrent.futures as cf
import json
import os
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import OpenAI

from personamix import Generator
from personamix.backends.batching import GATHER_WAIT, KEEP_IDLE_S
from personamix.backends.packing import chosen_kernel
from personamix.serving import create_app
from personamix.testing import save_chat_tiny, save_lora

MODEL = "tiny-chat"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    base = save_chat_tiny(root / "base")
    adapters = {name: save_lora(base, root / name, seed=i) for i, name in enumerate(["E", "N"])}
    return Generator.from_pretrained(str(base), adapters=adapters, device="cpu")


@pytest.fixture(scope="module")
def server(gen):
    running = Running(create_app(gen, MODEL, max_pending=8, max_body_bytes=4096))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


EXT = {"persona": "EN", "method": "scr", "k": 3, "window": 10, "gamma": 1.5, "seed": 7}


def test_the_server_trims_the_c_heap_when_the_idle_kv_pool_drops_its_tensors(server, gen):
    """The server trims the C heap when it goes idle; the KV pool drops its tensors keep_idle_s
    later (cache.KVPool), so the server trims again then (the pool's on_drop), or idle RSS stays high."""
    import ctypes.util

    if ctypes.util.find_library("c") is None:
        pytest.skip("no C library to trim here (the server trims glibc's heap only)")
    assert gen.backend.pool.on_drop is not None
    gen.backend.pool.on_drop()                     # malloc_trim(0)


def test_chat_completion_with_extensions(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "what do you like"}],
                                       max_tokens=8, extra_body=EXT)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    ext = r.model_extra["personamix"]
    assert ext["weights"] == {"E": 0.5, "N": 0.5} and ext["seed"] == 7 and ext["stats"]["method"] == "scr"
    assert r.usage.completion_tokens == ext["stats"]["new_tokens"] >= 1


def test_same_seed_same_text_streamed_or_not(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "what do you like"}], max_tokens=10,
              extra_body={**EXT, "weights": {"E": 0.8, "N": -0.3}, "persona": None, "method": "spec"})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].model_extra["personamix"]["stats"]["new_tokens"] == full.usage.completion_tokens


def test_completions_endpoint_and_stream(client):
    r = client.completions.create(model=MODEL, prompt="what do you like", max_tokens=6, extra_body=EXT)
    assert r.object == "text_completion" and r.model_extra["personamix"]["stats"]["new_tokens"] >= 1
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="what do you like", max_tokens=6, stream=True, extra_body=EXT))
    assert streamed == r.choices[0].text


def test_models_health_and_playground(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, f"{MODEL}:E", f"{MODEL}:N"]
    client.completions.create(model=MODEL, prompt="hi", max_tokens=1, extra_body=EXT)   # the counters move
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["backend"] == "batched"   # requests share forwards
    assert health["device"] == "cpu" and health["dtype"] == "float32"
    assert health["linear_kernel"] == chosen_kernel()     # the CPU's prepacked linear layers (packing.py)
    assert health["batching"]["calls"] >= health["batching"]["forwards"]
    assert health["batching"]["row_tokens"] >= health["batching"]["prompt_row_tokens"] > 0
    assert health["batching"]["gather_wait"] == GATHER_WAIT and health["batching"]["waited_s"] >= 0
    assert health["batching"]["kv_keep_idle_s"] == KEEP_IDLE_S and isinstance(health["batching"]["kv_pool_held"], bool)
    assert health["batching"]["turns_taken_over"] >= 0    # on CPU generations take turns (turns.py)
    assert health["batching"]["plain_decoder"] is True       # a Llama: packed forwards skip transformers' Python
    assert health["batching"]["pointwise_ops"] in ("kernel", "torch")   # its norms' and rope's (cpu_pointwise.py)
    assert health["batching"]["cuda_graphs"] is None          # CPU: decoding steps run eagerly
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "personamix playground" in page.text and "/v1/chat/completions" in page.text


def test_repeated_prompts_start_after_their_cached_prefix_and_health_says_so(gen, server, client):
    assert "prefix_cache" not in httpx.get(server.url + "/health").json()     # off unless asked for
    assert gen.backend.cache_prefixes(16)
    try:
        messages = [{"role": "system", "content": "you like long walks and you answer what you like " * 2},
                    {"role": "user", "content": "what do you like"}]
        texts = [client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                                extra_body=EXT).choices[0].message.content for _ in range(2)]
        cache = httpx.get(server.url + "/health").json()["prefix_cache"]
        assert cache["hits"] >= 2 and cache["tokens_saved"] > 0 and 0 < cache["bytes"] <= 16 * 2**20
        assert texts[0] == texts[1]     # same seed; the restored prefix equals the computed one (up to rounding)
    finally:
        gen.backend.cache_prefixes(0)


def test_concurrent_requests_are_independent(client):
    def ask(seed):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "what do you do today"}], max_tokens=12,
            extra_body={"persona": "EN", "method": "token", "seed": seed}).choices[0].message.content

    alone = [ask(s) for s in range(6)]
    with cf.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, range(6)))
    assert together == alone


BAD = [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "NaN is not a JSON value"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, "context"),
    ({"messages": [{"role": "user", "content": "hi"}], "persona": "XQ"}, "persona"),
    ({"messages": [{"role": "user", "content": "hi"}], "weights": {"Z": 1.0}}, "Z"),
    ({"messages": [{"role": "user", "content": "hi"}], "weights": {"E": 0.0, "N": 0.0}}, "weight"),
    ({"messages": [{"role": "user", "content": "hi"}], "weights": {"E": -1.0}}, "positive"),
    ({"messages": [{"role": "user", "content": "hi"}], "method": "beam"}, "method"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "k": 0}, "k"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, "not served"),
    ({"messages": [{"role": "user", "content": "x " * 3000}]}, "exceeds the limit"),
]


@pytest.mark.parametrize("body,needle", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_a_4xx_with_an_openai_error_body(server, body, needle):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert needle.lower() in err["message"].lower() and err["type"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_overfilled_queue_gets_429_with_retry_after_never_a_crash(gen):
    running = Running(create_app(gen, MODEL, max_pending=2))
    try:
        body = {"messages": [{"role": "user", "content": "what do you like"}], "max_tokens": 40,
                "method": "token-rs", "persona": "EN"}

        def post(_):
            return httpx.post(running.url + "/v1/chat/completions", json=body, timeout=60)

        with cf.ThreadPoolExecutor(24) as pool:
            codes = [r.status_code for r in pool.map(post, range(24))]
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
        running.app.state.server.admission.active = 2            # hold both slots: the answer is 429 + Retry-After
        r = post(0)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1" and "busy" in r.json()["error"]["message"]
        running.app.state.server.admission.active = 0
        assert post(0).status_code == 200
    finally:
        running.stop()


def test_client_disconnect_frees_the_work(tmp_path):
    base = save_chat_tiny(tmp_path / "base", hidden=128, layers=4, max_positions=4096)
    slow = Generator.from_pretrained(base, adapters={"E": save_lora(base, tmp_path / "E", seed=0)}, device="cpu")
    running = Running(create_app(slow, MODEL, max_pending=4))
    try:
        body = {"messages": [{"role": "user", "content": "what"}], "max_tokens": 4000, "stream": True,
                "method": "token", "persona": "E", "seed": 1}
        with httpx.stream("POST", running.url + "/v1/chat/completions", json=body, timeout=30) as r:
            next(r.iter_lines())                         # read the first event, then hang up
        deadline = time.time() + 20
        while running.app.state.server.admission.active:
            assert time.time() < deadline, "the disconnected stream still holds its slot"
            time.sleep(0.05)
        assert httpx.get(running.url + "/health").json()["in_flight"] == 0
        assert running.app.state.server.counters.streams_cancelled == 1      # stopped early, not run to 4000 tokens
    finally:
        running.stop()


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() |
                    st.text(max_size=20), lambda inner: st.lists(inner, max_size=3) |
                    st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
FIELDS = st.sampled_from(["messages", "prompt", "max_tokens", "temperature", "top_p", "persona", "weights", "method",
                          "k", "window", "gamma", "seed", "stream", "model", "n", "aggregation", "top_k"])


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 60)), deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.dictionaries(FIELDS, JSON, max_size=6), path=st.sampled_from(["chat/completions", "completions"]))
def test_fuzzed_bodies_never_get_a_5xx(server, body, path):
    body.setdefault("max_tokens", 4)    # json.dumps writes inf/nan as Infinity/NaN, which the server must refuse
    r = httpx.post(f"{server.url}/v1/{path}", content=json.dumps(body), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert r.json()["error"]["message"]


def _asgi_post(app, path: str, body: dict, disconnect_first: bool, spec_version: str) -> list[dict]:
    """POST to the ASGI app directly; the client hangs up right after sending its request
    (`disconnect_first`: before the response has started). Returns what the app sent."""
    import asyncio

    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}
    inbox = [{"type": "http.request", "body": raw, "more_body": False}]
    sent: list[dict] = []

    async def receive():
        if inbox:
            return inbox.pop(0)
        if not disconnect_first:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message):
        if disconnect_first:
            raise OSError("connection reset by peer")      # what a server does with a write to a closed socket
        sent.append(message)

    async def main():
        try:
            await asyncio.wait_for(app(scope, receive, send), timeout=60)
        except Exception:   # the app may surface the disconnect as an error: what matters is what it leaves behind
            pass

    asyncio.run(main())
    return sent


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_a_client_gone_before_its_stream_starts_frees_its_slot(gen, spec_version):
    """The stream's producer never starts (the response body is never iterated), yet the slot is
    released and the generation closed: admission does not leak, and later requests still run."""
    app = create_app(gen, MODEL, max_pending=1)
    body = {"messages": [{"role": "user", "content": "what"}], "max_tokens": 8, "stream": True, "persona": "E"}
    for _ in range(3):
        _asgi_post(app, "/v1/chat/completions", body, disconnect_first=True, spec_version=spec_version)
        assert app.state.server.admission.active == 0
    sent = _asgi_post(app, "/v1/chat/completions", {**body, "stream": False}, disconnect_first=False,
                      spec_version=spec_version)
    assert sent[0]["status"] == 200 and app.state.server.admission.active == 0


def test_settings_endpoint_lists_every_sampling_setting_with_its_limits(server):
    from personamix.engine.params import FIELDS

    body = httpx.get(server.url + "/v1/settings").json()
    names = {s["name"] for s in body["settings"]}
    assert names == (set(FIELDS) - {"max_new_tokens"}) | {"max_tokens"}
    k = next(s for s in body["settings"] if s["name"] == "k")
    assert k["default"] == 4 and k["min"] == 1 and k["max"] == 64 and k["help"]
    assert body["context_length"] == 64 and body["adapters"] == ["E", "N"]


@pytest.mark.parametrize("field,value", [("warmup", 0), ("window", 50_000), ("bound", "exact"), ("max_retries", 3),
                                         ("ignore_eos", True)])
def test_the_server_accepts_what_the_library_accepts(client, field, value):
    """One source of settings: values the library takes are not refused by the server (the old
    server required warmup >= 1 and capped window at 10,000; the library did not)."""
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "what"}], max_tokens=4,
                                       extra_body={"persona": "E", "seed": 1, field: value})
    assert r.model_extra["personamix"]["stats"]["new_tokens"] >= 1


def test_temperature_zero_is_greedy_over_the_api(server, client):
    """OpenAI clients send temperature 0 for deterministic output: the target's argmax (method
    token by default); scr names why it has no greedy form."""
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "what do you like"}], max_tokens=8, temperature=0)
    a = client.chat.completions.create(**kw, extra_body={"persona": "EN", "seed": 1})
    b = client.chat.completions.create(**kw, extra_body={"persona": "EN", "seed": 2, "method": "spec"})
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.model_extra["personamix"]["stats"]["method"] == "token"
    r = httpx.post(server.url + "/v1/chat/completions", json={**kw, "method": "scr"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert "greedy" in r.json()["error"]["message"]


def test_a_stream_gives_back_its_slot_before_its_client_reads_done(gen):
    """A client that sends its next request the moment it reads [DONE] (one kept-alive connection,
    as a load generator or a chat UI does) is admitted: the finished stream's slot is free by then."""
    running = Running(create_app(gen, MODEL, max_pending=1))
    try:
        body = {"messages": [{"role": "user", "content": "what do you like"}], "max_tokens": 6, "stream": True,
                "method": "scr", "persona": "EN"}
        codes = []
        with httpx.Client(base_url=running.url, timeout=60) as http:
            for seed in range(40):
                with http.stream("POST", "/v1/chat/completions", json={**body, "seed": seed}) as r:
                    codes.append(r.status_code)
                    lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                assert r.status_code != 200 or lines[-1] == "data: [DONE]"
                assert running.app.state.server.admission.active == 0     # freed before [DONE] was sent
        assert codes == [200] * 40, codes
    finally:
        running.stop()
