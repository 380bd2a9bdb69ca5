"""Cross-request batching: calls of concurrent generations share one forward and each gets what
it would get alone (batching.py)."""
import os
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, CohereConfig, CohereForCausalLM, MistralConfig, MistralForCausalLM

from personamix import Generator, PersonamixError
from personamix.backends import batching, cpu_lora, omp
from personamix.backends.batching import (
    ATTENTION,
    KEEP_IDLE_S,
    BatchingBackend,
    BatchingUnsupported,
    Call,
    _Batch,
    check_batchable,
)
from personamix.backends.cache import KVPool, PreallocatedCache, SlabCache
from personamix.backends.cpu_attention import attention_problem
from personamix.backends.prefix_cache import PrefixCache
from personamix.engine.session import Session
from personamix.testing import SamplerWork, save_lora, save_tiny

SEQ = [0, 3, 1, 4, 2, 2, 0, 1, 3, 4, 4, 1, 0, 2, 3, 1, 0, 4, 2, 1]


@pytest.fixture(scope="module")
def tiny_ent(tmp_path_factory):
    """A tiny model and its adapters E, N, T on disk."""
    root = tmp_path_factory.mktemp("batching")
    base = save_tiny(root / "base", vocab=5, layers=2, hidden=32)
    return str(base), {name: save_lora(base, root / name, seed=i) for i, name in enumerate("ENT")}


@pytest.fixture(scope="module")
def pair(tiny_ent):
    """The same tiny model with adapters E, N, T twice: through the batching backend and the plain fast one."""
    base, adapters = tiny_ent
    batched = Generator.from_pretrained(str(base), adapters=adapters, backend="batched", device="cpu")
    fast = Generator.from_pretrained(str(base), adapters=adapters, backend="fast", device="cpu")
    return batched, fast


def test_auto_picks_batching_for_lora_adapters(tiny_gen):
    assert isinstance(tiny_gen.backend, BatchingBackend)


