"""The target math on its own: aggregation formulas, clamps, support truncation, personas."""

import math

import pytest
import torch

from personamix import PersonamixError
from personamix.engine.samplers.common import draw
from personamix.engine.targets import (
    Target,
    aggregate,
    chunk_log_probs,
    log_probs,
    log_probs_on_support,
    prefix_scores,
    resolve_weights,
    token_target,
    vocab_id,
)
from personamix.mbti import parse_persona


def test_linear_matches_direct_formula_with_signed_weights():
    torch.manual_seed(0)
    l = torch.randn(3, 50, dtype=torch.float64) * 3
    w = torch.tensor([0.9, -0.4, 0.5], dtype=torch.float64)
    s, clamped = aggregate(l, w, "linear", floor=-30.0)
    direct = (w[:, None] * l.exp()).sum(0)
    assert torch.equal(clamped, direct <= 0)
    assert torch.allclose(s[~clamped], direct[~clamped].log())
    assert torch.all(s[clamped] == -30.0)


@pytest.mark.parametrize("weights", [[0.25, 0.25, 0.5], [0.7, 0.0, 0.3]])
def test_linear_fast_path_for_nonnegative_weights_equals_the_signed_formula(weights):
    torch.manual_seed(1)
    l = torch.randn(3, 40) * 3
    w = torch.tensor(weights)
    s, clamped = aggregate(l, w, "linear")
    signed, _ = aggregate(torch.cat([l, l[:1]]), torch.tensor(weights + [-1e-30]), "linear")   # forces the signed path
    assert not clamped.any()
    assert torch.allclose(s, signed, atol=1e-6)
    assert torch.allclose(s, (w[:, None] * l.exp()).sum(0).log(), atol=1e-5)


