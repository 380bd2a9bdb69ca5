"""The next-token draws of many generations at once (engine/draws.py), from the reference or from
the token-level target p* of N+1 rows (`mixed`): each draw gets what it would get alone, bit for
bit, whatever its company; the same token and support as the samplers' one-row path; draws
distributed as the truncated, tempered reference; two read-backs per pass."""
from dataclasses import replace

import pytest
import torch

from personamix import PersonamixError
from personamix.engine.draws import Draw, draw_next
from personamix.engine.samplers.common import rejection_sample_token, sample_token
from personamix.engine.stats import Stats
from personamix.engine.targets import TOP_P_PREFIXES, Target, column_of, log_probs_on_support, token_target
from personamix.testing import SamplerWork, tv, tv_bound

VOCAB = 49152


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    """Rows of every kind top-p meets: peaked (the 64 most likely hold top_p), broader (1,024
    do), flat (only the whole vocabulary does)."""
    g = torch.Generator().manual_seed(seed)
    scales = [8.0, 2.5, 0.05]
    return torch.stack([torch.randn(VOCAB, generator=g) * scales[r % 3] for r in range(rows)])


def _draws(rows: int, seed: int) -> list[Draw]:
    """Requests of every kind: temperatures, top-p values, no truncation, top-k, greedy."""
    kinds = [dict(temperature=0.7, top_p=0.9), dict(temperature=1.0, top_p=0.95), dict(temperature=1.3),
             dict(temperature=0.5, top_p=0.8), dict(top_k=5), dict(temperature=0.7, top_p=0.9, greedy=True)]
    out = []
    for r in range(rows):
        kind = dict(kinds[r % len(kinds)])
        greedy = kind.pop("greedy", False)
        out.append(Draw(Target((), (), **kind), torch.Generator().manual_seed(seed + r), greedy))
    return out


def _same(a, b) -> bool:
    return (a.token == b.token and torch.equal(a.logq, b.logq)
            and (a.ids is None and b.ids is None or a.ids is not None and b.ids is not None
                 and torch.equal(a.ids, b.ids)))


def test_the_logits_cover_every_top_p_width():
    x = _logits(3)
    probs = torch.softmax(x / 0.7, -1)
    held = [torch.topk(probs, m, -1).values.sum(-1) >= 0.9 for m in TOP_P_PREFIXES]
    assert held[0].tolist() == [True, False, False] and held[1].tolist() == [True, True, False]


@pytest.mark.parametrize("rows_per_pass", [1, 5, 12])
def test_a_rows_draw_is_the_same_alone_and_in_any_company(rows_per_pass):
    """So a seeded generation draws the same tokens and q alone or beside others, in any order."""
    x = _logits(12)
    together = draw_next(x, _draws(12, 7), rows_per_pass=rows_per_pass)
    ds = _draws(12, 7)
    alone = [draw_next(x[r:r + 1], [ds[r]])[0] for r in range(12)]
    assert all(_same(a, t) for a, t in zip(alone, together))
    order = list(range(12))[::-1]                                     # other neighbours, other positions
    ds = _draws(12, 7)
    shuffled = draw_next(x[order], [ds[r] for r in order])
    assert all(_same(alone[r], s) for r, s in zip(order, shuffled))


def test_a_draw_ahead_puts_its_generator_back_and_is_taken_only_while_nothing_drew_from_it():
    """Draw.ahead (SCR's next draft step, drawn in the scoring forward): the generator is left as it
    was; taking the draw then is drawing it then, bit for bit (token, q, and the generator after);
    once anything drew from the generator it is not taken. In company of draws that are not ahead,
    those use their generators as always."""
    x = _logits(6, seed=2)
    plain = _draws(6, 11)
    ahead = [replace(d, ahead=r % 2 == 0) for r, d in enumerate(_draws(6, 11))]   # greedy, top-k, top-p among them
    before = [d.rng.get_state() for d in ahead]
    made = draw_next(x, ahead)
    now = draw_next(x, plain)                                         # the same draws, made in their turn
    for r, (d, m, n) in enumerate(zip(ahead, made, now)):
        assert _same(m, n)
        if not d.ahead:
            assert m.rng_states is None and torch.equal(d.rng.get_state(), plain[r].rng.get_state())
            continue
        assert torch.equal(d.rng.get_state(), before[r])             # put back
        assert m.take(d.rng) and torch.equal(d.rng.get_state(), plain[r].rng.get_state())   # moved on as if drawn now
        assert not m.take(d.rng)                                      # a draw is taken once
    late = replace(_draws(1, 5)[0], ahead=True)
    m = draw_next(x[:1], [late])[0]
    torch.rand(1, generator=late.rng)                                 # something else drew from it meanwhile
    assert not m.take(late.rng)


