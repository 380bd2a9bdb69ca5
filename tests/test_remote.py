"""The remote backend against a real vLLM server (the CPU build, in its own venv: `make vllm`),
serving the default model with the shipped E, N, T, J adapters as LoRA modules.

The venv is built once per machine (<cache>/vllm-venv) the first time these tests run; where it
cannot be built they are skipped with the reason. Two servers are started: `engine` is shared and
never disturbed; `doomed` is stalled (SIGSTOP) and killed by the fault tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI
from test_server import Running

from personamix import Generator, PersonamixError
from personamix.adapters import shipped_adapters
from personamix.backends.remote import RemoteBackend
from personamix.backends.vllm_engine import VllmEngine
from personamix.engine.session import Session
from personamix.errors import EngineTimeout, EngineUnreachable
from personamix.loading import DEFAULT_MODEL, resolve_model
from personamix.serving import create_app
from personamix.testing import VllmServer, save_chat_tiny, vllm_python

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ("E", "N", "T", "J")
PROMPT = "How do you spend a free Saturday?"


def _vllm_or_skip() -> None:
    if vllm_python().is_file():
        return
    done = subprocess.run(["make", "-s", "vllm"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0 or not vllm_python().is_file():
        why = f"the vLLM venv could not be built here (`make vllm`): {(done.stderr or done.stdout)[-500:]}"
        if os.environ.get("PERSONAMIX_REQUIRE_VLLM") == "1":    # .ci/run sets it: CI must run these tests
            pytest.fail(why)
        pytest.skip(why)


def _server(**kw) -> VllmServer:
    _vllm_or_skip()
    adapters = {n: p for n, p in shipped_adapters("mbti").items() if n in ADAPTERS}
    return VllmServer(resolve_model(DEFAULT_MODEL), DEFAULT_MODEL, adapters, **kw).start()


@pytest.fixture(scope="module")
def engine():
    """A vLLM server that returns whole distributions too (--max-logprobs -1), for token / spec."""
    server = _server(max_logprobs=-1)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def remote(engine):
    return Generator.from_engine(engine.url, list(ADAPTERS), timeout=120)


@pytest.fixture(scope="module")
def local():
    return Generator.from_pretrained(DEFAULT_MODEL, adapters="mbti", backend="lora", device="cpu")


def test_the_engine_is_described(remote, engine):
    info = remote.backend.client.info
    assert info.base == DEFAULT_MODEL and set(ADAPTERS) <= set(info.adapters)
    assert info.max_length == 2048 and info.full_distributions
    assert remote.adapter_names == ADAPTERS and remote.backend.kind == "remote"


def test_remote_scores_equal_the_local_models_log_probs(remote, local):
    """Prompt log-probs (a drafted chunk under each adapter), next-token log-probs and whole
    distributions from the engine equal PEFT's in this process on the same token ids."""
    ids = local.encode(PROMPT)
    chunk = local.generate(ids, method="base", max_new_tokens=6, seed=3, ignore_eos=True).token_ids
    seq = ids + chunk
    logits = Session(local.backend, list(ADAPTERS)).logits("all", seq, len(chunk) + 1)   # [5, 7, V]
    logp = torch.log_softmax(logits.float(), -1)
    want = logp[:, :-1].gather(-1, torch.tensor(chunk).view(1, -1, 1).expand(5, -1, 1)).squeeze(-1)  # [5, 6]
    client = remote.backend.client
    got = torch.tensor([client.prompt_logprobs(m, seq, len(chunk)) for m in (DEFAULT_MODEL, *ADAPTERS)])
    assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
    tokens = [int(t) for t in logp[1, -1].topk(5).indices]
    nxt = torch.tensor(client.next_logprobs("E", seq, tokens))
    assert torch.allclose(nxt, logp[1, -1, tokens], atol=1e-3)
    dist = client.next_distribution("N", seq)
    assert dist.shape[0] >= len(local.tokenizer) and torch.allclose(dist[: logp.shape[-1]], logp[2, -1], atol=1e-3)