@pytest.mark.parametrize("aggregation,weights", [("linear", [0.25, 0.25, 0.5]), ("linear", [0.7, 0.0, 0.3]),
                                                 ("linear", [0.9, -0.4, 0.5]), ("geometric", [0.5, -1.0, 0.0])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_as_numbers_give_the_bits_of_weights_as_a_tensor(aggregation, weights, dtype):
    """Samplers pass Target.weights (numbers: prepared once, no read-back); a tensor of the same
    values gives the same bits, and a weight of 0 drops its model out."""
    torch.manual_seed(2)
    l = torch.randn(3, 2, 40, dtype=dtype) * 3
    s, clamped = aggregate(l, tuple(weights), aggregation)
    s2, clamped2 = aggregate(l, torch.tensor(weights, dtype=dtype), aggregation)
    assert torch.equal(s, s2) and torch.equal(clamped, clamped2)
    if 0.0 in weights:
        i = weights.index(0.0)
        l2 = l.clone()
        l2[i] = 1e4                                       # a dropped model's ratios change nothing
        assert torch.equal(aggregate(l2, tuple(weights), aggregation)[0], s)
    assert clamped.any() == (aggregation == "linear" and min(weights) < 0)


def test_can_clamp_is_linear_with_a_negative_weight():
    assert Target(names=("a", "b"), weights=(1.0, -0.5)).can_clamp
    assert not Target(names=("a", "b"), weights=(1.0, 0.0)).can_clamp
    assert not Target(names=("a", "b"), weights=(1.0, -0.5), aggregation="geometric").can_clamp


def test_linear_is_stable_for_large_ratios():
    l = torch.tensor([[800.0], [799.0]], dtype=torch.float64)
    s, clamped = aggregate(l, torch.tensor([1.0, -0.5], dtype=torch.float64), "linear")
    assert not clamped.any() and torch.isfinite(s).all()
    assert math.isclose(float(s), 800 + math.log(1 - 0.5 * math.exp(-1)), rel_tol=1e-12)


def test_geometric_is_weighted_sum():
    l = torch.randn(4, 7)
    w = torch.tensor([0.5, -1.0, 2.0, 0.0])
    s, clamped = aggregate(l, w, "geometric")
    assert torch.allclose(s, (w[:, None] * l).sum(0)) and not clamped.any()


def test_linear_with_convex_weights_is_the_mixture():
    torch.manual_seed(1)
    logits = torch.randn(4, 30)
    target = Target(names=("a", "b", "c"), weights=(0.2, 0.5, 0.3))
    logp = log_probs(logits, target)
    p_star = token_target(logp, target)[0].exp()
    mixture = (torch.tensor([0.2, 0.5, 0.3])[:, None] * logp[1:].exp()).sum(0)
    assert torch.allclose(p_star, mixture, atol=1e-6)


def test_geometric_is_product_of_experts():
    torch.manual_seed(2)
    logp = torch.log_softmax(torch.randn(3, 20, dtype=torch.float64), -1)
    target = Target(names=("a", "b"), weights=(0.7, -0.3), aggregation="geometric")
    got = token_target(logp, target)[0]
    want = torch.log_softmax((1 - 0.4) * logp[0] + 0.7 * logp[1] - 0.3 * logp[2], -1)
    assert torch.allclose(got, want)


def test_scaling_linear_weights_does_not_change_the_target():
    logp = torch.log_softmax(torch.randn(3, 20), -1)
    a = token_target(logp, Target(names=("a", "b"), weights=(0.3, 0.7)))[0]
    b = token_target(logp, Target(names=("a", "b"), weights=(3.0, 7.0)))[0]
    assert torch.allclose(a, b, atol=1e-6)


def test_temperature_and_truncation_share_the_reference_support():
    logits = torch.tensor([[4.0, 3.0, 1.0, 0.0, -1.0], [0.0, 0.0, 5.0, 0.0, 0.0]])
    t = Target(names=("a",), weights=(1.0,), top_k=2)
    logp = log_probs(logits, t)
    assert torch.isfinite(logp[:, :2]).all() and torch.isinf(logp[:, 2:]).all()
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2))
    p_star = token_target(logp, t)[0].exp()
    assert p_star[2:].sum() == 0 and math.isclose(float(p_star.sum()), 1.0, rel_tol=1e-6)
    top_p = log_probs(logits, Target(names=("a",), weights=(1.0,), top_p=0.5))
    assert torch.isfinite(top_p[0]).sum() == 1          # the first token alone has > 50% mass
    hot = log_probs(logits, Target(names=("a",), weights=(1.0,), temperature=2.0))
    assert torch.allclose(hot, torch.log_softmax(logits / 2, -1))


def test_chunk_scores_sum_token_log_ratios():
    torch.manual_seed(3)
    logits = torch.randn(3, 4, 6)                                         # N+1=3 rows, k=4 positions
    chunk = torch.tensor([1, 0, 5, 2])
    target = Target(names=("a", "b"), weights=(1.0, 1.0), aggregation="geometric")
    tok = chunk_log_probs(logits, target, torch.ones(4, 6, dtype=torch.bool), chunk)   # [3, 4]
    s, _ = prefix_scores(tok[0], tok[1:], target)
    logp = torch.log_softmax(logits, -1)[:, torch.arange(4), chunk]
    want = ((logp[1] - logp[0]).cumsum(0) + (logp[2] - logp[0]).cumsum(0))
    assert torch.allclose(s, want)


