"""The Generator API: shapes, determinism, streaming, stats, EOS, and bad input."""

import pytest

from personamix import Generator, PersonamixError, SamplingParams
from personamix.engine.draws import RS_BLOCK
from personamix.engine.session import Backend, Session
from personamix.engine.targets import Target, log_probs, token_target

PROMPT = [0, 1, 2]
METHODS = ["base", "token", "token-rs", "scr", "spec"]


def kw_for(method):
    return {} if method == "base" else {"persona": "EN"}


@pytest.mark.parametrize("method", METHODS)
def test_generate_shape_and_determinism(tiny_gen, method):
    a = tiny_gen.generate(PROMPT, method=method, max_new_tokens=20, seed=7, ignore_eos=True, **kw_for(method))
    b = tiny_gen.generate(PROMPT, method=method, max_new_tokens=20, seed=7, ignore_eos=True, **kw_for(method))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20
    assert all(0 <= t < 5 for t in a.token_ids)
    assert a.text == tiny_gen.tokenizer.decode(a.token_ids, skip_special_tokens=True)
    assert a.finish_reason == "length" and a.prompt_ids == PROMPT
    assert a.stats.new_tokens == 20 and a.stats.forward_passes > 0
    d = a.stats.to_dict()
    assert d["method"] == method and d["tokens_per_s"] > 0
    if method != "base":
        assert a.weights == {"E": 0.5, "N": 0.5}
    unseeded = tiny_gen.generate(PROMPT, method=method, max_new_tokens=20, ignore_eos=True, **kw_for(method))
    again = tiny_gen.generate(PROMPT, method=method, max_new_tokens=20, ignore_eos=True, seed=unseeded.seed,
                              **kw_for(method))
    assert again.token_ids == unseeded.token_ids                 # the drawn seed reproduces the run
    others = {tuple(tiny_gen.generate(PROMPT, method=method, max_new_tokens=20, seed=s, ignore_eos=True,
                                      **kw_for(method)).token_ids) for s in range(4)}
    assert len(others) > 1                                      # the seed matters


@pytest.mark.parametrize("method", METHODS)
def test_stream_yields_the_generated_text(tiny_gen, method):
    stream = tiny_gen.stream("a b c", method=method, max_new_tokens=15, seed=1, ignore_eos=True, **kw_for(method))
    pieces = list(stream)
    full = tiny_gen.generate("a b c", method=method, max_new_tokens=15, seed=1, ignore_eos=True, **kw_for(method))
    assert "".join(pieces) == full.text and stream.result.token_ids == full.token_ids


def test_scr_stats_are_consistent(tiny_gen):
    r = tiny_gen.generate(PROMPT, method="scr", persona="ENT", max_new_tokens=60, seed=0, ignore_eos=True,
                          k=3, warmup=2)
    st = r.stats
    assert st.warmup_chunks == 2
    assert sum(st.chunks_accepted.values()) <= sum(st.chunks_proposed.values())
    assert 0 <= st.accepted <= st.proposals
    assert st.chunks_proposed[3] >= st.chunks_proposed[2] >= st.chunks_proposed[1]
    # every step emits >= 1 token and costs k reference forwards + 1 scoring forward
    assert st.forward_passes <= 4 * 60
    assert "acceptance" in st.summary()


def test_spec_accepts_everything_when_target_is_reference(tiny_dir):
    """Adapters identical to the reference (a zero LoRA): every draft token must pass."""
    import tempfile

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base, _ = tiny_dir
    out = tempfile.mkdtemp()
    zero = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"]))
    zero.save_pretrained(out)
    gen = Generator.from_pretrained(str(base), adapters={"E": out}, device="cpu")
    r = gen.generate(PROMPT, method="spec", persona="E", max_new_tokens=30, seed=0, ignore_eos=True)
    assert r.stats.accepted == r.stats.proposals
    r = gen.generate(PROMPT, method="token-rs", persona="E", max_new_tokens=30, seed=0, ignore_eos=True)
    assert r.stats.accepted == r.stats.proposals == 30


def test_eos_ends_generation(tiny_gen):
    eos_gen = Generator(tiny_gen.backend, tiny_gen.tokenizer, eos_token_ids=[3])
    for method in METHODS:
        r = eos_gen.generate(PROMPT, method=method, max_new_tokens=60, seed=0, **kw_for(method))
        assert r.finish_reason == "stop" and 3 not in r.token_ids and len(r.token_ids) < 60