def test_grouped_attention_is_sdpa_with_a_mask():
    """The CPU attention of short calls (two matmuls, query heads stacked per KV head) against
    SDPA with the same mask: 6 query heads over 2 KV heads (head h reads KV head h // 3)."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    torch.manual_seed(0)
    n, kv, g, t, length, d = 5, 2, 3, 4, 9, 8
    q, k, v = torch.randn(n, kv * g, t, d), torch.randn(n, kv, length, d), torch.randn(n, kv, length, d)
    mask = torch.arange(length).view(1, 1, 1, -1) < torch.randint(1, length + 1, (n, 1, t, 1))
    got = _Batch._grouped_attention(SimpleNamespace(mask=mask, bias=None), q, k, v, 0.3)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("attention", ["kernel", "grouped", "sdpa"])
@pytest.mark.parametrize("idle_between", [0, 3], ids=["region", "gathered"])
def test_one_forward_over_calls_of_different_groups_lengths_and_adapters(pair, idle_between, attention, monkeypatch):
    """Seven calls in ONE forward (groups ref/prefs/all, adapter subsets in any order, 1..12 new
    tokens over cached prefixes of different lengths: the short ones attend together, the long
    one alone) == each call alone on the fast backend; and the caches they leave behind are
    right (the next steps agree too). With other generations' idle slots between theirs, the
    short calls read only their own slots (gathered) instead of the region from first to last."""
    monkeypatch.setattr(batching, "CPU_ATTENTION", attention)   # sdpa: what a GPU runs
    batched, fast = pair
    b = batched.backend
    if attention != "kernel":   # with PyTorch's LoRA deltas too (gathered, padded, scattered back), as a GPU
        monkeypatch.setattr(b.lora.rows, "kernel", False)
    # what no row wrote is NaN for the kernel (it must read only what its rows wrote: the backend
    # leaves its pool uninitialised), zeros for the others (they read masked positions)
    monkeypatch.setattr(b, "pool", KVPool(fill=float("nan") if attention == "kernel" else 0.0))
    plans = [("all", ("E", "N", "T"), 3, 1), ("ref", (), 5, 1), ("prefs", ("T", "E"), 2, 4),
             ("all", ("N",), 6, 3), ("prefs", ("E", "N", "T"), 4, 2), ("ref", (), 1, 4),
             ("all", ("E", "T"), 2, 12)]            # a long call (a prompt): attends on its own
    calls, plain, idle = [], [], []
    for group, names, prefix, new in plans:
        for _ in range(idle_between):               # 4 slots each, booked by a generation not in this forward
            idle.append(b.new_cache("all", ("E", "N", "T")))
            b.forward("all", torch.tensor(SEQ[:7]), idle[-1], 1, ("E", "N", "T"))
        cache = b.new_cache(group, names)
        b.forward(group, torch.tensor(SEQ[:prefix]), cache, 1, names)     # cache the prefix (a call of its own)
        calls.append(b.call(group, torch.tensor(SEQ[prefix: prefix + new]), cache, new, names))
        plain.append((group, names, prefix + new, Session(fast.backend, names or None)))
    forwards, row_tokens, prompt_row_tokens = b.forwards, b.row_tokens, b.prompt_row_tokens
    assert (_Batch(calls, b.pool, torch.device("cpu")).region is None) == (idle_between > 0)
    b.run(calls)
    assert b.forwards == forwards + 1
    assert b.row_tokens - row_tokens == sum(new * len(c.adapters) for c, (*_, new) in zip(calls, plans))
    assert b.prompt_row_tokens == prompt_row_tokens       # every call went on from a cached prefix
    for cache in idle:
        b.free_cache(cache)
    for call, (group, names, end, alone) in zip(calls, plain):
        assert call.error is None
        want = alone.logits(group, SEQ[:end], call.n_logits)
        assert call.logits.shape == want.shape
        assert torch.allclose(call.logits, want, atol=1e-5)
        after, _ = b.forward(group, torch.tensor([2]), call.cache, 1, names)    # the cache holds SEQ[:end]
        assert torch.allclose(after, alone.logits(group, SEQ[:end] + [2]), atol=1e-5)


def require_lora_kernel():
    """For a backend built without the CPU LoRA kernel: skip, naming why it cannot run here (CI,
    which builds the kernels on an AVX2 machine: fail)."""
    why = (cpu_lora.lora_problem(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))
           or "it runs here, the backend did not use it")
    if os.environ.get("PERSONAMIX_REQUIRE_AVX2_KERNEL"):
        pytest.fail(f"the CPU LoRA kernel is required: {why}")
    pytest.skip(f"the CPU LoRA kernel does not run here: {why}")


KERNEL_PROBLEM = (f"PERSONAMIX_CPU_ATTENTION={batching.CPU_ATTENTION}" if batching.CPU_ATTENTION != "kernel"
                  else attention_problem(torch.float32, torch.device("cpu"), 8))


@pytest.mark.skipif(KERNEL_PROBLEM is not None and not os.environ.get("PERSONAMIX_REQUIRE_AVX2_KERNEL"),
                    reason=f"the CPU attention kernel does not run here: {KERNEL_PROBLEM}")
def test_an_uninitialised_pool_is_left_so_only_where_the_kernel_attends(pair, monkeypatch):
    """The backend leaves its pool unzeroed only when its short calls attend in the CPU kernel;
    a path that reads masked positions refuses such a pool by name, and over NaN where no row
    wrote (what uninitialised memory may hold) it would give NaN: the zeros are needed there."""
    batched, _ = pair
    b = batched.backend
    assert b.pool.fill is None and batching.uses_attention_kernel(b.model)
    monkeypatch.setattr(batching, "CPU_ATTENTION", "grouped")

    def two_calls():
        calls = []
        for prefix, new in ((5, 1), (2, 3)):
            cache = b.new_cache("all", ("E", "N"))
            b.forward("all", torch.tensor(SEQ[:prefix]), cache, 1, ("E", "N"))
            calls.append(b.call("all", torch.tensor(SEQ[prefix: prefix + new]), cache, new, ("E", "N")))
        b.run(calls)
        return calls

    monkeypatch.setattr(b, "pool", KVPool(fill=None))
    calls = two_calls()
    assert all(isinstance(c.error, PersonamixError) and "fill=None" in str(c.error) for c in calls)
    monkeypatch.setattr(b, "pool", KVPool(fill=float("nan")))
    assert any(c.logits.isnan().any() for c in two_calls())
    monkeypatch.setattr(b, "pool", KVPool(fill=0.0))
    assert all(c.logits.isfinite().all() for c in two_calls())


def test_a_call_alone_is_packed_where_the_kernel_attends(pair, monkeypatch):
    """On CPU with the attention kernel a call that finds no company (a prompt, then decoding
    steps) runs the packed forward, as it would in company, and gets the fast backend's logits to
    float rounding; where short calls attend in PyTorch's ops it runs the model's own forward,
    exactly the fast backend's."""
    batched, fast = pair
    b = batched.backend
    assert batching.uses_attention_kernel(b.model)
    packed, real = [], batching.forward_calls

    def counted(model, calls, *args):   # the real forward, counted
        packed.append(len(calls))
        return real(model, calls, *args)

    monkeypatch.setattr(batching, "forward_calls", counted)

    def logits(backend):
        with Session(backend, ("E", "N")) as s:
            return [s.logits("all", SEQ[:end], 2) for end in (12, 13, 14)]   # a prompt, then two steps

    want = logits(fast.backend)
    got = logits(b)
    assert packed == [1, 1, 1]
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
    packed.clear()
    monkeypatch.setattr(batching, "CPU_ATTENTION", "sdpa")
    got = logits(b)
    assert packed == [] and all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("lora", ["kernel", "torch"])
@pytest.mark.parametrize("names", [("N",), ("T", "E")], ids=["gathered", "padded"])
def test_packed_calls_over_some_of_the_adapters(pair, names, lora, monkeypatch):
    """A forward whose rows use some of the adapters. PyTorch's deltas: under half of them (one of
    three) gathers their A/B; at least half (two of three) pads every adapter, the unused one with
    padding only, and uses the stacked A/B as they lie. The CPU kernel: each adapter's positions,
    unpadded. Either way each call gets what it gets alone."""
    batched, fast = pair
    b = batched.backend
    if lora == "torch":
        monkeypatch.setattr(b.lora.rows, "kernel", False)
    elif not b.lora.rows.kernel:
        require_lora_kernel()
    calls, plain = [], []
    for group, prefix, new in (("all", 3, 1), ("prefs", 5, 2), ("ref", 4, 1), ("prefs", 2, 3)):
        cache = b.new_cache(group, names)
        b.forward(group, torch.tensor(SEQ[:prefix]), cache, 1, names)
        calls.append(b.call(group, torch.tensor(SEQ[prefix: prefix + new]), cache, new, names))
        plain.append((group, prefix + new, Session(fast.backend, names)))
    rows = b.lora.rows
    with b.lora.packed_rows(batching.token_adapters(calls)):
        assert rows.all_in_order == (len(names) == 2)
        assert len(rows.index) == (3 if len(names) == 2 else 1)
        assert (rows.segments is not None, rows.gather is not None) == ((True, False) if lora == "kernel"
                                                                        else (False, True))
    b.run(calls)
    for call, (group, end, alone) in zip(calls, plain):
        assert call.error is None
        assert torch.allclose(call.logits, alone.logits(group, SEQ[:end], call.n_logits), atol=1e-5)