@pytest.mark.parametrize("settings", [{}, {"top_p": 0.6}, {"top_k": 3}, {"temperature": 0.7, "top_p": 0.9}])
def test_chunk_log_probs_are_log_probs_at_the_chunk(settings):
    """What SCR's cascade reads without building [R, k, V] log-probs: the same numbers, -inf off
    the support."""
    torch.manual_seed(4)
    logits = torch.randn(5, 4, 50) * 3                                    # R=5 rows, k=4 positions
    target = Target(names=("a",), weights=(1.0,), **settings)
    ref = log_probs(logits[0], target)                                    # [k, V] the proposal
    support = torch.isfinite(ref)
    full = log_probs(logits, target, support)                             # [R, k, V]
    chunk = torch.stack([torch.multinomial(ref[j].exp(), 1)[0] for j in range(4)])
    if settings:
        chunk[2] = int((~support[2]).nonzero()[0])                        # one token off the support
    got = chunk_log_probs(logits, target, support, chunk)
    want = full[:, torch.arange(4), chunk]
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.isinf(got[:, 2]).all() == bool(settings)
    assert torch.allclose(got[torch.isfinite(got)], want[torch.isfinite(want)], atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunk_log_probs_of_many_chunks_are_each_chunks_own_bit_for_bit(temperature):
    """Chunks scored at once ([R, b, k, U]) get the bits each gets alone ([R, k, U]), a whole
    support and an empty one among them (-inf there, not nan)."""
    torch.manual_seed(6)
    logits = torch.randn(5, 3, 4, 50) * 3                                 # R=5 rows, b=3 chunks, k=4
    support = torch.rand(3, 4, 50) < 0.3
    support[0, 1] = True                                                  # a whole row
    support[2, 3] = False                                                 # nothing: -inf everywhere
    chunk = torch.tensor([[7, 11, 0, 49], [1, 2, 3, 4], [9, 8, 7, 6]])
    target = Target(names=("a",), weights=(1.0,), temperature=temperature)
    together = chunk_log_probs(logits, target, support, chunk)            # [5, 3, 4]
    for b in range(3):
        assert torch.equal(together[:, b], chunk_log_probs(logits[:, b], target, support[b], chunk[b]))
    assert torch.isinf(together[:, 2, 3]).all() and not torch.isnan(together).any()
    assert torch.isfinite(together[:, 0, 1]).all()



@pytest.mark.parametrize("settings", [{}, {"top_p": 0.6}, {"top_k": 3}, {"temperature": 0.7, "top_p": 0.9}])
def test_log_probs_on_support_are_log_probs_on_the_supports_ids(settings):
    """What the samplers compute p* and draws over: log_probs' columns at the ids on the support
    (at any position), in vocabulary order; every other id is -inf in log_probs; ids None when
    nothing is truncated. A draw over those columns picks the token a draw over the vocabulary does."""
    torch.manual_seed(5)
    target = Target(names=("a",), weights=(1.0,), **settings)
    one = torch.randn(5, 50) * 3                                          # one position's rows: its own path
    got, ids = log_probs_on_support(one, target)
    full = log_probs(one, target)
    if settings:
        assert torch.equal(ids, torch.isfinite(full[0]).nonzero().squeeze(1)) and torch.isfinite(got).all()
        assert torch.allclose(got, full[:, ids], atol=1e-6)
    logits = torch.randn(5, 4, 50) * 3                                    # R=5 rows, k=4 positions
    full = log_probs(logits, target)                                      # [R, k, V]
    got, ids = log_probs_on_support(logits, target)
    if not settings:
        assert ids is None and torch.allclose(got, full)
        return
    on = torch.isfinite(full[0]).any(0)
    assert torch.equal(ids, on.nonzero().squeeze(1)) and len(ids) < 50   # ascending, exactly the support's ids
    assert torch.isinf(full[..., ~on]).all()
    assert torch.equal(torch.isinf(got), torch.isinf(full[..., ids]))
    assert torch.allclose(got[torch.isfinite(got)], full[..., ids][torch.isfinite(full[..., ids])], atol=1e-6)
    support = torch.isfinite(full[0])                                     # given explicitly: the same
    again, ids2 = log_probs_on_support(logits[1:], target, support)
    assert torch.equal(ids2, ids) and torch.allclose(again, got[1:])
    for j in range(4):                                                    # the same draws, mapped back
        p_full, p_on = full[0, j].exp(), got[0, j].exp()
        for seed in range(20):
            a = int(draw(p_full, 1, torch.Generator().manual_seed(seed)))
            b = vocab_id(ids, int(draw(p_on, 1, torch.Generator().manual_seed(seed))))
            assert a == b


def test_persona_parsing():
    assert parse_persona("ENTJ") == ["E", "N", "T", "J"]
    assert resolve_weights(list("EINSTFJP"), persona="IS") == {"I": 0.5, "S": 0.5}
    for bad, msg in [("entj", "uppercase"), ("EXTJ", "X"), ("EI", "both poles"), ("EE", "repeats"), ("", "non-empty")]:
        with pytest.raises(PersonamixError, match=msg):
            parse_persona(bad)
    with pytest.raises(PersonamixError, match="needs adapter"):
        resolve_weights(["E", "N"], persona="ENTJ")


@pytest.mark.parametrize("weights,agg,msg", [
    ({"a": 0.0, "b": 0.0}, "linear", "all zero"),
    ({"a": -1.0, "b": 0.0}, "linear", "at least one positive"),
    ({"a": float("nan")}, "geometric", "finite"),
    ({"a": float("inf")}, "linear", "finite"),
])
def test_weights_that_cannot_form_a_distribution(weights, agg, msg):
    with pytest.raises(PersonamixError, match=msg):
        Target(names=tuple(weights), weights=tuple(weights.values()), aggregation=agg)


def test_negative_only_weights_are_fine_for_geometric():
    Target(names=("a",), weights=(-1.0,), aggregation="geometric")


@pytest.mark.parametrize("kw,msg", [
    ({"temperature": 0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"aggregation": "harmonic"}, "aggregation"),
])
def test_bad_target_settings(kw, msg):
    with pytest.raises(PersonamixError, match=msg):
        Target(names=("a",), weights=(1.0,), **kw)


def test_top_p_on_a_sorted_prefix_keeps_what_sorting_everything_keeps(monkeypatch):
    """_support sorts only the most likely tokens for top-p (longer prefixes while the shorter do
    not hold top_p of the mass, then all of them): whichever it stops at, the kept set is the
    full sort's."""
    from personamix.engine import targets

    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 5.0):                     # flat (falls back) .. peaked (prefix suffices)
        logits = torch.randn(4, 300, generator=g) * scale
        for top_p in (0.05, 0.5, 0.9, 0.99):
            monkeypatch.setattr(targets, "TOP_P_PREFIXES", ())
            full = targets._support(logits, 0, top_p)
            for prefixes in ((), (16,), (4, 16), (2, 8, 64)):
                monkeypatch.setattr(targets, "TOP_P_PREFIXES", prefixes)
                assert torch.equal(targets._support(logits, 0, top_p), full)
                for row in range(4):                  # one position's ids (log_probs_on_support's own path)
                    assert torch.equal(targets._support_ids(logits[row], top_p), full[row].nonzero().squeeze(1))
            assert full.any(-1).all()                 # the most likely token always stays


