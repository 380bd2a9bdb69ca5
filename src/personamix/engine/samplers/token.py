"""`token`: exact direct sampling from the token-level target p* (eq. 5) at every step.

All N+1 rows are scored in one forward; p*(t|Y) = softmax(log pi_ref(t|Y) + S(t|Y)).
Greedy (temperature 0): argmax_t p*(t|Y).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..params import SamplingParams
from ..session import Session
from ..stats import Stats
from ..targets import Target, column_of, log_probs_on_support, token_target
from .common import sample_token


def sample(session: Session, prompt: list[int], target: Target, params: SamplingParams,
           rng: torch.Generator, stats: Stats) -> Iterator[list[int]]:
    seq = list(prompt)
    while True:
        logp, ids = log_probs_on_support(session.logits("all", seq)[:, -1], target)   # [N+1, U]: the support's ids
        logp_star, _, clamped = token_target(logp, target)
        t = sample_token(logp_star, rng, params.greedy, ids)                      # the step's one read-back
        if target.can_clamp:
            stats.clamps += int(clamped[column_of(ids, torch.tensor([t], device=clamped.device))])
        seq.append(t)
        yield [t]