@pytest.mark.parametrize("method", ["scr", "token-rs", "base"])
def test_methods_generate_over_the_engine_with_stats(remote, method):
    kw = {} if method == "base" else {"persona": "EN"}
    a = remote.generate(PROMPT, method=method, max_new_tokens=20, seed=7, ignore_eos=True, **kw)
    b = remote.generate(PROMPT, method=method, max_new_tokens=20, seed=7, ignore_eos=True, **kw)
    assert len(a.token_ids) == 20 and a.text.strip()
    # seeded: the engine samples with seeds drawn from ours; calls that share the engine's batches may
    # round differently (as in any batched engine), so later tokens can differ, the first cannot
    assert a.token_ids[0] == b.token_ids[0]
    if method == "base":
        assert a.token_ids == b.token_ids       # one call at a time: the same batches
    st = a.stats
    assert st.round_trips > 0 and st.forward_passes >= st.round_trips
    if method != "base":
        assert 0 < st.accepted <= st.proposals
    if method == "scr":
        assert sum(st.chunks_proposed.values()) > 0 and st.round_trips < 20     # chunks: fewer trips than tokens
    if method == "token-rs":
        assert st.round_trips >= 2 * 20                                          # propose, then score, per token


def test_exact_methods_use_whole_distributions_and_match_local(remote, local):
    """token / spec / temperature-0 token-rs read whole distributions; greedy decoding over the
    engine gives the tokens it gives here."""
    kw = dict(persona="EN", max_new_tokens=8, temperature=0, ignore_eos=True)
    want = local.generate(PROMPT, method="token", **kw).token_ids
    for method in ("token", "spec", "token-rs"):
        assert remote.generate(PROMPT, method=method, **kw).token_ids == want, method
    sampled = remote.generate(PROMPT, method="spec", persona="EN", max_new_tokens=8, seed=1, temperature=0.8,
                              ignore_eos=True)
    assert len(sampled.token_ids) == 8


def test_what_an_engine_cannot_do_is_refused_with_the_reason(remote, engine):
    with pytest.raises(PersonamixError, match="temperature 1, top_k 0 and top_p 1"):
        remote.generate(PROMPT, method="scr", persona="EN", temperature=0.7)
    with pytest.raises(PersonamixError, match="temperature 1, top_k 0 and top_p 1"):
        remote.generate(PROMPT, method="token-rs", persona="EN", top_p=0.9)
    assert remote.generate(PROMPT, method="base", temperature=0.7, top_p=0.9, max_new_tokens=4).token_ids
    client = VllmEngine(engine.url)
    plain = RemoteBackend(client, ["E"], remote.backend.vocab_size)
    plain.client.info = replace(client.info, full_distributions=False)     # an engine without --max-logprobs -1
    plain.full_distributions = False
    gen = Generator(plain, remote.tokenizer, sorted(remote.eos_token_ids))
    for method in ("token", "spec"):
        with pytest.raises(PersonamixError, match="--max-logprobs -1"):
            gen.generate(PROMPT, method=method, persona="E")
    with pytest.raises(PersonamixError, match="does not serve adapter.*serves E, N, T, J"):
        Generator.from_engine(engine.url, ["E", "X"])
    plain.close()


def test_mismatched_tokenizer_and_unreachable_engine_are_clear_errors(engine, tmp_path):
    other = save_chat_tiny(tmp_path / "tiny")
    with pytest.raises(PersonamixError, match="does not match the engine's"):
        Generator.from_engine(engine.url, ["E"], tokenizer=other)
    with socket_port() as port:
        start = time.time()
        with pytest.raises(EngineUnreachable, match="cannot reach the engine"):
            Generator.from_engine(f"http://127.0.0.1:{port}/v1", timeout=2, retries=1)
        assert time.time() - start < 10
    with pytest.raises(PersonamixError, match="http://"):
        Generator.from_engine("127.0.0.1:8000")