def test_concurrent_generations_share_forwards_and_match_running_alone(pair):
    batched, fast = pair
    b = batched.backend
    jobs = [dict(method=m, weights=w, seed=s) for s, (m, w) in enumerate(
        [("token", {"E": 1.0, "N": 1.0}), ("scr", {"T": 0.5, "E": 0.5}), ("spec", {"N": 1.0}),
         ("token-rs", {"E": 0.7, "T": 0.3}), ("base", None), ("token", {"E": 1.0, "N": -0.5, "T": 1.0})])]
    alone = [fast.generate(SEQ[:3], max_new_tokens=10, ignore_eos=True, **j).token_ids for j in jobs]
    forwards, calls = b.forwards, b.calls
    assert _concurrently(batched, jobs) == alone
    assert b.calls - calls > b.forwards - forwards     # some forwards served several generations


def _concurrently(gen, jobs: list[dict]) -> list[list[int]]:
    """The jobs' generations (10 tokens after SEQ[:3]), each in its own thread, their first calls
    all in one forward."""
    b = gen.backend
    out: dict[int, list[int]] = {}

    def run(i):
        out[i] = gen.generate(SEQ[:3], max_new_tokens=10, ignore_eos=True, **jobs[i]).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    with b.paused():                     # no forward starts until every thread's first call waits: they share it
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while b.waiting < len(jobs):
            assert time.time() < deadline, "threads did not queue their calls"
            time.sleep(0.01)
    for t in threads:
        t.join(timeout=120)
    return [out.get(i) for i in range(len(jobs))]


def test_concurrent_draws_are_made_together_in_their_forward_and_match_running_alone(pair, monkeypatch):
    """The draws of every generation in a forward are made at once after it (engine/draws.py):
    the reference's (drafts, `base`) whatever each one's temperature / top-p / greedy, and the
    `token` steps' p* and the token-rs steps' first blocks per set of weights; and SCR's chunks
    scored at once (engine/scoring.py). Each generation gets what it gets alone."""
    batched, fast = pair
    b = batched.backend
    jobs = [dict(method="scr", weights={"T": 0.5, "E": 0.5}, temperature=0.7, top_p=0.9, seed=1),
            dict(method="base", temperature=1.3, seed=2), dict(method="base", temperature=0, seed=3),
            dict(method="spec", weights={"N": 1.0}, top_p=0.8, seed=4), dict(method="scr", weights={"E": 1.0}, seed=5),
            dict(method="token", weights={"E": 1.0, "N": -0.5}, temperature=0.8, seed=6),
            dict(method="token", weights={"E": 1.0, "N": -0.5}, top_p=0.9, seed=7),
            dict(method="token", weights={"E": 1.0, "N": -0.5}, temperature=0, seed=8),
            dict(method="token", weights={"E": 0.5, "N": 0.5}, aggregation="geometric", seed=9),
            dict(method="token-rs", weights={"E": 1.0, "N": -0.5}, seed=10),
            dict(method="token-rs", weights={"E": 1.0, "N": -0.5}, top_p=0.9, temperature=0.8, seed=11),
            dict(method="scr", weights={"T": 0.5, "E": 0.5}, temperature=0.7, top_p=0.9, seed=12)]
    alone = [fast.generate(SEQ[:3], max_new_tokens=10, ignore_eos=True, **j).token_ids for j in jobs]
    sizes: dict[object, list[int]] = {False: [], True: [], "rs": []}
    draw_calls = b.draw_calls

    def counted(calls):
        for mixed in (False, True):
            sizes[mixed].append(sum(c.draw.mixed == mixed and not c.draw.propose for c in calls))
        sizes["rs"].append(sum(c.draw.propose > 0 for c in calls))
        draw_calls(calls)

    scored, cascades, score_calls = [], [], b.score_calls

    def scoring(calls):
        scored.append(len(calls))
        cascades.append(sum(c.score.rng is not None for c in calls))   # scored with the cascade's uniforms
        score_calls(calls)

    b.draw_calls, b.score_calls = counted, scoring
    # every forward waits for all the generations the last one served (bounded: 1,000 forwards' time),
    # so the three SCR generations, which all draft 4 tokens first, score their first chunks together
    monkeypatch.setattr(b, "gather_wait", 1000.0)
    try:
        assert _concurrently(batched, jobs) == alone
    finally:
        del b.draw_calls, b.score_calls
    assert max(sizes[False]) >= 3 and max(sizes[True]) >= 3 and max(sizes["rs"]) == 2   # several in one forward
    assert max(scored) == 3 and sum(cascades) > 0


def test_an_error_reaches_every_call_of_the_batch_and_the_backend_goes_on(pair):
    batched, _ = pair
    b = batched.backend
    good = Call(torch.tensor([1, 2]), PreallocatedCache(), 1, [-1])
    bad = Call(torch.tensor([1, 99]), PreallocatedCache(), 1, [-1])        # token id beyond the vocabulary
    b.run([good, bad])
    assert good.error is not None and bad.error is not None and good.logits is None
    assert Session(b).logits("all", SEQ).shape == (4, 1, 5)                   # the next call works


def test_models_it_cannot_batch_are_refused_and_left_untouched():
    window = MistralForCausalLM(MistralConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1, sliding_window=4))
    with pytest.raises(BatchingUnsupported, match="sliding_window"):
        check_batchable(window)
    torch.manual_seed(0)
    scaled = CohereForCausalLM(CohereConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, logit_scale=3.0))
    before = scaled.config._attn_implementation
    with pytest.raises(BatchingUnsupported, match="logits differ"):   # lm_head(decoder(x)) * logit_scale
        check_batchable(scaled)
    assert scaled.config._attn_implementation == before != ATTENTION


