"""spec's verification step (samplers/spec.py `_verify`): with one read-back, the same decisions,
last token, clamp count and random stream as the step it replaced (kept below as `former`), in
every branch: a rejection with a residual, a rejection whose residual is empty, a drafted token
off p*'s support, the whole chunk accepted (the bonus token), greedy."""
import pytest
import torch

from personamix.engine.samplers.common import draw, sample_token
from personamix.engine.samplers.spec import _verify
from personamix.engine.targets import Target, column_of, log_probs_on_support, token_target, vocab_id
from personamix.testing import SamplerWork

K, V = 3, 300


def former(logp_star, logq, clamped, col, on, ids, rng, greedy):
    """The step as it was: a read-back for the tests, one for the clamps, one or two for the last token."""
    k, idx = col.shape[0], col.view(-1, 1)
    if greedy:
        rejected = ((logp_star[:k].argmax(-1) != col) | ~on).tolist()
    else:
        p_star = logp_star[:k].gather(1, idx).squeeze(1).masked_fill(~on, float("-inf"))
        ratio = p_star - logq.gather(1, idx).squeeze(1)
        rejected = (torch.rand(k, generator=rng).log() >= ratio).tolist()
    n = rejected.index(True) if True in rejected else k
    clamps = 0 if clamped is None else int((clamped[:k].gather(1, idx).squeeze(1) & on)[: n + 1].sum())
    if greedy:
        u = int(logp_star[n].argmax())
    elif n < k:
        residual = (logp_star[n].exp() - logq[n].exp()).clamp_min(0)
        u = int(draw(residual, 1, rng)) if float(residual.sum()) > 0 else sample_token(logp_star[n], rng)
    else:
        u = sample_token(logp_star[k], rng)
    return n, vocab_id(ids, u), clamps


def _step(seed: int, case: str, weights=(0.3, -1.0, 0.1), top_p=0.9):
    """p* of 1 + 3 rows at K + 1 positions, a drafted chunk and its q, shaped by `case`."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(K + 1, V, generator=g) * 3
    logits = torch.cat([ref[None], ref + torch.randn(3, K + 1, V, generator=g)])          # [4, K+1, V]
    target = Target(("A", "B", "C"), weights, "linear", temperature=0.8, top_p=top_p)
    logp, ids = log_probs_on_support(logits, target)
    logp_star, _, clamped = token_target(logp, target)                                  # [K+1, U]
    q = logp[0, :K].clone()                                                             # the draft's q
    col = torch.stack([torch.multinomial(q[j].exp(), 1, generator=g)[0] for j in range(K)])
    if case == "near":                       # q = p*: every drafted token accepted, then the bonus
        q = logp_star[:K].clone()
    elif case == "empty":                    # q >= p* everywhere, far above at c_1: rejected, nothing left
        q = logp_star[:K].clone()
        q[0, col[0]] += 8.0
    tokens = col if ids is None else ids[col]
    if case == "off":                        # c_2 off p*'s support (rounding between two forwards)
        outside = [t for t in range(V) if ids is not None and t not in set(ids.tolist())]
        tokens[1] = outside[0]
    col = column_of(ids, tokens)
    on = tokens == (col if ids is None else ids[col])
    return logp_star, q, clamped if target.can_clamp else None, col, on, ids


@pytest.mark.parametrize("greedy", [False, True])
def test_the_step_is_the_former_one_in_every_branch(greedy):
    seen = set()
    for seed in range(40):
        for case in ("far", "near", "empty", "off"):
            args = _step(seed, case)
            a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            got, want = _verify(*args, a, greedy), former(*args, b, greedy)
            assert got == want, (seed, case)
            assert torch.equal(a.get_state(), b.get_state())
            n, _, clamps = got
            seen.add((case, "bonus" if n == K else "rejected"))
            seen.add(("clamped", clamps > 0))
    assert ("clamped", True) in seen and ("clamped", False) in seen
    if not greedy:
        assert {("near", "bonus"), ("empty", "rejected"), ("off", "rejected"), ("far", "rejected")} <= seen


def test_the_step_reads_back_once():
    args = _step(0, "far")
    with SamplerWork() as work:
        _verify(*args, torch.Generator().manual_seed(0), False)
    assert work.reads == 1