@pytest.mark.parametrize("full_row", [False, True], ids=["truncated", "one-row-untruncated"])
def test_a_drafts_rows_on_the_union_of_their_supports(full_row):
    """draft()'s [k, U] log-probs on the union of its positions' supports: what writing [V] rows
    (-inf off each support) and keeping the ids where any row is finite gives, without [k, V]
    passes; a row over the whole vocabulary (nothing truncated) keeps [k, V] and no ids."""
    from personamix.engine.samplers.common import _on_union

    torch.manual_seed(0)
    vocab = 50
    supports = [torch.randperm(vocab)[:n].sort().values for n in (3, 9, 1, 6)]
    rows = [torch.log_softmax(torch.randn(len(ids)), -1) for ids in supports]
    rows[1][2] = float("-inf")       # on a top-k support yet of probability 0: its column stays, -inf everywhere
    if full_row:
        supports[2], rows[2] = None, torch.log_softmax(torch.randn(vocab), -1)
    whole = torch.stack([row if ids is None else torch.full((vocab,), float("-inf")).index_copy_(0, ids, row)
                         for row, ids in zip(rows, supports)])                             # [k, V]
    got, ids = _on_union(rows, supports)
    if full_row:
        assert ids is None and torch.equal(got, whole)
        return
    assert torch.equal(ids, torch.cat(supports).unique()) and bool((ids[1:] > ids[:-1]).all())
    assert torch.equal(got, whole[:, ids])
    assert not bool(torch.isfinite(whole[:, ids.new_tensor(sorted(set(range(vocab)) - set(ids.tolist())))]).any())