@pytest.mark.parametrize("onednn", [False, True], ids=["plain-head", "packed-head"])
def test_calls_asking_for_columns_get_those_logits_only(tiny_ent, onednn):
    """A request with `columns` (SCR's chunk scoring asks for its support's ids) gets the logits it
    would get whole at those ids: packed with another call (the output layer over those rows of
    the weight, where there is a plain weight; indexed after, where the head is packed and untied),
    alone, and on a backend that cannot restrict (the fast one: Session indexes)."""
    base, adapters = tiny_ent
    gen = Generator.from_pretrained(base, adapters=adapters, backend="batched", device="cpu", onednn=onednn)
    fast = Generator.from_pretrained(base, adapters=adapters, backend="fast", device="cpu")
    assert (batching.output_weight(gen.backend.model) is None) == onednn   # the tiny model's head is untied
    names, cols, seq = ("E", "N", "T"), torch.tensor([4, 1, 3]), SEQ[:9]
    mine, whole, other = Session(gen.backend, names), Session(gen.backend, names), Session(fast.backend, names)
    got_p, got_r = mine.logits_together([("prefs", seq, 3, cols), ("ref", seq + [2], 1)])    # one packed forward
    want_p, want_r = whole.logits_together([("prefs", seq, 3), ("ref", seq + [2], 1)])
    assert got_p.shape == (3, 3, 3) and torch.allclose(got_p, want_p[..., cols], atol=1e-5)
    assert torch.allclose(got_r, want_r, atol=1e-5)
    again = seq[:7] + [1, 1]                                   # a new chunk over the same prefix: alone
    got = mine.logits_together([("prefs", again, 2, cols)])[0]
    assert torch.allclose(got, whole.logits("prefs", again, 2)[..., cols], atol=1e-5)
    assert torch.allclose(other.logits_together([("prefs", again, 2, cols)])[0], got, atol=1e-5)
    assert torch.allclose(mine.logits("prefs", again, 2), whole.logits("prefs", again, 2), atol=1e-5)


def test_batched_backend_refuses_what_it_cannot_run(pair):
    batched, _ = pair
    with pytest.raises(PersonamixError, match="no preference models"):
        batched.backend.forward("prefs", torch.tensor([1]), PreallocatedCache(), 1, ())
    with pytest.raises(ValueError, match="n_logits"):
        batched.backend.forward("ref", torch.tensor([1]), PreallocatedCache(), 2, ())


def test_scr_scoring_forward_carries_the_next_draft_step(pair):
    """logits_together: chunk scoring (prefs) and the reference's step after the chunk in ONE
    forward on the batched backend, two on a backend that cannot fuse; same logits; the next
    draft step then needs no forward; and SCR spends fewer forwards for the same tokens."""
    batched, fast = pair
    fused, plain = Session(batched.backend), Session(fast.backend)
    assert fused.fuses and not plain.fuses
    requests = [("prefs", SEQ[:6], 3), ("ref", SEQ[:7], 1)]
    got, want = fused.logits_together(requests), plain.logits_together(requests)
    assert fused.forward_passes == 1 and plain.forward_passes == 2
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)
    assert torch.allclose(fused.logits("ref", SEQ[:7]), got[1]) and fused.forward_passes == 1
    kw = dict(method="scr", weights={"E": 1.0, "N": 1.0}, k=3, max_new_tokens=24, seed=5, ignore_eos=True)
    a, b = batched.generate(SEQ[:3], **kw), fast.generate(SEQ[:3], **kw)
    assert a.token_ids == b.token_ids
    assert a.stats.chunks_accepted[3] > 0 and a.stats.forward_passes < b.stats.forward_passes


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_scr_draws_its_next_draft_step_ahead_and_takes_it_only_when_the_chunk_is_accepted_whole(pair, monkeypatch,
                                                                                                top_p):
    """The next draft step after a chunk is drawn in the chunk's scoring forward with the generator
    put back (Session.score_chunk's `ahead`), and taken when SCR asks for exactly that draw (its
    chunk accepted whole); after a partial chunk or a fallback it is dropped. Seed for seed, the
    tokens are the fast backend's, which never draws ahead."""
    batched, fast = pair
    sessions = []
    init = Session.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        sessions.append(self)

    monkeypatch.setattr(Session, "__init__", tracked)
    kw = dict(method="scr", weights={"E": 1.0, "N": -0.5}, k=3, max_new_tokens=30, ignore_eos=True,
              temperature=0.8, top_p=top_p, warmup=1)
    for seed in range(4):
        a = batched.generate(SEQ[:3], seed=seed, **kw)
        assert a.token_ids == fast.generate(SEQ[:3], seed=seed, **kw).token_ids
    taken = sum(s.ahead_taken for s in sessions if s.backend is batched.backend)
    made = sum(s.ahead_made for s in sessions if s.backend is batched.backend)
    assert not any(s.ahead_made for s in sessions if s.backend is fast.backend)
    assert 0 < taken < made, (taken, made)          # both kinds happened: taken, and dropped


