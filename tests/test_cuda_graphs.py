"""The batched backend's padded static decoding steps (cuda_graphs.py). On CUDA they are CUDA
graph replays; here they run the same padded forward eagerly, which is what is checked: each
call gets what it gets alone on the fast backend, whatever the padding, the pool's other
slots, or a pool that grows between steps."""
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from personamix import Generator
from personamix.backends.batching import SHORT, BatchingBackend, uses_attention_kernel
from personamix.backends.cache import KVPool
from personamix.backends.cuda_graphs import SCRATCH, Shape, StaticSteps, bucket
from personamix.engine.session import Session
from personamix.testing import save_lora, save_tiny

SEQ = [0, 3, 1, 4, 2, 2, 0, 1, 3, 4, 4, 1, 0, 2, 3, 1, 0, 4, 2, 1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    base = save_tiny(root / "base", vocab=5, layers=2, hidden=32)
    adapters = {name: save_lora(base, root / name, seed=i) for i, name in enumerate("ENT")}
    fast = Generator.from_pretrained(str(base), adapters=adapters, backend="fast", device="cpu")
    return str(base), adapters, fast


def static_backend(base: str, adapters: dict) -> BatchingBackend:
    return BatchingBackend(AutoModelForCausalLM.from_pretrained(base), adapters, cuda_graphs=True)


def test_buckets_are_powers_of_two_with_a_floor():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 64, 65)] == [1, 2, 4, 4, 8, 64, 128]
    assert bucket(3, 16) == 16 and bucket(17, 16) == 32


def test_graphs_are_on_where_cuda_is_and_reserve_the_scratch_slot(tiny):
    base, adapters, _ = tiny
    plain = BatchingBackend(AutoModelForCausalLM.from_pretrained(base), adapters)
    assert plain.graphs is None                      # CPU: off unless asked for
    b = static_backend(base, adapters)
    assert b.graphs is not None and not b.graphs.capture     # asked for on CPU: padded steps, no capture
    # padded steps read positions no row wrote: the pool is zeroed (the plain CPU one need not be)
    assert b.pool.fill == 0.0 and plain.pool.fill == (None if uses_attention_kernel(plain.model) else 0.0)
    with pytest.raises(ValueError, match="must be filled"):
        StaticSteps(b.model, KVPool(fill=None), b.lora.rows, 3, False, SHORT)
    assert b.pool.booked == SCRATCH + 1
    cache = b.new_cache("all", ("E",))
    assert cache.start == SCRATCH + 1
    b.free_cache(cache)
    b.stop_cuda_graphs()                             # `serve --no-cuda-graphs`
    assert b.graphs is None and b.pool.booked == 0 and b.pool.k == []    # an idle pool holds nothing again


@pytest.mark.parametrize("idle_between", [0, 2], ids=["adjacent", "idle-slots-between"])
def test_a_static_step_gives_each_call_what_it_gets_alone(tiny, idle_between):
    """Six short calls (groups ref/prefs/all, adapter subsets in any order, 1-4 new tokens over
    cached prefixes of different lengths) padded into one static step == each alone on `fast`,
    and the caches they leave are right (the next steps agree too)."""
    base, adapters, fast = tiny
    b = static_backend(base, adapters)
    plans = [("all", ("E", "N", "T"), 3, 1), ("ref", (), 5, 1), ("prefs", ("T", "E"), 2, 4),
             ("all", ("N",), 6, 3), ("prefs", ("E", "N", "T"), 4, 2), ("ref", (), 1, 4)]
    calls, plain, idle = [], [], []
    for group, names, prefix, new in plans:
        for _ in range(idle_between):
            idle.append(b.new_cache("all", ("E", "N", "T")))
            b.forward("all", torch.tensor(SEQ[:7]), idle[-1], 1, ("E", "N", "T"))
        cache = b.new_cache(group, names)
        b.forward(group, torch.tensor(SEQ[:prefix]), cache, 1, names)
        calls.append(b.call(group, torch.tensor(SEQ[prefix: prefix + new]), cache, new, names))
        plain.append((group, names, prefix + new, Session(fast.backend, names or None)))
    replays = b.graphs.replays
    b.run(calls)
    assert b.graphs.replays == replays + 1           # the step was a static one
    shape = b.graphs.last
    assert shape.tokens == 4 and shape.positions == bucket(sum(len(c.adapters) * len(c.tokens) for c in calls), 16)
    assert shape.slots == b.pool.slots == bucket(b.pool.booked)   # every slot booked so far, padded
    for call, (group, names, end, alone) in zip(calls, plain):
        assert call.error is None
        want = alone.logits(group, SEQ[:end], call.n_logits)
        assert call.logits.shape == want.shape
        assert torch.allclose(call.logits, want, atol=1e-5)
        after, _ = b.forward(group, torch.tensor([2]), call.cache, 1, names)
        assert torch.allclose(after, alone.logits(group, SEQ[:end] + [2]), atol=1e-5)


