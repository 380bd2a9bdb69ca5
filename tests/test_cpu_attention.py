"""The AVX2 attention kernel of packed short calls (backends/cpu_attention.py): softmax attention of
every row over its own slot and length, against the definition in float64, for every head layout
and row mix a packed forward gives it; the same bits on any number of threads; bad input refused."""
import os

import pytest
import torch

from personamix.backends.cpu_attention import attend, attention_problem, rows_of

PROBLEM = attention_problem(torch.float32, torch.device("cpu"), 64)
# CI builds the kernel (setup.py) on an x86-64 machine with AVX2: there a missing kernel fails
needs_kernel = pytest.mark.skipif(PROBLEM is not None and not os.environ.get("PERSONAMIX_REQUIRE_AVX2_KERNEL"),
                                  reason=f"AVX2 attention kernel not usable here: {PROBLEM}")


def reference(q, k, v, segments, scale):
    """o [R, H, D] by the definition: row i at position p of slot s, head h, reads KV head h // g,
    keys 0..p; in float64."""
    h, kv = q.shape[0], k.shape[1]
    out, i = [], 0
    for slot, past, t in segments:
        for j in range(t):
            keys = k[slot, :, :past + j + 1].double().repeat_interleave(h // kv, 0)       # [H, L, D]
            values = v[slot, :, :past + j + 1].double().repeat_interleave(h // kv, 0)
            p = torch.softmax(scale * (keys @ q[:, i].double().unsqueeze(-1)).squeeze(-1), -1)   # [H, L]
            out.append((p.unsqueeze(1) @ values).squeeze(1))
            i += 1
    return torch.stack(out).float()


def pool(slots, kv, capacity, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(slots, kv, capacity, d, generator=g), torch.randn(slots, kv, capacity, d, generator=g))


MIXES = {
    "decoding steps": [(s, 20 + 3 * s, 1) for s in range(6)],
    "chunks and drafts": [(4, 0, 1), (0, 10, 4), (2, 31, 8), (5, 40, 1), (1, 6, 3)],
    "one key": [(3, 0, 1)],
    "long context": [(1, 700, 2), (0, 9, 1)],
}


@needs_kernel
@pytest.mark.parametrize("mix", MIXES, ids=list(MIXES))
@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 16), (6, 2, 40), (8, 1, 128), (2, 1, 72), (3, 3, 8)],
                         ids=lambda x: "H{}-KV{}-D{}".format(*x))
def test_equals_attention_by_its_definition(mix, heads):
    """Grouped-query heads (g = 1, 2, 3, 8), head sizes that fill 64-wide column blocks, leave a
    rest (40, 72) or are one vector (8), keys in blocks of 8 with a rest, rows of 1..8 new tokens
    (causal among them) and a row that sees one key; q strided as the model hands it over."""
    h, kv, d = heads
    segments = MIXES[mix]
    k, v = pool(6, kv, 720, d)
    rows = rows_of(segments)
    q = torch.randn(1, rows.rows, h, d, generator=torch.Generator().manual_seed(1)).transpose(1, 2)[0]   # [H, R, D]
    got = attend(q, k, v, rows, d ** -0.5)
    want = reference(q, k, v, segments, d ** -0.5)
    assert got.shape == (rows.rows, h, d)
    assert torch.allclose(got, want, atol=2e-6, rtol=1e-5), (got - want).abs().max()


@needs_kernel
def test_large_scores_do_not_overflow():
    """Scores far above exp's range (softmax subtracts each row's max) and far below it (weights 0)."""
    k, v = pool(2, 1, 16, 8)
    k[0, 0, :5] *= 400
    rows = rows_of([(0, 4, 1), (1, 15, 1)])
    q = torch.randn(1, 2, 8) * 30
    got = attend(q, k, v, rows, 1.0)
    want = reference(q, k, v, [(0, 4, 1), (1, 15, 1)], 1.0)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, atol=1e-5)


@needs_kernel
def test_the_same_bits_on_one_thread_or_many(one_core_and_team):
    """Each (row, KV head) is computed by one thread in one order, whatever the team."""
    k, v = pool(40, 3, 200, 64)
    segments = [(s, 150, 1 + s % 4) for s in range(40)]
    rows = rows_of(segments)
    q = torch.randn(9, rows.rows, 64)
    one, team = one_core_and_team(lambda: attend(q, k, v, rows, 0.125))
    assert torch.equal(one, team)


@needs_kernel
def test_bad_input_is_refused_by_name():
    k, v = pool(2, 1, 16, 8)
    rows = rows_of([(0, 3, 2)])
    with pytest.raises(ValueError, match="pool holds 2 slots of 16"):
        attend(torch.randn(2, 2, 8), k, v, rows_of([(2, 3, 2)]), 1.0)     # a slot the pool has not
    with pytest.raises(ValueError, match="pool holds 2 slots of 16"):
        attend(torch.randn(2, 2, 8), k, v, rows_of([(0, 16, 2)]), 1.0)    # keys beyond its capacity
    with pytest.raises(ValueError, match="strides"):
        attend(torch.randn(2, 8, 2).transpose(1, 2), k, v, rows, 1.0)   # D not contiguous
    with pytest.raises(ValueError, match="3 rows.*maps of 2 rows"):
        attend(torch.randn(2, 3, 8), k, v, rows, 1.0)
    assert attend(torch.randn(2, 0, 8), k, v, rows_of([]), 1.0).shape == (0, 2, 8)


def test_what_the_kernel_does_not_run():
    assert "fp32" in attention_problem(torch.bfloat16, torch.device("cpu"), 64)
    assert "multiple of 8" in attention_problem(torch.float32, torch.device("cpu"), 60)
    assert "cuda" in attention_problem(torch.float32, torch.device("cuda"), 64)