def test_auto_falls_back_to_the_fast_backend_when_the_model_cannot_batch(tiny_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from personamix.backends import build_backend
    from personamix.backends.multilora import MultiLoraBackend

    base, adapters = tiny_dir

    def windowed():
        model = LlamaForCausalLM.from_pretrained(base).eval()
        model.config.sliding_window = 4          # what a windowed model declares (check_batchable refuses it)
        return model

    tok = AutoTokenizer.from_pretrained(base)
    with pytest.warns(UserWarning, match="sliding_window.*take turns"):      # said, not silent
        backend = build_backend(windowed(), tok, adapters, "auto")
    assert type(backend) is MultiLoraBackend
    assert Session(backend).logits("all", SEQ).shape == (4, 1, 5)
    with pytest.raises(BatchingUnsupported, match="sliding_window"):
        build_backend(windowed(), tok, adapters, "batched")


def test_the_pool_starts_zeroed_grows_keeping_its_content_and_reuses_freed_slots():
    """Attention over a region reads (masked) positions no row wrote: they must be finite."""
    import gc

    from personamix.backends.cache import KVPool, SlabCache

    pool = KVPool(slots=2, capacity=4)
    like = torch.randn(1, 2, 1, 3)
    pool.ensure(0, 2, 4, like)
    assert (pool.k[0] == 0).all() and (pool.v[0] == 0).all()
    pool.k[0][1, :, :4] = 7.0
    pool.ensure(0, 5, 9, like)                               # more slots and positions
    assert pool.k[0].shape == (8, 2, 9, 3) and (pool.k[0][1, :, :4] == 7).all()
    assert (pool.k[0][2:] == 0).all() and (pool.k[0][:, :, 4:] == 0).all()
    pool.ensure(0, 5, 20, like)                              # more positions again: what was written is kept
    assert pool.k[0].shape == (8, 2, 20, 3) and (pool.k[0][1, :, :4] == 7).all() and (pool.k[0][:, :, 4:] == 0).all()
    a, b = SlabCache(pool, 2), SlabCache(pool, 3)
    assert (a.start, b.start) == (0, 2)
    start = a.start
    del a
    gc.collect()
    assert SlabCache(pool, 2).start == start                 # a finished generation's slots are reused


def test_an_unfilled_pool_grows_copying_only_the_positions_written_so_far():
    pool = KVPool(slots=2, capacity=4, fill=float("nan"))     # NaN: stands for uninitialised memory (fill=None)
    like = torch.randn(1, 2, 1, 3)
    pool.ensure(0, 2, 3, like)                                # 3 positions of slots 0 and 1 about to be written
    pool.k[0][:, :, :3] = 1.0
    pool.ensure(0, 3, 6, like)
    assert pool.k[0].shape == (4, 2, 8, 3)
    assert (pool.k[0][:2, :, :3] == 1).all() and pool.k[0][:, :, 3:].isnan().all() and pool.k[0][2:].isnan().all()
    pool.k[0][:, :, 3:6] = 2.0
    pool.ensure(0, 9, 6, like)                                # slots only: positions up to 6 are copied
    assert (pool.k[0][:4, :, 3:6] == 2).all() and pool.k[0][:, :, 6:].isnan().all()


def test_a_finished_generation_gives_its_slots_back_at_once_and_an_idle_pool_keeps_then_drops_its_tensors(pair):
    """Without the cycle collector (a slab's layers point back at it): the generation's end
    releases its slots. With none booked the pool keeps its tensors for keep_idle_s (the next
    generation writes into the same memory) and then drops them (the load test's idle RSS);
    `drop` does it at once."""
    import gc

    batched, fast = pair
    pool = batched.backend.pool
    assert pool.keep_idle_s == KEEP_IDLE_S > 1      # no timer fires during this test
    gc.collect()
    gc.disable()
    try:
        session = Session(batched.backend, ("E", "N"))
        session.logits("all", SEQ[:6], 1)
        assert pool.booked == 3 and len(pool.k) > 0
        kept = pool.k[0]
        session.close()
        assert pool.booked == 0 and pool.k[0] is kept          # idle, and kept
        for method in ("scr", "token", "base"):
            weights = None if method == "base" else {"E": 1.0, "T": 0.5}
            r = batched.generate(SEQ[:3], method=method, weights=weights, max_new_tokens=8, seed=1, ignore_eos=True)
            assert pool.booked == 0 and pool.k[0] is kept      # the same memory, written again
            assert pool.drop() and pool.k == [] and pool.v == []
            again = batched.generate(SEQ[:3], method=method, weights=weights, max_new_tokens=8, seed=1,
                                     ignore_eos=True)
            assert pool.k[0] is not kept and (kept := pool.k[0]) is not None
            plain = fast.generate(SEQ[:3], method=method, weights=weights, max_new_tokens=8, seed=1, ignore_eos=True)
            assert r.token_ids == again.token_ids == plain.token_ids   # kept or made afresh: the same tokens
    finally:
        gc.enable()


def test_an_idle_pool_drops_its_tensors_once_idle_for_keep_idle_s_unless_booked_again():
    like = torch.randn(1, 2, 1, 3)
    dropped = []
    pool = KVPool(slots=2, capacity=4, keep_idle_s=3600, on_drop=lambda: dropped.append(1))
    a = pool.reserve(2)
    pool.ensure(0, 2, 4, like)
    kept = pool.k[0]
    pool.release(a, 2)
    planned = pool._timer                                    # the drop, an hour from now
    assert pool.booked == 0 and pool.k[0] is kept and planned is not None and planned.interval == 3600
    b = pool.reserve(1)                                      # busy again before it fires ...
    planned.function(*planned.args)                          # ... and should it fire anyway, it is void
    assert pool.k[0] is kept and dropped == []
    assert not pool.drop() and pool.k[0] is kept             # never while a slot is booked
    with pytest.raises(RuntimeError, match="booked"):
        pool.fill = float("nan")
    pool.release(b, 1)
    planned = pool._timer
    planned.function(*planned.args)                          # idle since: it drops them
    assert pool.k == [] and dropped == [1] and (pool.slots, pool.capacity) == (2, 4)
    pool.reserve(1)
    pool.ensure(0, 1, 2, like)
    assert pool.k[0] is not kept

    # a real timer: dropped within the bound, on_drop called once; keep_idle_s 0: at once
    done = threading.Event()
    pool = KVPool(keep_idle_s=0.05, on_drop=done.set)
    pool.ensure(0, 1, 2, like)
    pool.release(pool.reserve(1), 1)
    assert done.wait(30) and pool.k == []
    pool = KVPool(keep_idle_s=0, on_drop=lambda: dropped.append(2))
    s = pool.reserve(1)
    pool.ensure(0, 1, 2, like)
    pool.release(s, 1)
    assert pool.k == [] and dropped == [1, 2] and pool._timer is None
    with pytest.raises(ValueError, match="keep_idle_s"):
        KVPool(keep_idle_s=float("inf"))


def test_changing_the_fill_of_an_idle_pool_drops_its_tensors():
    pool = KVPool(slots=2, capacity=4, keep_idle_s=3600)
    pool.release(pool.reserve(1), 1)
    pool.ensure(0, 1, 2, torch.randn(1, 2, 1, 3))
    kept = pool.k[0]
    pool.fill = 0.0                                          # unchanged: kept
    assert pool.k[0] is kept
    pool.fill = float("nan")
    assert pool.k == []
    pool.ensure(0, 1, 2, torch.randn(1, 2, 1, 3))
    assert pool.k[0].isnan().all()


def test_the_prefix_cache_keeps_blocks_and_tails_per_row_kind_and_evicts_the_least_recently_used():
    k = [torch.arange(2 * 40 * 3, dtype=torch.float32).view(2, 40, 3) + 1000 * layer for layer in range(3)]
    cache = PrefixCache(max_bytes=10**9)
    prompt = list(range(40))
    cache.store(-1, prompt, k, k)                               # 2 full blocks and the 8-token tail
    assert len(cache) == 3
    lengths = lambda found: [e.length for e in found[0]]
    found = cache.lookup(-1, prompt + [7], limit=40)            # the prompt continued: all of it
    assert lengths(found) == [16, 16, 8] and found[1] == 40
    assert torch.equal(found[0][1].k[2], k[2][:, 16:32]) and torch.equal(found[0][2].k[2], k[2][:, 32:40])
    assert torch.equal(found[0][2].v[0], k[0][:, 32:40])
    assert cache.lookup(-1, prompt, limit=39)[1] == 39          # asked again: all but the position asked for
    assert cache.lookup(0, prompt, limit=40) == ([], 0)         # another row kind (an adapter): its own entries
    assert cache.lookup(-1, prompt[:16] + [99] * 24, limit=40)[1] == 16   # shares the first block only
    assert cache.lookup(-1, prompt[:36] + [99], limit=36) == (found[0], 36)   # 4 of the tail's 8 tokens
    assert cache.lookup(-1, prompt[:40] + [1], limit=31)[1] == 31          # never past `limit`
    assert cache.lookup(-1, prompt[:8], limit=7)[1] == 7                   # the first block's first tokens
    cache.store(0, prompt[:20] + [1, 2, 3], k, k)               # a prompt + a drafted chunk ...
    assert cache.lookup(0, prompt[:20] + [4, 5, 6, 7], limit=21)[1] == 20   # ... another draft: the prompt
    assert cache.lookup(0, prompt[:20] + [1, 2, 9, 9], limit=23)[1] == 22
    block = found[0][0].nbytes
    assert found[0][2].nbytes == block // 2
    small = PrefixCache(max_bytes=4 * block)
    small.store(-1, prompt, k, k)
    small.store(0, prompt, k, k)              # 5 blocks' worth > 4: the oldest (kind -1, its first block) goes
    assert len(small) == 5 and small.nbytes == 4 * block
    assert small.lookup(-1, prompt, limit=40) == ([], 0) and lengths(small.lookup(0, prompt, limit=40)) == [16, 16, 8]
    small.clear()
    assert len(small) == 0 and small.lookup(0, prompt, limit=40) == ([], 0)


@pytest.mark.parametrize("max_mb", [64, 0.0001], ids=["kept", "evicted"])
def test_prompts_start_after_their_cached_prefix_and_give_what_a_fresh_forward_gives(pair, max_mb):
    batched, fast = pair
    b = batched.backend
    b.cache_prefixes(max_mb)
    try:
        base = (SEQ * 3)[:40]
        prompts = [base, base[:20] + [4, 4, 0, 1, 2] * 3, base[:34], (SEQ * 3)[5:45]]
        row_tokens, prompt_row_tokens, asked, rows_stepped = b.row_tokens, b.prompt_row_tokens, 0, 0
        for group, names in [("all", ("E", "N", "T")), ("prefs", ("T",)), ("ref", ())]:
            rows = len(b.lora.row_adapters(group, names))
            asked += rows * sum(len(p) for p in prompts)
            rows_stepped += rows * len(prompts)
            for prompt in prompts:
                with Session(b, names or None) as session, Session(fast.backend, names or None) as alone:
                    got = session.logits(group, prompt, 3)
                    assert torch.allclose(got, alone.logits(group, prompt, 3), atol=1e-5)
                    nxt = session.logits(group, prompt + [1], 1)            # the restored cache goes on
                    assert torch.allclose(nxt, alone.logits(group, prompt + [1], 1), atol=1e-5)
        saved = b.prefix_cache.tokens_saved
        # the counters: prompt tokens x rows computed (after a restored prefix), then one token per row
        assert b.prompt_row_tokens - prompt_row_tokens == asked - saved
        assert b.row_tokens - row_tokens == asked - saved + rows_stepped
        if max_mb > 1:
            with Session(b, ("E", "N", "T")) as session, Session(fast.backend, ("E", "N", "T")) as alone:
                got = session.logits("all", base, 3)                        # asked again: all of it restored but
                assert b.prefix_cache.tokens_saved - saved == (len(base) - 3) * 4   # the 3 positions asked for
                assert torch.allclose(got, alone.logits("all", base, 3), atol=1e-5)
            # base's 2 blocks for 4 rows, then the shared first block of prompts 2 and 3 (2 blocks for
            # base[:34]), and so on for each group: prompts 2-3 of every group start after a cached prefix
            assert saved >= (16 + 32) * 4 + (16 + 32) * 1 + (16 + 32) * 1
        else:
            assert saved == 0 and len(b.prefix_cache) == 0                  # a budget below one token keeps none
        r = batched.generate(base, method="scr", weights={"E": 1.0, "T": 0.5}, max_new_tokens=6, seed=3,
                             ignore_eos=True)
        assert r.token_ids == fast.generate(base, method="scr", weights={"E": 1.0, "T": 0.5}, max_new_tokens=6,
                                            seed=3, ignore_eos=True).token_ids
    finally:
        b.cache_prefixes(0)
    assert b.prefix_cache is None


def test_a_restored_prefix_costs_a_few_tensor_operations_per_row_not_per_row_and_layer(pair, monkeypatch):
    """Restoring a cached prefix into a call's slots (on a GPU every tensor operation is a launch):
    the rows' blocks are joined for all layers at once and copied one layer at a time for all rows,
    so a row more adds a few operations, whatever the number of layers."""
    b = pair[0].backend
    ops = []

    def counted(calls, cache):
        with SamplerWork() as work:
            restore(calls, cache)
        ops.append(work.ops)

    restore = b._restore_prefixes
    monkeypatch.setattr(b, "_restore_prefixes", counted)
    b.cache_prefixes(64)
    try:
        prompt = (SEQ * 3)[:40]                      # 2 full blocks and a tail
        for group, names in [("ref", ()), ("all", ("E", "N", "T"))]:
            for _ in range(2):                       # stored, then restored (all but the 3 positions asked for)
                with Session(b, names or None) as session:
                    session.logits(group, prompt, 3)
        one_row, four_rows = ops[1], ops[3]
    finally:
        b.cache_prefixes(0)
    layers = b.model.config.num_hidden_layers
    assert layers >= 2 and b.prefix_cache is None
    # each row's blocks: one cat and one slice, for keys and for values; the layers' copies are shared
    assert four_rows - one_row <= 4 * 3, (one_row, four_rows)


needs_libgomp = pytest.mark.skipif(omp._libgomp() is None or torch.get_num_threads() < 2,
                                   reason="needs PyTorch on GNU OpenMP (libgomp) and 2+ threads")


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@needs_libgomp
def test_a_thread_on_one_core_starts_no_team_and_hands_back_the_team_of_its_forward():
    """libgomp throttles every team once threads holding teams outnumber the cores (omp.py): a
    generation thread's own ops start none, and the team of the forward it runs is gone after it."""
    big = torch.randn(256, 8192)
    torch.set_num_threads(torch.get_num_threads())  # as a user may: it also sets MKL's count, which exp follows
    omp.release_team()                              # the main thread's, from earlier tests
    seen = {}

    def worker():
        omp.use_one_thread()
        seen["own"] = torch.get_num_threads()
        start = _os_threads()
        big.exp()                                   # large enough to run in parallel on 2+ threads
        seen["own_op"] = _os_threads() - start
        with omp.team(2):
            seen["forward"] = torch.get_num_threads()
            big.exp()
            seen["forward_op"] = _os_threads() - start
        seen["after"] = (torch.get_num_threads(), _os_threads() - start)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"own": 1, "own_op": 0, "forward": 2, "forward_op": 1, "after": (1, 0)}
    assert torch.get_num_threads() >= 2            # the main thread's settings are the user's


