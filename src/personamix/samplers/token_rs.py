"""`token-rs`: the paper's baseline. Per token, score all N+1 rows in one forward, then
rejection-sample: propose t ~ pi_ref, accept with probability exp(S(t) - log M), where
M = max_t exp(S(t)) is the exact bound at that step (see common.rejection_sample_token)."""

from __future__ import annotations

from typing import Iterator

import torch

from ..backend import Session
from ..stats import Stats
from ..targets import Target, log_probs
from .common import SamplerConfig, rejection_sample_token


def sample(session: Session, prompt: list[int], target: Target, cfg: SamplerConfig,
           rng: torch.Generator, stats: Stats) -> Iterator[list[int]]:
    seq = list(prompt)
    while True:
        logp = log_probs(session.logits("all", seq)[:, -1], target)   # [N+1, V]
        t, tried, ok = rejection_sample_token(logp, target, rng, cfg.max_retries, stats)
        stats.proposals += tried
        stats.accepted += ok
        seq.append(t)
        yield [t]
