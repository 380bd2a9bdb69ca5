"""SCR's chunk scoring for many generations at once (engine/scoring.py): each chunk gets what it
would get alone, bit for bit, whatever its company; S_j is the prefixes' aggregated log ratios
(eq. 1 and 4) computed over the whole vocabulary; the cascade's uniforms come from each generation's
own generator; one read-back per kind of chunk."""
from dataclasses import replace

import pytest
import torch

from personamix.engine.scoring import Score, score_chunks, width
from personamix.engine.targets import Target, aggregate, column_of, log_probs, log_probs_on_support
from personamix.testing import SamplerWork

VOCAB = 49152
K = 4
#: "negative" sums below 0, so that S_j clamps for some prefixes and not for others
WEIGHTS = {"linear": (0.5, 0.3, 0.2), "negative": (0.3, -1.0, 0.1), "geometric": (0.6, 0.6, -0.2)}
#: the settings of the chunks' generations: top-p supports of tens, hundreds and thousands of
#: tokens over the draft's k positions, and the whole vocabulary
KINDS = [dict(temperature=0.7, top_p=0.9), dict(temperature=0.7, top_p=0.95), dict(temperature=1.0),
         dict(temperature=0.7, top_p=0.9), dict(temperature=1.3, top_p=0.8)]
SCALES = [8.0, 4.0, 2.5, 6.0, 8.0]


def _chunks(n: int, weights: str = "negative", seed: int = 0, uniforms: bool = True):
    """n drafted chunks as SCR scores them: (logits [N, k, U] of the 3 preference models on the
    union of the reference's k supports, the Score, the logits [N+1, k, V] over the vocabulary,
    the chunk's tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n):
        kind = KINDS[b % len(KINDS)]
        target = Target(("A", "B", "C"), WEIGHTS[weights], "geometric" if weights == "geometric" else "linear", **kind)
        ref = torch.randn(K, VOCAB, generator=g) * SCALES[b % len(SCALES)]
        prefs = ref + torch.randn(3, K, VOCAB, generator=g) * SCALES[b % len(SCALES)] / 3
        full = torch.cat([ref[None], prefs])                                          # [N+1, k, V]
        logp, ids = log_probs_on_support(full[:1], target)                             # [1, k, U]
        logq = logp[0]
        cols = torch.stack([torch.multinomial(logq[j].exp(), 1, generator=g)[0] for j in range(K)])
        tokens = cols if ids is None else ids[cols]
        on = prefs if ids is None else prefs.index_select(-1, ids)
        rng = torch.Generator().manual_seed(1000 + seed + b) if uniforms or b % 2 == 0 else None
        out.append((on, Score(target, logq, column_of(ids, tokens), rng), full, tokens))
    return out


def _fresh(chunks):
    """The same requests with generators in their starting state."""
    return [replace(sc, rng=None if sc.rng is None else torch.Generator().manual_seed(sc.rng.initial_seed()))
            for _, sc, _, _ in chunks]


def test_widths_depend_on_a_chunks_own_columns():
    assert [width(u) for u in (1, 64, 65, 200, 4096, 4097, VOCAB)] == [64, 64, 128, 256, 4096, 4097, VOCAB]


@pytest.mark.parametrize("weights", sorted(WEIGHTS))
def test_a_chunks_scores_are_the_same_alone_and_in_any_company(weights):
    """So a seeded SCR generation makes the same decisions alone or beside others, in any order;
    chunks of one key but different columns share a group."""
    chunks = _chunks(10, weights, uniforms=False)
    logits = [c[0] for c in chunks]
    keys = [sc.key for sc in _fresh(chunks)]
    assert any(keys.count(k) > 1 and len({c[0].shape[-1] for c, kk in zip(chunks, keys) if kk == k}) > 1
               for k in keys), "no group holds chunks of different widths"
    together = score_chunks(logits, _fresh(chunks))
    alone = [score_chunks([lg], [sc])[0] for lg, sc in zip(logits, _fresh(chunks))]
    assert together == alone
    order = list(range(10))[::-1]
    fresh = _fresh(chunks)
    assert score_chunks([logits[b] for b in order], [fresh[b] for b in order]) == [alone[b] for b in order]


@pytest.mark.parametrize("weights", sorted(WEIGHTS))
def test_scores_are_the_prefixes_aggregated_log_ratios(weights):
    """S_j = agg_i(sum_{m<=j} log pi_i(c_m) - log pi_ref(c_m)) with each pi on the reference's
    support, from log-probs over the whole vocabulary; the clamp flags are aggregate's."""
    chunks = _chunks(10, weights)
    scored = score_chunks([c[0] for c in chunks], _fresh(chunks))
    flags = []
    for (_, sc, full, tokens), got in zip(chunks, scored):
        logp = log_probs(full, sc.target, torch.isfinite(log_probs(full[:1], sc.target)[0]))   # [N+1, k, V]
        tok = logp[:, torch.arange(K), tokens]                                             # [N+1, k]
        s, clamped = aggregate((tok[1:] - tok[0]).cumsum(-1), sc.target.weights, sc.target.aggregation,
                               sc.target.clamp_floor)
        torch.testing.assert_close(torch.tensor(got.s), s, rtol=0, atol=1e-4)
        if sc.target.can_clamp:
            assert got.clamped == clamped.tolist()
            flags += got.clamped
        else:
            assert got.clamped is None
    if weights == "negative":
        assert any(flags) and not all(flags)          # both sides of the clamp are compared


def test_uniforms_come_from_each_generations_own_generator():
    """One log u per prefix from the chunk's generator (as SCR drew them itself); none, and the
    generator untouched, for a chunk verified exactly (rng None)."""
    chunks = _chunks(6, uniforms=False)
    requests = _fresh(chunks)
    scored = score_chunks([c[0] for c in chunks], requests)
    for sc, got in zip(requests, scored):
        if sc.rng is None:
            assert got.log_u is None
            continue
        mirror = torch.Generator().manual_seed(sc.rng.initial_seed())
        assert got.log_u == torch.rand(K, generator=mirror).log().tolist()
        assert torch.equal(sc.rng.get_state(), mirror.get_state())
    assert any(sc.rng is None for sc in requests) and any(sc.rng is not None for sc in requests)


def test_a_forwards_chunks_read_back_once_per_kind():
    """On a GPU every read-back waits for the stream: chunks of one kind read back as often as one
    chunk, and their operations grow far slower than their number."""
    chunks = [c for c in _chunks(40) if c[1].key == _chunks(1)[0][1].key][:8]
    assert len(chunks) == 8
    counted = {}
    for n in (1, 8):
        with SamplerWork() as work:
            score_chunks([c[0] for c in chunks[:n]], _fresh(chunks[:n]))
        counted[n] = work
    assert counted[1].reads == counted[8].reads == 1
    assert counted[8].ops < 8 * counted[1].ops / 3
    mixed = _chunks(5)
    requests = _fresh(mixed)
    with SamplerWork() as work:
        score_chunks([c[0] for c in mixed], requests)
    assert work.reads == len({sc.key for sc in requests}) > 1


def test_logits_and_requests_must_agree():
    (logits, score, _, _), = _chunks(1)
    with pytest.raises(ValueError, match="1 logits for 2 chunks"):
        score_chunks([logits], [score, score])
    with pytest.raises(ValueError, match=r"expected \[N, k, U\]"):
        score_chunks([logits[:, :2]], [score])
    with pytest.raises(ValueError, match=r"expected \[N, k, U\]"):
        score_chunks([logits], [replace(score, chunk=score.chunk[:2])])