@needs_libgomp
@pytest.mark.parametrize("kind", ["batched", "fast", "lora", "separate"])
def test_building_a_backend_hands_back_the_team_of_the_thread_that_loaded_it(tiny_ent, kind):
    """An idle team throttles every other (omp.py): a server's main thread loads the model and
    then only serves HTTP, so the backend hands its team back."""
    seen = {}

    def worker():
        build = lambda: Generator.from_pretrained(tiny_ent[0], adapters=tiny_ent[1], backend=kind, device="cpu")
        build()                                     # threads a first load starts for good (progress bars, ...)
        torch.randn(256, 8192).exp()                # this thread now holds a team (a worker thread)
        start = _os_threads()
        build()
        seen["threads"] = _os_threads() - start

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["threads"] == -(torch.get_num_threads() - 1)


@needs_libgomp
@pytest.mark.parametrize("which", ["batched", "fast", "lora"])
def test_generations_in_threads_leave_those_threads_on_one_core_and_the_main_thread_as_it_was(pair, tiny_ent, which):
    """Backends whose threads take turns on the model (or share its forwards): each forward on all
    cores in one OpenMP team, a thread's own work on one core (omp.py)."""
    batched, fast = pair
    gen = {"batched": batched, "fast": fast}.get(which)
    if gen is None:
        gen = Generator.from_pretrained(tiny_ent[0], adapters=tiny_ent[1], backend=which, device="cpu")
    threads = torch.get_num_threads()
    out = {}

    def worker(i):
        r = gen.generate(SEQ[:3], method="scr", weights={"E": 1.0, "T": 0.5}, max_new_tokens=6, seed=i,
                         ignore_eos=True)
        out[i] = (r.token_ids, torch.get_num_threads())

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for i in range(3):
        alone = fast.generate(SEQ[:3], method="scr", weights={"E": 1.0, "T": 0.5}, max_new_tokens=6, seed=i,
                              ignore_eos=True)
        assert out[i] == (alone.token_ids, 1)
    assert torch.get_num_threads() == threads
    assert gen.backend.threads == threads           # what a forward uses, whichever thread runs it