@pytest.mark.parametrize("retries", [4, 40])
def test_acceptance_collapse_ends_within_the_retry_bound(tiny_gen, retries):
    """A target far from the reference: Token-RS hits its retry bound and falls back to an
    exact draw instead of looping; SCR still emits a token per step. With more retries than the
    backend's first block (draws.RS_BLOCK) the sampler tries the rest itself."""
    weights = {"E": 40.0, "N": -40.0}
    r = tiny_gen.generate(PROMPT, method="token-rs", weights=weights, aggregation="geometric",
                          max_new_tokens=10, seed=0, max_retries=retries, ignore_eos=True)
    assert len(r.token_ids) == 10 and r.stats.rs_exhausted > 0 and r.stats.proposals <= 10 * retries
    if retries > RS_BLOCK:
        assert r.stats.proposals > RS_BLOCK * r.stats.rs_exhausted
    r = tiny_gen.generate(PROMPT, method="scr", weights=weights, aggregation="geometric",
                          max_new_tokens=10, seed=0, max_retries=4, ignore_eos=True)
    assert len(r.token_ids) == 10


def test_negative_weights_count_clamps(tiny_gen):
    r = tiny_gen.generate(PROMPT, method="token-rs", weights={"E": 1.0, "N": -1.0}, max_new_tokens=40,
                          seed=0, ignore_eos=True)
    assert r.stats.clamps > 0


@pytest.mark.parametrize("method,greedy", [("token", False), ("token", True), ("token-rs", False),
                                           ("token-rs", True), ("scr", False), ("spec", False), ("spec", True)])
def test_every_method_counts_clamps_where_the_target_can_clamp(tiny_gen, method, greedy):
    """The samplers read clamps back only where the target can clamp (Target.can_clamp). With
    alpha = (1e-9, -1) every continuation is clamped (sum_i alpha_i r_i < 0 wherever r_E < 1e9 r_N),
    so p* is the reference and every token emitted was clamped: each method counts at least
    those; with non-negative weights nothing is."""
    kw = dict(max_new_tokens=12, ignore_eos=True, temperature=0.0 if greedy else 1.0, seed=0)
    r = tiny_gen.generate(PROMPT, method=method, weights={"E": 1e-9, "N": -1.0}, **kw)
    assert r.stats.clamps >= len(r.token_ids) == 12
    assert tiny_gen.generate(PROMPT, method=method, weights={"E": 1.0, "N": 0.5}, **kw).stats.clamps == 0


def test_top_k_restricts_every_method(tiny_gen):
    for method in METHODS:
        r = tiny_gen.generate(PROMPT, method=method, max_new_tokens=8, seed=2, top_k=1, ignore_eos=True,
                              **kw_for(method))
        # top_k=1 leaves the reference's argmax only: greedy decoding of the reference
        seq = list(PROMPT)
        for t in r.token_ids:
            assert t == int(Session(tiny_gen.backend).logits("ref", seq)[0, -1].argmax())
            seq.append(t)


def test_text_prompt_without_chat_template(tiny_gen):
    r = tiny_gen.generate("a b c", method="token", persona="E", max_new_tokens=3, seed=0)
    assert r.prompt_ids == [0, 1, 2]


@pytest.mark.parametrize("kwargs,msg", [
    ({"persona": "entj"}, "uppercase"),
    ({"persona": "EQ"}, "unknown persona letter"),
    ({"persona": "ENTJ"}, "needs adapter"),
    ({"weights": {"E": 0.0, "N": 0.0}}, "all zero"),
    ({"weights": {"E": -1.0}}, "positive weight"),
    ({"weights": {"X": 1.0}}, "unknown adapter"),
    ({"weights": {"E": "a lot"}}, "must be a number"),
    ({"persona": "E", "weights": {"E": 1.0}}, "either persona"),
    ({"method": "beam"}, "unknown method"),
    ({"aggregation": "max"}, "aggregation"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 1000}, "context"),
    ({"k": 0}, "chunk size"),
    ({"k": 2.5}, "chunk size"),
    ({"window": 0}, "window"),
    ({"gamma": 0.5}, "gamma"),
    ({"warmup": -1}, "warmup"),
    ({"bound": "loose"}, "bound"),
    ({"max_retries": 0}, "max_retries"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 0.0, "method": "scr"}, "greedy decoding.*not defined for method 'scr'"),
    ({"top_k": True}, "top_k"),
    ({"beam_width": 4}, "unknown setting"),
    ({"top_p": 2.0}, "top_p"),
    ({"seed": -3}, "seed"),
    ({"method": "base", "persona": "E"}, "no persona"),
])
def test_bad_settings_are_clear_errors(tiny_gen, kwargs, msg):
    with pytest.raises(PersonamixError, match=msg):
        tiny_gen.generate(PROMPT, **kwargs)