def test_draws_give_the_samplers_one_row_token_and_support():
    x = _logits(12, seed=1)
    drawn = draw_next(x, _draws(12, 3))
    for r, d in enumerate(_draws(12, 3)):
        logq, ids = log_probs_on_support(x[r:r + 1], d.target)
        assert sample_token(logq[0], d.rng, d.greedy, ids) == drawn[r].token
        assert (ids is None) == (drawn[r].ids is None)
        if ids is not None:
            assert torch.equal(ids, drawn[r].ids)
        torch.testing.assert_close(drawn[r].logq, logq[0], rtol=0, atol=1e-6)
        assert torch.isfinite(drawn[r].logq).all()                     # q on its support, nothing off it


@pytest.mark.parametrize("kind", [dict(temperature=0.7, top_p=0.8), dict(temperature=1.5), dict(top_k=6)])
def test_draws_follow_the_truncated_tempered_reference(kind):
    """2,000 rows of one distribution, each with its own generator: the draws' empirical
    distribution is within the sampling bound of softmax(logits / T) on the support, and no
    token off the support is ever drawn."""
    g = torch.Generator().manual_seed(5)
    row = torch.randn(300, generator=g) * 2.5
    target = Target((), (), **kind)
    logq, ids = log_probs_on_support(row[None], target)
    ids = range(300) if ids is None else ids.tolist()
    p = dict(zip(ids, logq[0].exp().tolist()))
    n = 2000
    drawn = draw_next(row.expand(n, -1), [Draw(target, torch.Generator().manual_seed(i)) for i in range(n)])
    counts: dict[int, float] = {}
    for d in drawn:
        counts[d.token] = counts.get(d.token, 0) + 1 / n
    assert set(counts) <= set(p)
    assert tv(counts, p) < tv_bound(p, n)


def test_a_pass_reads_back_once_per_width_tried_and_once_for_its_tokens():
    """On a GPU every read-back waits for the stream: a pass of many rows reads back as often as
    one row, and its operations grow far slower than its rows."""
    x = _logits(12)
    top_p = Target((), (), temperature=0.7, top_p=0.9)
    counted = {}
    for rows in (1, 12):
        with SamplerWork() as work:
            draws = [Draw(top_p, torch.Generator().manual_seed(r)) for r in range(rows)]
            draw_next(x[:rows], draws, rows_per_pass=rows)
        counted[rows] = work
    assert counted[1].reads == 2                   # the 64 most likely hold top_p: one width, then the token
    assert counted[12].reads == 4                  # rows at 64, 1,024 and the whole vocabulary
    assert counted[12].ops < 12 * counted[1].ops / 2
    with SamplerWork() as work:
        draw_next(x[:12:3], [Draw(top_p, torch.Generator().manual_seed(r)) for r in range(4)])   # all peaked
    assert work.reads == 2


def test_a_row_without_mass_fails_alone_and_by_name():
    x = _logits(3)
    x[1] = float("nan")
    ds = [Draw(Target((), (), temperature=0.7, top_p=0.9), torch.Generator().manual_seed(r)) for r in range(3)]
    drawn = draw_next(x, ds)
    assert drawn[1].token == -1
    with pytest.raises(PersonamixError, match="mass is nan"):
        drawn[1].checked()
    ok = [Draw(Target((), (), temperature=0.7, top_p=0.9), torch.Generator().manual_seed(r)) for r in (0, 2)]
    assert [d.checked().token for d in (drawn[0], drawn[2])] == [d.token for d in draw_next(x[[0, 2]], ok)]
    whole = draw_next(torch.full((1, 7), float("nan")), [Draw(Target((), ()), torch.Generator())])[0]
    with pytest.raises(PersonamixError, match="mass"):
        whole.checked()