def test_a_cache_the_collector_frees_inside_the_pools_lock_gives_its_slots_back_later_without_deadlock():
    """The collector can run a dropped cache's finalizer in any thread at any allocation, also
    inside the pool's own (non-reentrant) lock, e.g. during `reserve`: that hung the test suite
    once. The slots are noted then and go back at the pool's next use."""
    import gc

    pool = KVPool()
    kept, dropped = SlabCache(pool, 2), SlabCache(pool, 3)
    dropped.layer(0)                                # its layers point back at it: only the cycle collector frees it
    del dropped
    done = threading.Event()

    def collect_inside_the_lock():
        with pool._lock:
            gc.collect()
        done.set()

    t = threading.Thread(target=collect_inside_the_lock, daemon=True)
    t.start()
    t.join(timeout=30)
    assert done.is_set(), "the finalizer blocked on the pool's lock"
    assert pool.booked == 2                         # the dropped cache's slots are free again
    kept.release()
    kept.release()                                  # once only
    assert pool.booked == 0 and pool.k == []


def test_bf16_models_run_on_every_backend_and_agree_up_to_bf16_rounding(tmp_path):
    """bf16 (the default on a GPU that supports it): the batched and fast backends' logits match the
    plain PEFT backend's at bf16 precision, and every method runs on each (target math is fp32)."""
    base = save_tiny(tmp_path / "base", vocab=5, layers=2, hidden=32)
    adapters = {name: save_lora(base, tmp_path / name, seed=i) for i, name in enumerate("EN")}
    gens = {kind: Generator.from_pretrained(str(base), adapters=adapters, backend=kind, device="cpu",
                                            dtype=torch.bfloat16) for kind in ("lora", "fast", "batched")}
    assert next(gens["batched"].backend.model.parameters()).dtype == torch.bfloat16
    want = Session(gens["lora"].backend, ["E", "N"]).logits("all", SEQ[:12], 12).float()
    for kind in ("fast", "batched"):
        got = Session(gens[kind].backend, ["E", "N"]).logits("all", SEQ[:12], 12).float()
        assert got.shape == want.shape and torch.allclose(got, want, atol=5e-2, rtol=5e-2), kind
    for g in gens.values():
        for method, weights in [("token", {"E": 1.0, "N": -0.5}), ("scr", {"E": 0.5, "N": 0.5}),
                                ("token-rs", {"E": 1.0}), ("base", None)]:
            r = g.generate(SEQ[:3], method=method, weights=weights, max_new_tokens=10, seed=3, ignore_eos=True)
            assert len(r.token_ids) == 10


