"""`spec`: speculative sampling (Leviathan et al. 2023; Chen et al. 2023) with draft pi_ref
and target p*. Exact for p*; no bound to estimate.

Per step: draft C = c_1..c_k ~ pi_ref (k reference forwards), then ONE forward of all N+1
rows over C gives p* at the k+1 positions. Token c_j is accepted with probability
min(1, p*_j(c_j) / q_j(c_j)); at the first rejection a token is drawn from
normalize(max(0, p*_j - q_j)) and the step ends; if all k pass, a bonus token is drawn from
p*_{k+1}. q is the drafting distribution itself (the reference as it proposed).

Greedy (temperature 0): the draft is the reference's argmax, c_j is kept iff it is the argmax
of p*_j, and the step ends with argmax p* at the first mismatch (or after the chunk): the same
tokens as greedy `token`, in fewer forwards when the draft agrees.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..draws import inverse_cdf, no_mass, usable
from ..params import SamplingParams
from ..session import Session
from ..stats import Stats
from ..targets import Target, column_of, log_probs_on_support, on_columns, to_vocabulary, token_target
from .common import draft


def sample(session: Session, prompt: list[int], target: Target, params: SamplingParams,
           rng: torch.Generator, stats: Stats) -> Iterator[list[int]]:
    seq = list(prompt)
    while True:
        k = min(params.k, session.backend.max_length - len(seq))   # never draft past the context
        chunk, logq, drafted = draft(session, seq, k, target, rng, params.greedy)  # [k, U_d], ids [U_d]
        # over the ids on the supports of the k+1 positions only (targets.log_probs_on_support)
        logits = session.logits("all", seq + chunk, k + 1)                         # [N+1, k+1, V]
        logp, ids = log_probs_on_support(logits, target)                           # [N+1, k+1, U]
        logp_star, _, clamped = token_target(logp, target)                        # [k+1, U]
        chunk_t = torch.tensor(chunk, device=logq.device)
        col = column_of(ids, chunk_t)          # the drafted tokens' columns; a token off this support
        on = chunk_t == (col if ids is None else ids[col])   # (rounding between two forwards) has p* = 0
        logq = on_columns(to_vocabulary(logq, drafted, logits.shape[-1]), ids)     # [k, U]
        n, u, clamps = _verify(logp_star, logq, clamped if target.can_clamp else None, col, on, ids, rng,
                               params.greedy)
        stats.proposals += min(n + 1, k)
        stats.accepted += n
        stats.clamps += clamps
        out = chunk[:n] + [u]
        seq.extend(out)
        yield out


def _verify(logp_star: torch.Tensor, logq: torch.Tensor, clamped: torch.Tensor | None, col: torch.Tensor,
            on: torch.Tensor, ids: torch.Tensor | None, rng: torch.Generator, greedy: bool) -> tuple[int, int, int]:
    """The step's decisions on p* [k+1, U] and the draft's q [k, U] (log-probs on the columns `ids`,
    vocabulary ids; None: all), the drafted tokens' columns col [k] and whether each is on p*'s
    support (`on` [k]), with one read-back: n, the drafted tokens accepted (c_j kept iff
    log u_j < log p*_j(c_j) - log q_j(c_j); greedy: iff c_j = argmax p*_j), the step's last token
    (a vocabulary id; drawn from normalize(max(0, p*_n - q_n)) after a rejection, from p*_n where
    that residual is empty (p* == q up to rounding), from p*_{k+1} after a whole chunk; greedy:
    argmax p*_n) and the clamped scores among the tokens tested (`clamped` [k+1, U]; None: none
    can be). The generator gives k uniforms, then one for the last token (none when greedy)."""
    k = col.shape[0]
    idx = col.view(-1, 1)
    if greedy:
        rejected = (logp_star[:k].argmax(-1) != col) | ~on                                 # [k]
    else:
        p_star = logp_star[:k].gather(1, idx).squeeze(1).masked_fill(~on, float("-inf"))
        rejected = torch.rand(k, generator=rng, device=col.device).log() >= p_star - logq.gather(1, idx).squeeze(1)
    n = torch.cat([rejected, rejected.new_ones(1)]).float().argmax().view(1)           # [1] first rejected, k: none
    star = logp_star.index_select(0, n)                                                 # [1, U] p*_n
    if greedy:
        last, ok = star.argmax(-1), None
    else:
        q = torch.cat([logq, logq.new_full((1, logq.shape[1]), float("-inf"))]).index_select(0, n)   # q_n (none at k)
        residual = (star.exp() - q.exp()).clamp_min(0)                                  # p*_k itself at n = k
        cdf = torch.where(residual.sum() > 0, residual, star.exp()).cumsum(-1)          # [1, U]
        u = torch.rand(1, generator=rng, device=cdf.device, dtype=cdf.dtype)
        last, ok = inverse_cdf(cdf, u.view(1, 1)).view(1), usable(cdf[:, -1])
    back = [n, last if ids is None else ids[last]]
    if ok is not None:
        back.append(ok.long())
    if clamped is not None:
        tested = torch.arange(k, device=col.device) <= n                               # c_1..c_{n+1}
        back.append((clamped[:k].gather(1, idx).squeeze(1) & on & tested).sum().view(1))
    n_i, last_i, *rest = torch.cat(back).tolist()                                      # the step's one read-back
    if ok is not None and not rest.pop(0):
        raise no_mass(cdf[0, -1])
    return n_i, last_i, rest[0] if rest else 0