class socket_port:
    """A local port with nothing listening on it."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        return None


def test_cli_generate_over_the_engine(engine, capsys):
    from personamix.cli import main

    argv = ["generate", PROMPT, "--engine", engine.url, "--engine-adapters", "E,N", "--persona", "EN",
            "--method", "scr", "--max-new-tokens", "12", "--seed", "1", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) >= 1 and out["stats"]["method"] == "scr" and out["stats"]["round_trips"] > 0
    assert main(argv[:-1] + ["--stats"]) == 0
    assert "round trips/token" in capsys.readouterr().err
    assert main(["generate", "hi", "--engine", engine.url, "--method", "token", "--persona", "E",
                 "--temperature", "0.5", "--adapter", "E=x"]) == 2
    assert "--engine-adapters" in capsys.readouterr().err


def test_serve_over_the_engine(engine):

    running = Running(create_app(Generator.from_engine(engine.url, ["E", "N"]), DEFAULT_MODEL))
    try:
        client = OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=12, extra_body={"persona": "EN", "method": "scr", "seed": 2})
        assert r.choices[0].message.content and r.model_extra["personamix"]["stats"]["round_trips"] > 0
        chunks = list(client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=12, stream=True,
            extra_body={"persona": "EN", "method": "scr", "seed": 2}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks).strip()
        assert chunks[-1].model_extra["personamix"]["stats"]["new_tokens"] >= 1
        health = httpx.get(running.url + "/health").json()
        assert health["backend"] == "remote" and health["engine"]["ok"] and health["engine"]["calls"] > 0
    finally:
        running.stop()


@pytest.fixture(scope="module")
def doomed():
    """A second server, stalled and then killed by the fault tests."""
    server = _server()
    yield server
    server.stop()


def test_a_stalled_engine_ends_the_generation_within_the_bound(doomed):
    gen = Generator.from_engine(doomed.url, ["E", "N"], timeout=3, retries=1)
    running = Running(create_app(gen, DEFAULT_MODEL))
    try:
        assert gen.generate(PROMPT, persona="EN", max_new_tokens=4, seed=0).token_ids
        doomed.pause()
        start = time.time()
        with pytest.raises(EngineTimeout, match="did not answer"):
            gen.generate(PROMPT, persona="EN", max_new_tokens=8, seed=0)
        assert time.time() - start < 2 * 3 + 5                   # (retries + 1) x timeout + backoff
        r = httpx.post(running.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "persona": "EN", "method": "scr"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "engine_timeout"
        health = httpx.get(running.url + "/health", timeout=30)
        assert health.status_code == 503 and not health.json()["engine"]["ok"]
        doomed.resume()
        assert gen.generate(PROMPT, persona="EN", max_new_tokens=4, seed=0).token_ids   # back to work
    finally:
        doomed.resume()
        running.stop()


def test_a_killed_engine_ends_streams_with_an_error_and_the_front_goes_on(doomed):

    gen = Generator.from_engine(doomed.url, ["E", "N"], timeout=5, retries=1)
    running = Running(create_app(gen, DEFAULT_MODEL))
    try:
        client = OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        events: list = []

        def stream():
            try:
                for c in client.chat.completions.create(
                        model=DEFAULT_MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=400,
                        stream=True, extra_body={"persona": "EN", "method": "token-rs", "ignore_eos": True}):
                    events.append(c)
            except Exception as e:   # the stream's error event surfaces as an APIError in the client
                events.append(e)

        worker = threading.Thread(target=stream)
        worker.start()
        deadline = time.time() + 120
        while len(events) < 3:
            assert time.time() < deadline, "the stream did not start"
            time.sleep(0.2)
        doomed.kill()
        worker.join(timeout=60)
        assert not worker.is_alive() and isinstance(events[-1], Exception)
        assert "cannot reach the engine" in str(events[-1]) or "engine" in str(events[-1]).lower()
        r = httpx.post(running.url + "/v1/completions", timeout=60, json={"prompt": "hi", "max_tokens": 4,
                                                                           "persona": "E", "method": "scr"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unreachable"
        assert httpx.get(running.url + "/v1/models").status_code == 200   # the front itself still answers
    finally:
        running.stop()


def test_the_engines_own_tokenizer_when_none_is_at_hand(remote, local):
    """Without a local tokenizer the engine's /tokenize and /detokenize do the work: the same ids
    and text as the local tokenizer, and a generation through them."""
    from personamix.backends.remote import EngineTokenizer

    client = remote.backend.client
    tok = EngineTokenizer(client, sorted(remote.eos_token_ids))
    messages = [{"role": "user", "content": PROMPT}]
    assert tok.apply_chat_template(messages) == local.encode(messages)
    assert tok("plain text")["input_ids"] == local.tokenizer("plain text")["input_ids"]
    ids = local.encode(PROMPT)[:12]
    assert tok.decode(ids) == local.tokenizer.decode(ids, skip_special_tokens=False)
    gen = Generator(remote.backend, tok, sorted(remote.eos_token_ids))
    r = gen.generate(PROMPT, method="base", max_new_tokens=6, seed=0, ignore_eos=True)
    assert len(r.token_ids) == 6 and r.text == local.tokenizer.decode(r.token_ids, skip_special_tokens=False)