def test_greedy_rows_take_the_argmax_and_leave_their_generator_alone():
    x = _logits(3)
    x[0, 11] = x[0, 40] = x[0].max() + 1.0                            # a tie: the smaller id, as argmax
    gens = [torch.Generator().manual_seed(r) for r in range(3)]
    states = [g.get_state() for g in gens]
    drawn = draw_next(x, [Draw(Target((), (), top_p=p), g, greedy=True) for p, g in zip((0.9, 1.0, 0.5), gens)])
    assert [d.token for d in drawn] == [11] + x[1:].argmax(-1).tolist()
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states))


def test_logits_and_requests_must_agree():
    with pytest.raises(ValueError, match="expected"):
        draw_next(torch.zeros(2, 5), [Draw(Target((), ()), torch.Generator())])


#: "negative" sums below 0: where sum_i alpha_i r_i <= 0 on the whole support, every score is
#: clamped and p* is the reference there, so drawn tokens carry the clamp flag too
WEIGHTS = {"linear": (0.5, 0.3, 0.2), "negative": (0.3, -1.0, 0.1), "geometric": (0.6, 0.6, -0.2)}


def _mixed_logits(draws: int, seed: int = 0) -> torch.Tensor:
    """[draws, 4, V]: a reference of every top-p kind (as _logits) and 3 preference models near it."""
    g = torch.Generator().manual_seed(seed + 100)
    ref = _logits(draws, seed)
    prefs = ref[:, None] + torch.randn(draws, 3, VOCAB, generator=g) * ref.std(-1, keepdim=True)[:, None] / 3
    return torch.cat([ref[:, None], prefs], dim=1)


def _mixed_draws(draws: int, seed: int, weights: str = "negative") -> list[Draw]:
    """_draws' requests of every kind, as `token` steps with these weights."""
    agg = "geometric" if weights == "geometric" else "linear"
    return [Draw(replace(d.target, names=("A", "B", "C"), weights=WEIGHTS[weights], aggregation=agg),
                 d.rng, d.greedy, mixed=True) for d in _draws(draws, seed)]


@pytest.mark.parametrize("weights", sorted(WEIGHTS))
def test_a_mixed_draw_is_the_same_alone_and_in_any_company(weights):
    """The `token` method's step (p* of N+1 rows): a seeded generation draws the same bits alone
    or beside others with the same weights, whatever their temperature / top-p / top-k / greedy."""
    x = _mixed_logits(12)
    together = draw_next(x, _mixed_draws(12, 7, weights), rows_per_pass=12)
    ds = _mixed_draws(12, 7, weights)
    alone = [draw_next(x[r:r + 1], [ds[r]])[0] for r in range(12)]
    assert all(_same(a, t) and a.clamps == t.clamps for a, t in zip(alone, together))
    order = [5, 2, 11, 0, 7]
    ds = _mixed_draws(12, 7, weights)
    assert all(_same(alone[r], s) for r, s in zip(order, draw_next(x[order], [ds[r] for r in order])))


@pytest.mark.parametrize("weights", sorted(WEIGHTS))
def test_a_mixed_draw_gives_the_one_row_paths_token_support_and_clamps(weights):
    """Against the `token` sampler's former step over one generation: log_probs_on_support of the
    N+1 rows, token_target (eq. 5), sample_token; the clamp flag is the clamped score's at the token."""
    x = _mixed_logits(12, seed=2)
    drawn = draw_next(x, _mixed_draws(12, 3, weights))
    for r, d in enumerate(_mixed_draws(12, 3, weights)):
        logp, ids = log_probs_on_support(x[r], d.target)                        # [4, U]
        logp_star, _, clamped = token_target(logp, d.target)
        t = sample_token(logp_star, d.rng, d.greedy, ids)
        assert t == drawn[r].token
        torch.testing.assert_close(drawn[r].logq, logp_star, rtol=0, atol=1e-5)
        assert (ids is None) == (drawn[r].ids is None) and (ids is None or torch.equal(ids, drawn[r].ids))
        flag = bool(clamped[column_of(ids, torch.tensor([t]))]) if d.target.can_clamp else False
        assert drawn[r].clamps == flag
    if weights == "negative":               # drawn tokens with and without the flag, or the check proves little
        assert {d.clamps for d in drawn} == {1, 0}