def _calls_in_a_thread(backend, n, pause, start=0.0, hold=None):
    """A thread that makes `n` one-token reference calls of one generation, `pause` seconds apart
    (standing in for a sampler's work between forwards), after `start` seconds; with `hold` (an
    Event) it stops after its first call without ending its generation until `hold` is set."""
    def run():
        time.sleep(start)
        session = Session(backend)
        for i in range(n):
            session.logits("ref", SEQ[: 3 + i], 1)
            if hold is not None:
                hold.wait(60)
                break
            time.sleep(pause)
        session.close()
    return threading.Thread(target=run, daemon=True)


def _run_all(threads, limit=60):
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=limit)
    assert not any(t.is_alive() for t in threads), "a generation hung waiting for a forward"


def test_the_next_forward_waits_for_the_generations_the_last_one_served(pair, monkeypatch):
    """Two generations whose calls never overlap (each forward takes a few ms, their samplers 40 ms,
    one starts 20 ms after the other) take turns on the model without the wait; with it, after
    the first forward every forward serves both."""
    b = pair[0].backend
    n, counts = 6, {}
    for wait in (0.0, 1000.0):       # 1000 forwards' time: far longer than the 20 ms offset
        monkeypatch.setattr(b, "gather_wait", wait)
        forwards, calls = b.forwards, b.calls
        _run_all([_calls_in_a_thread(b, n, 0.04), _calls_in_a_thread(b, n, 0.04, start=0.02)])
        assert b.calls - calls == 2 * n
        counts[wait] = b.forwards - forwards
    assert counts[1000.0] <= n + 1 < counts[0.0]


def test_a_lone_generation_and_one_whose_partner_ended_are_never_waited_for(pair, monkeypatch):
    """With an unbounded wait, a generation alone, or one whose partner has closed its session,
    still runs: the wait is only ever for a thread that may yet queue a call."""
    b = pair[0].backend
    monkeypatch.setattr(b, "gather_wait", 1e6)   # hours
    _run_all([_calls_in_a_thread(b, 5, 0.0)])
    _run_all([_calls_in_a_thread(b, 2, 0.01), _calls_in_a_thread(b, 6, 0.01, start=0.005)])


def test_a_generation_that_goes_quiet_is_waited_for_at_most_a_few_forwards(pair, monkeypatch):
    """One generation makes a call and then neither calls again nor ends; the other goes on after a
    bounded wait, and later forwards do not wait for the quiet one again."""
    b = pair[0].backend
    monkeypatch.setattr(b, "gather_wait", 3.0)
    hold, waited = threading.Event(), b.waited_s
    quiet = _calls_in_a_thread(b, 1, 0.0, hold=hold)
    quiet.start()
    while quiet.is_alive() and not b._away:   # its call was served
        time.sleep(0.001)
    try:
        _run_all([_calls_in_a_thread(b, 5, 0.0)])
    finally:
        hold.set()
        quiet.join(timeout=60)
    assert b.waited_s > waited


@pytest.mark.parametrize("wait", [-1.0, float("inf"), float("nan")])
def test_impossible_gather_waits_and_idle_keeps_are_refused(tiny_ent, wait):
    base, adapters = tiny_ent
    model = AutoModelForCausalLM.from_pretrained(base)
    with pytest.raises(PersonamixError, match="gather_wait"):
        BatchingBackend(model, adapters, gather_wait=wait)
    with pytest.raises(PersonamixError, match="keep_idle_s"):
        BatchingBackend(model, adapters, keep_idle_s=wait)