@pytest.mark.parametrize("prompt,msg", [
    ([], "empty"),
    ([0, 99], "outside the vocabulary"),
    ([0, -1], "outside the vocabulary"),
    ([0, 1.5], "token ids"),
    (12, "prompt must be"),
    ([{"role": "user"}], "chat template"),
    ([0] * 64, "context"),
])
def test_bad_prompts_are_clear_errors(tiny_gen, prompt, msg):
    with pytest.raises(PersonamixError, match=msg):
        tiny_gen.generate(prompt, persona="E")


def test_generation_up_to_the_context_end(tiny_gen):
    """Drafts never run past the context: the last tokens of a full context still work."""
    prompt = [1] * 50
    for method in ("scr", "spec"):
        r = tiny_gen.generate(prompt, method=method, persona="E", max_new_tokens=14, k=8, seed=0, ignore_eos=True)
        assert len(r.token_ids) == 14


def test_no_adapters_means_base_only(tiny_dir):
    base, _ = tiny_dir
    gen = Generator.from_pretrained(str(base), device="cpu")
    assert len(gen.generate(PROMPT, method="base", max_new_tokens=5, seed=0, ignore_eos=True).token_ids) == 5
    with pytest.raises(PersonamixError, match="no preference models"):
        gen.generate(PROMPT, method="scr", persona="E")


def test_unused_adapters_are_not_scored(tiny_gen):
    """persona="E" with three adapters loaded: only the E row is in the forwards."""
    spy = Recording(tiny_gen.backend)
    Generator(spy, tiny_gen.tokenizer).generate(PROMPT, method="token", persona="E", max_new_tokens=3, seed=0)
    assert spy.fed and all(names == ("E",) for _, _, names in spy.fed)


def test_closing_a_stream_early_stops_the_sampler(tiny_gen):
    stream = tiny_gen.stream(PROMPT, method="spec", persona="E", max_new_tokens=40, seed=0, ignore_eos=True)
    next(stream)
    committed = list(stream.token_ids)
    stream.close()
    list(stream)                                    # nothing more is generated after close()
    assert stream.token_ids == committed and stream.stats.new_tokens == len(committed) < 40


def test_concurrent_generations_are_independent(tiny_gen):
    """Threads sharing one Generator get the same output as running alone (per-seed)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [dict(method=m, persona=p, seed=s, max_new_tokens=25, ignore_eos=True)
            for m, p, s in [("token", "E", 1), ("spec", "N", 2), ("scr", "ET", 3), ("token-rs", "NT", 4)] * 2]
    alone = [tiny_gen.generate(PROMPT, **kw).token_ids for kw in jobs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda kw: tiny_gen.generate(PROMPT, **kw).token_ids, jobs))
    assert together == alone


@pytest.mark.parametrize("method", METHODS)
def test_prefix_is_never_recomputed(tiny_gen, method):
    """After the prompt, no forward feeds more than a chunk (+ the pending token): the KV caches
    are reused across steps and rolled back, never rebuilt from the prefix. Every way a sampler
    reaches the model is recorded (on the batched backend SCR scores a chunk and takes the next
    draft step in one `forward_together`)."""
    spy = Recording(tiny_gen.backend)
    Generator(spy, tiny_gen.tokenizer).generate([0, 1, 2, 3, 4, 0, 1, 2], method=method, max_new_tokens=40, seed=0,
                                                ignore_eos=True, k=3, **kw_for(method))
    if method == "scr":
        assert spy.together > 0, "the fused scoring path was not taken"
    first_per_group = {}
    for i, (group, _, _) in enumerate(spy.fed):
        first_per_group.setdefault(group, i)
    later = [n for i, (group, n, _) in enumerate(spy.fed) if i != first_per_group[group]]
    assert later and max(later) <= 3 + 1


class Recording(Backend):
    """A backend that runs another one and records what every forward feeds: (group, number of
    new tokens, preference models) per call, whether it came through forward or forward_together."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.names, self.vocab_size = inner.names, inner.vocab_size
        self.max_length, self.device = inner.max_length, inner.device
        self.fuses_groups = inner.fuses_groups
        self.fed: list[tuple[str, int, tuple[str, ...]]] = []
        self.together = 0

    def new_cache(self, group, names):
        return self.inner.new_cache(group, names)

    def crop(self, cache, n_remove):
        self.inner.crop(cache, n_remove)

    def forward(self, group, tokens, cache, n_logits, names):
        self.fed.append((group, tokens.numel(), tuple(names)))
        return self.inner.forward(group, tokens, cache, n_logits, names)

    def forward_together(self, calls, names):
        self.together += 1
        self.fed += [(group, tokens.numel(), tuple(names)) for group, tokens, _, _ in calls]
        return self.inner.forward_together(calls, names)