def test_mixed_draws_read_back_as_often_as_the_references():
    """Their clamp flags come back with their tokens; 12 generations' steps cost a fraction of 12 steps."""
    x = _mixed_logits(12)
    counted = {}
    for rows in (1, 12):
        for weights in ("linear", "negative"):
            ds = _mixed_draws(rows, 7, weights)
            ds = [Draw(replace(d.target, top_k=0, top_p=0.9, temperature=0.7), d.rng, False, True) for d in ds]
            with SamplerWork() as work:
                draw_next(x[:rows], ds, rows_per_pass=rows)
            counted[rows, weights] = work
    assert counted[1, "linear"].reads == counted[1, "negative"].reads == 2
    assert counted[12, "negative"].reads == 4                      # three widths, then tokens with their flags
    assert counted[12, "linear"].ops < 12 * counted[1, "linear"].ops / 3


def test_mixed_draws_of_other_weights_or_rows_are_refused_together():
    x = _mixed_logits(2)
    ds = _mixed_draws(1, 0, "linear") + _mixed_draws(1, 0, "negative")
    with pytest.raises(ValueError, match="one `mix`"):
        draw_next(x, ds)
    with pytest.raises(ValueError, match="expected"):
        draw_next(x[:, 0], _mixed_draws(2, 0))                      # the reference's rows only
    with pytest.raises(ValueError, match="expected"):
        draw_next(x, _draws(2, 0))                                  # reference draws over N + 1 rows


def _rs_draws(draws: int, seed: int, weights: str, propose: int) -> list[Draw]:
    return [Draw(d.target, d.rng, mixed=True, propose=propose) for d in _mixed_draws(draws, seed, weights)]


@pytest.mark.parametrize("weights", sorted(WEIGHTS))
def test_a_token_rs_draw_is_the_same_alone_and_in_any_company(weights):
    x = _mixed_logits(12)
    together = draw_next(x, _rs_draws(12, 7, weights, 3), rows_per_pass=12)
    ds = _rs_draws(12, 7, weights, 3)
    alone = [draw_next(x[r:r + 1], [ds[r]])[0] for r in range(12)]
    assert all(_same(a, t) and (a.clamps, a.proposals, a.accepted) == (t.clamps, t.proposals, t.accepted)
               for a, t in zip(alone, together))
    assert {d.accepted for d in together} == {True, False}          # both outcomes are compared


@pytest.mark.parametrize("weights", sorted(WEIGHTS))
def test_a_token_rs_draw_is_the_samplers_first_block(weights):
    """The same proposals, uniforms and decision as common.rejection_sample_token's first block of
    one generation: where it accepts, the same token, proposals tried and clamps, and the generator
    left where the sampler leaves it; where it does not, no token and the whole block tried."""
    propose = 3
    x = _mixed_logits(12, seed=4)
    mine = _rs_draws(12, 5, weights, propose)
    drawn = draw_next(x, mine)
    for r, d in enumerate(_rs_draws(12, 5, weights, propose)):
        logp, ids = log_probs_on_support(x[r], d.target)
        stats = Stats("token-rs")
        t, tried, ok = rejection_sample_token(logp, d.target, d.rng, propose, stats, ids)
        got = drawn[r].checked()
        assert got.accepted == ok
        if ok:
            assert (got.token, got.proposals, got.clamps) == (t, tried, stats.clamps)
            assert torch.equal(mine[r].rng.get_state(), d.rng.get_state())
        else:                                  # the sampler went on to p* (max_retries = propose)
            assert got.token == -1 and got.proposals == propose and stats.rs_exhausted == 1
    assert {d.accepted for d in drawn} == {True, False}
    if weights == "negative":
        assert any(d.clamps for d in drawn)


def test_a_token_rs_draw_needs_a_mixed_draw_that_is_not_greedy():
    t = Target(("A",), (1.0,))
    for kw in (dict(propose=2), dict(mixed=True, greedy=True, propose=2), dict(mixed=True, propose=-1)):
        with pytest.raises(ValueError, match="propose"):
            Draw(t, torch.Generator(), **kw)
