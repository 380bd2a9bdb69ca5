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

from ..params import SamplingParams
from ..session import Session
from ..stats import Stats
from ..targets import Target, column_of, log_probs_on_support, on_columns, to_vocabulary, token_target, vocab_id
from .common import draft, draw, sample_token


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
        idx = col.view(-1, 1)
        if params.greedy:
            rejected = ((logp_star[:k].argmax(-1) != col) | ~on).tolist()
        else:
            p_star = logp_star[:k].gather(1, idx).squeeze(1).masked_fill(~on, float("-inf"))
            ratio = p_star - logq.gather(1, idx).squeeze(1)
            log_u = torch.rand(k, generator=rng, device=logq.device).log()
            rejected = (log_u >= ratio).tolist()
        n = rejected.index(True) if True in rejected else k
        stats.proposals += min(n + 1, k)
        stats.accepted += n
        if target.can_clamp:
            stats.clamps += int((clamped[:k].gather(1, idx).squeeze(1) & on)[: n + 1].sum())
        if params.greedy:
            u = int(logp_star[n].argmax())
        elif n < k:   # residual distribution at the first rejected position
            residual = (logp_star[n].exp() - logq[n].exp()).clamp_min(0)
            if float(residual.sum()) > 0:
                u = int(draw(residual, 1, rng))
            else:   # p* == q up to rounding: the residual is empty, p* itself is the answer
                u = sample_token(logp_star[n], rng)
        else:       # bonus token
            u = sample_token(logp_star[k], rng)
        out = chunk[:n] + [vocab_id(ids, u)]
        seq.extend(out)
        yield out