def test_temperature_zero_is_greedy_decoding_of_the_target(tiny_gen):
    """temperature=0: every exact method takes argmax_t p*(t|Y) at every step (so they agree token
    for token), `base` the reference's argmax; without a method it is `token`; the seed is moot."""
    weights = {"E": 1.0, "N": -0.5, "T": 0.3}
    runs = {m: tiny_gen.generate(PROMPT, method=m, weights=weights, temperature=0, max_new_tokens=12, seed=s,
                                 ignore_eos=True, k=3) for s, m in enumerate(["token", "token-rs", "spec"])}
    default = tiny_gen.generate(PROMPT, weights=weights, temperature=0, max_new_tokens=12, seed=9, ignore_eos=True)
    assert default.stats.method == "token"
    target = Target(tuple(weights), tuple(weights.values()))
    seq, session = list(PROMPT), Session(tiny_gen.backend, tuple(weights))
    for _ in range(12):
        seq.append(int(token_target(log_probs(session.logits("all", seq)[:, -1], target), target)[0].argmax()))
    want = seq[len(PROMPT):]
    assert {m: r.token_ids for m, r in runs.items()} == {m: want for m in runs} and default.token_ids == want
    assert runs["spec"].stats.accepted > 0                      # drafts that agree with the target are kept
    sampled = {tuple(tiny_gen.generate(PROMPT, method="token", weights=weights, max_new_tokens=12, seed=s,
                                       ignore_eos=True).token_ids) for s in range(4)}
    assert sampled != {tuple(want)}                             # at temperature 1 the seed matters
    base = tiny_gen.generate(PROMPT, method="base", temperature=0, max_new_tokens=6, ignore_eos=True)
    seq = list(PROMPT)
    for t in base.token_ids:
        assert t == int(Session(tiny_gen.backend).logits("ref", seq)[0, -1].argmax())
        seq.append(t)


def test_sampling_params_object_and_keywords_agree(tiny_gen):
    params = SamplingParams(method="spec", persona="EN", max_new_tokens=9, seed=3, k=2, ignore_eos=True)
    a = tiny_gen.generate(PROMPT, params)
    b = tiny_gen.generate(PROMPT, method="spec", persona="EN", max_new_tokens=9, seed=3, k=2, ignore_eos=True)
    c = tiny_gen.generate(PROMPT, params, k=3)                 # keywords change the given params
    assert a.token_ids == b.token_ids and len(a.token_ids) == 9
    assert c.stats.method == "spec" and params.k == 2


@pytest.mark.parametrize("method", ["base", "token"])
@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_a_decoding_step_reads_back_only_what_it_decides(tiny_gen, method, top_p):
    """On a GPU every read-back to the host waits for the stream, which a busy server's generations
    share: a step of `base` or `token` reads back the token it samples and, with top-p, the size of
    the support; nothing else (no weights, no checks, no clamps the target cannot have)."""
    from personamix.testing import SamplerWork

    with SamplerWork(tiny_gen.backend) as work:
        r = tiny_gen.generate(PROMPT, method=method, top_p=top_p, max_new_tokens=8, seed=0, ignore_eos=True)
    assert len(r.token_ids) == work.forwards == 8
    assert work.reads == work.forwards * (2 if top_p < 1 else 1)
