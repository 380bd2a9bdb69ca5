"""The AVX2 multi-LoRA delta kernel (backends/cpu_lora.py): y[p] += (x[p] A[a]) B[a] for every
position of every segment, against the definition in float64, for the sizes and segment mixes a
forward gives it (ranks padded to 8, more than 24 of them, output columns in part tiles and
chunks, block-diagonal B); the same bits on any number of threads; bad input refused."""
import os

import pytest
import torch

from personamix.backends import cpu_lora
from personamix.backends.cpu_lora import LoraWeights, Segments, add_deltas, lora_problem

PROBLEM = lora_problem(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))
# CI builds the kernel (setup.py) on an x86-64 machine with AVX2: there a missing kernel fails
needs_kernel = pytest.mark.skipif(PROBLEM is not None and not os.environ.get("PERSONAMIX_REQUIRE_AVX2_KERNEL"),
                                  reason=f"AVX2 LoRA kernel not usable here: {PROBLEM}")

MIXES = {   # (adapter, positions) of T = 20 positions; positions outside every segment get no delta
    "packed calls": [(2, [0, 5, 6, 7, 13]), (0, [1, 2, 3, 4, 8, 9, 10, 11, 12]), (1, [19])],
    "one call's rows": [(0, [4]), (1, [5]), (2, [6]), (3, [7])],
    "unordered, an adapter twice": [(3, [17, 2, 11]), (1, [0, 1]), (3, [9, 10, 12, 14, 15, 16, 18])],
    "one position": [(1, [13])],
}


def reference(x, y, a, b, groups):
    want = y.double().clone()
    for ad, members in groups:
        for p in members:
            want[p] += (x[p].double() @ a[ad].double()) @ b[ad].double()
    return want.float()


def weights(n, k, r, o, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, r, generator=g) / k ** 0.5, torch.randn(n, r, o, generator=g)


@needs_kernel
@pytest.mark.parametrize("mix", MIXES, ids=list(MIXES))
@pytest.mark.parametrize("sizes", [(16, 4, 8), (40, 8, 24), (24, 24, 200), (64, 40, 96), (8, 12, 16)],
                         ids=lambda s: "K{}-R{}-O{}".format(*s))
def test_equals_deltas_by_their_definition(mix, sizes):
    """Ranks 4 and 12 (padded to 8 and 16), 24 (one tile of xa) and 40 (24 + 16); output columns
    of one vector (8), part tiles (16, 200 = 8 tiles of 24 and one of 8), whole 96-column chunks;
    segments of 1..9 positions (tiles of 4 and their rests)."""
    k, r, o = sizes
    a, b = weights(4, k, r, o)
    groups = MIXES[mix]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, k, generator=g), torch.randn(20, o, generator=g)
    got = y.clone()
    add_deltas(x, got, LoraWeights.of(a, b), Segments.of(groups))
    assert torch.allclose(got, reference(x, y, a, b, groups), atol=1e-5, rtol=1e-5)
    touched = sorted(p for _, members in groups for p in members)
    untouched = [p for p in range(20) if p not in touched]
    assert torch.equal(got[untouched], y[untouched])        # rows of no segment (a reference row) as they were


@needs_kernel
def test_a_block_diagonal_b_reads_only_its_blocks():
    """A fused q/k/v layer's B (qkv.py): per 8 columns, the rank rows where some adapter is nonzero;
    a column block no adapter touches gets no delta. The result is the dense one."""
    k, r, o = 32, 24, 120
    a, b = weights(3, k, r, o)
    mask = torch.zeros(r, o, dtype=torch.bool)
    mask[0:8, 0:48] = mask[8:16, 48:72] = mask[16:24, 72:96] = True    # columns 96..119: no adapter
    b = b * mask
    w = LoraWeights.of(a, b)
    assert w.jlo.tolist() == [0] * 6 + [8] * 3 + [16] * 3 + [24] * 3
    assert w.jhi.tolist() == [8] * 6 + [16] * 3 + [24] * 3 + [0] * 3
    groups = [(0, [0, 1, 2, 3, 4]), (2, [6, 7]), (1, [5])]
    x, y = torch.randn(8, k), torch.randn(8, o)
    got = y.clone()
    add_deltas(x, got, w, Segments.of(groups))
    assert torch.allclose(got, reference(x, y, a, b, groups), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[:, 96:], y[:, 96:])


def test_padding_the_rank_is_exact_and_shares_memory_where_none_is_needed():
    a, b = weights(2, 16, 5, 24)
    w = LoraWeights.of(a, b)
    assert w.a.shape == (2, 16, 8) and w.b.shape == (2, 8, 24)
    assert torch.equal(w.a[:, :, :5], a) and not w.a[:, :, 5:].any() and not w.b[:, 5:].any()
    a8, b8 = weights(2, 16, 8, 24)
    w8 = LoraWeights.of(a8, b8)
    assert w8.a.data_ptr() == a8.data_ptr() and w8.b.data_ptr() == b8.data_ptr()


@needs_kernel
@pytest.mark.parametrize("positions", [6, 60])
def test_the_same_bits_on_one_core_and_in_a_team(one_core_and_team, positions):
    """A decoding step's few positions (one tile per segment) and a busy forward's many."""
    k, r, o = 576, 24, 960
    a, b = weights(8, k, r, o)
    w = LoraWeights.of(a, b)
    groups = [(i % 8, list(range(i, positions, 9))) for i in range(9)]
    x, y = torch.randn(positions, k), torch.randn(positions, o)

    def run():
        out = y.clone()
        add_deltas(x, out, w, Segments.of(groups))
        return out

    one, team = one_core_and_team(run)
    assert torch.equal(one, team)
    assert torch.allclose(one, reference(x, y, a, b, groups), atol=1e-4, rtol=1e-4)


@needs_kernel
def test_bad_input_is_refused_by_name():
    a, b = weights(2, 16, 8, 24)
    w = LoraWeights.of(a, b)
    x, y = torch.randn(4, 16), torch.randn(4, 24)
    with pytest.raises(ValueError, match="two segments"):
        Segments.of([(0, [0, 1]), (1, [1])])
    with pytest.raises(ValueError, match="position 4"):
        add_deltas(x, y, w, Segments.of([(0, [4])]))
    with pytest.raises(ValueError, match="adapter 2"):
        add_deltas(x, y, w, Segments.of([(2, [0])]))
    with pytest.raises(ValueError, match="16 -> 24 features"):
        add_deltas(torch.randn(4, 8), y, w, Segments.of([(0, [0])]))
    with pytest.raises(ValueError, match="contiguous: False"):
        add_deltas(x, torch.randn(24, 4).T, w, Segments.of([(0, [0])]))


def test_where_the_kernel_cannot_run_it_says_why(monkeypatch):
    a, b = weights(2, 16, 8, 24)
    assert "fp32" in lora_problem(a.bfloat16(), b.bfloat16())
    assert "not a multiple of 8" in lora_problem(a, b[:, :, :20])
    assert "meta" in lora_problem(a.to("meta"), b.to("meta"))
    monkeypatch.setattr(cpu_lora, "CPU_LORA", "torch")
    assert lora_problem(a, b) == "PERSONAMIX_CPU_LORA=torch"
