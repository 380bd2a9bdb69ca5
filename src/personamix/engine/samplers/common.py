"""Pieces the samplers share: sampling a token, drafting from the reference, Token-RS (with the
exact bound, and over an inference engine with the sliding-window bound)."""

from __future__ import annotations

import math
from collections import deque

import torch

from ..draws import RS_BLOCK, inverse_cdf, no_mass, rs_block, usable
from ..session import Session
from ..stats import Stats
from ..targets import Target, aggregate, to_vocabulary, token_scores

#: proposals a Token-RS round over an engine asks the reference for in one call
ENGINE_PROPOSALS = 2   # measured fastest for token-rs of 1, 2, 4 (docs/scale-out.md)


# A read-back (`int(t)`, `bool(t)`, `.tolist()`) waits, on a GPU, for every kernel queued before
# it, and a busy server's generations all queue on one stream: the functions below read back once
# per decision where they can, and never for what the host already knows (Target.can_clamp).

def _draw(p: torch.Tensor, n: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw` without its check: (draws [n], p's total mass, 0-d; see `usable`)."""
    cdf = p.cumsum(0)
    u = torch.rand(n, generator=rng, device=p.device, dtype=cdf.dtype)
    return inverse_cdf(cdf, u), cdf[-1]


def draw(p: torch.Tensor, n: int, rng: torch.Generator) -> torch.Tensor:
    """n independent draws [n] from unnormalised probabilities `p` [V], by inverse CDF
    (torch.multinomial takes ~1 ms on a 49k vocabulary on CPU, this ~0.2 ms)."""
    i, total = _draw(p, n, rng)
    if not bool(usable(total)):
        raise no_mass(total)
    return i


def sample_token(logp: torch.Tensor, rng: torch.Generator, greedy: bool = False,
                 ids: torch.Tensor | None = None) -> int:
    """One draw from the distribution with log-probabilities `logp` [U]; its argmax when `greedy`.
    ids: the vocabulary id of each column (targets.log_probs_on_support; None: column = id),
    mapped before the one read-back (on a GPU, one sync per token)."""
    if greedy:
        i = logp.argmax().view(1)                                                      # [1]
        return int(i if ids is None else ids[i])
    i, total = _draw(logp.exp(), 1, rng)                                               # [1]
    t = int(torch.where(usable(total), i if ids is None else ids[i], -1))            # -1: nothing to sample
    if t < 0:
        raise no_mass(total)
    return t


def draft(session: Session, seq: list[int], k: int, target: Target, rng: torch.Generator,
          greedy: bool = False) -> tuple[list[int], torch.Tensor, torch.Tensor | None]:
    """Sample k tokens from the reference after `seq` (k single-row forwards, each drawn by the
    backend with its forward's other draws: Session.draw; its argmax when `greedy`).

    Returns the chunk, the reference log-probs at its k positions [k, U] (with the target's
    temperature / top-k / top-p: the proposal q of every drafted token) and the vocabulary ids of
    their columns [U]: the union of the k positions' supports, ascending, each row -inf off its
    own (targets.log_probs_on_support); None, and U = V, when nothing is truncated.
    """
    chunk: list[int] = []
    rows, supports = [], []
    for _ in range(k):
        drawn = session.draw(seq + chunk, target, rng, greedy)                        # q [U_j] on ids [U_j]
        chunk.append(drawn.token)
        rows.append(drawn.logq)
        supports.append(drawn.ids)
    return (chunk, *_on_union(rows, supports))


def _on_union(rows: list[torch.Tensor],
              supports: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of log-probs [U_j] on their own ids -> [k, U] on the union of the ids (-inf elsewhere) and
    that union [U]; [k, V] and None where a row covers the vocabulary. Built on the supports' ids:
    the same as writing [V] rows and finding the ids where any is finite, without four passes
    over [k, V] (isfinite alone ~0.2 ms at k=4 on one core)."""
    if any(ids is None for ids in supports):
        v = next(row.shape[0] for row, ids in zip(rows, supports) if ids is None)
        return torch.stack([to_vocabulary(row, ids, v) for row, ids in zip(rows, supports)]), None
    union = torch.cat(supports).unique()                                               # [U] ascending
    return torch.stack([row.new_full(union.shape, float("-inf")).index_copy_(0, torch.searchsorted(union, ids), row)
                        for row, ids in zip(rows, supports)]), union


def rejection_sample_token(logp: torch.Tensor, target: Target, rng: torch.Generator,
                           max_retries: int, stats: Stats,
                           ids: torch.Tensor | None = None) -> tuple[int, int, bool]:
    """Token-RS at one position (the paper's baseline), exact for p*.

    logp [N+1, V]: log-probs of every row at this position. Propose t ~ pi_ref and accept with
    probability exp(S(t) - log M), log M = max_t S(t) over the support (the exact bound, so the
    accepted token is distributed as p*). After `max_retries` rejections the token is drawn
    from p* directly: every branch then yields p*, so the bounded loop stays exact.
    Proposals at one position need no new forward, so they are drawn in blocks, and a block is
    read back once (whether any proposal passed, the first that did, its token).
    ids: the vocabulary id of each column of `logp` (None: column = id); the token returned is
    a vocabulary id.
    Returns (token, proposals tried, whether one was accepted); clamps and exhausted loops go into `stats`.
    """
    s, clamped = token_scores(logp, target)                                        # [U]
    ref = logp[0]
    rows = (ref[None], s[None], clamped[None] if target.can_clamp else None, None if ids is None else ids[None])
    tried = 0
    while tried < max_retries:
        n = min(RS_BLOCK, max_retries - tried)
        token, total, extra = rs_block(*rows, n, [rng])                               # [1], [1], [1, 3|4]
        token_i, has_mass, passed, used, *clamps = torch.cat([token, extra[0]]).tolist()   # the block's one read-back
        if not has_mass:
            raise no_mass(total[0])
        tried += used
        stats.clamps += sum(clamps)
        if passed:
            return token_i, tried, True
    stats.rs_exhausted += 1
    return sample_token(torch.log_softmax(ref + s, dim=-1), rng, ids=ids), tried, False


# ---------------------------------------------------------------------------------------------
# Over an inference engine (session.scores_remotely): sampled tokens and scores of given tokens only
# ---------------------------------------------------------------------------------------------

def engine_seed(rng: torch.Generator) -> int:
    """A seed for one engine-side sampling call, drawn from the generation's generator."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=rng))


def window_rejection_token(session: Session, seq: list[int], target: Target, window: deque, log_gamma: float,
                           max_retries: int, rng: torch.Generator, stats: Stats) -> tuple[int, int, bool]:
    """Token-RS at one position over an engine, which returns no whole distribution to take the
    exact bound M from. The bound is the sliding-window estimate SCR uses, over single tokens:
    log M = max(window) + log gamma, `window` holding the scores S(t) of recent proposals (an
    empty window is seeded with the first round's). Each round is two round trips: the engine
    samples ENGINE_PROPOSALS proposals t ~ pi_ref in one call, then the N adapters score them
    (N calls at once: log pi_i(t | seq)); proposal t is accepted with probability
    exp(S(t) - log M). After max_retries proposals the one with the highest S is kept (counted
    in stats.rs_exhausted: the estimate is not exact, unlike the local Token-RS).
    Returns (token, proposals tried, whether one was accepted)."""
    tried, best, best_s = 0, None, -math.inf
    while tried < max_retries:
        n = min(ENGINE_PROPOSALS, max_retries - tried)
        props = session.propose(seq, n, seed=engine_seed(rng))
        ids = sorted(set(props.tokens))
        pref = session.score_next(seq, ids)                                          # [N, U]
        col = torch.tensor([ids.index(t) for t in props.tokens])
        log_ratios = pref[:, col] - torch.tensor(props.logprobs)                     # [N, n]
        s, clamped = aggregate(log_ratios, target.weights, target.aggregation, target.clamp_floor)
        s_list = s.tolist()
        if not window:
            window.extend(s_list)
        log_m = max(window) + log_gamma
        log_u = torch.rand(n, generator=rng).log().tolist()
        for j in range(n):
            tried += 1
            stats.clamps += int(clamped[j])
            window.append(s_list[j])
            if s_list[j] > best_s:
                best, best_s = props.tokens[j], s_list[j]
            if log_u[j] < s_list[j] - log_m:
                return props.tokens[j], tried, True
    stats.rs_exhausted += 1
    return best, tried, False