def test_prompts_run_eagerly_and_a_growing_pool_drops_its_shapes(tiny):
    """A call of more than SHORT tokens (a prompt) is not a static step; when the pool's tensors
    are reallocated (more slots), the shapes captured over the old ones are dropped and the
    next steps are still right."""
    base, adapters, fast = tiny
    b = static_backend(base, adapters)
    names = ("E", "T")
    cache = b.new_cache("all", names)
    replays = b.graphs.replays
    b.forward("all", torch.tensor(SEQ[: SHORT + 3]), cache, 1, names)
    assert b.graphs.replays == replays                # a prompt: eager
    b.forward("all", torch.tensor(SEQ[SHORT + 3: SHORT + 4]), cache, 1, names)
    assert b.graphs.replays == replays + 1
    before = dict(b.graphs.steps)
    tensors = b.pool.k[0]
    more = [b.new_cache("all", ("E", "N", "T")) for _ in range(8)]     # 32 more slots: the pool grows
    for c in more:
        b.forward("all", torch.tensor(SEQ[:3]), c, 1, ("E", "N", "T"))
    assert b.pool.k[0] is not tensors
    assert not any(b.graphs.steps.get(shape) is step for shape, step in before.items())   # all captured again
    logits, _ = b.forward("all", torch.tensor([1]), cache, 1, names)
    want = Session(fast.backend, names).logits("all", SEQ[: SHORT + 4] + [1])
    assert torch.allclose(logits, want, atol=1e-5)


def test_concurrent_seeded_generations_through_static_steps_match_running_alone(tiny):
    base, adapters, fast = tiny
    b = static_backend(base, adapters)
    gen = Generator(b, fast.tokenizer)
    jobs = [dict(method=m, weights=w, seed=s) for s, (m, w) in enumerate(
        [("token", {"E": 1.0, "N": 1.0}), ("scr", {"T": 0.5, "E": 0.5}), ("spec", {"N": 1.0}),
         ("token-rs", {"E": 0.7, "T": 0.3}), ("base", None)])]
    alone = [fast.generate(SEQ[:3], max_new_tokens=10, ignore_eos=True, **j).token_ids for j in jobs]
    out: dict[int, list[int]] = {}

    def run(i):
        out[i] = gen.generate(SEQ[:3], max_new_tokens=10, ignore_eos=True, **jobs[i]).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    with b.paused():
        for t in threads:
            t.start()
        while b.waiting < len(jobs):
            threading.Event().wait(0.01)
    for t in threads:
        t.join(timeout=120)
    assert [out.get(i) for i in range(len(jobs))] == alone
    assert b.graphs.replays > 0 and b.calls > b.forwards


def test_a_shape_is_keyed_by_every_padded_dimension():
    assert len({Shape(16, 8, 1, 64), Shape(16, 8, 2, 64), Shape(16, 16, 1, 64), Shape(32, 8, 1, 64),
                Shape(16, 8, 1, 128)}) == 5


def test_a_prompt_whose_cached_prefix_leaves_a_few_tokens_is_a_static_step(tiny):
    """With the prefix cache (on in `personamix serve`), a prompt that starts after a cached
    16-token block has <= SHORT tokens left: a static step over restored slots, still exact."""
    base, adapters, fast = tiny
    b = static_backend(base, adapters)
    b.cache_prefixes(64)
    prompt = (SEQ * 2)[:19]                                   # one 16-token block + 3 tokens
    names = ("E", "T")
    with Session(b, names) as first:
        first.logits("all", prompt, 1)                        # a prompt: eager; stores the block
    replays = b.graphs.replays
    with Session(b, names) as again, Session(fast.backend, names) as alone:
        got = again.logits("all", prompt, 2)
        assert b.prefix_cache.tokens_saved >= 16 * 3 and b.graphs.replays == replays + 1
        assert torch.allclose(got, alone.logits("all", prompt, 2), atol=1e-5)
        nxt = again.logits("all", prompt + [1], 1)
        assert torch.allclose(nxt, alone.logits("all", prompt + [1], 1), atol=1e-5)
