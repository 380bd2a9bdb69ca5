"""Pieces the samplers share: sampling a token, drafting from the reference, Token-RS."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..backend import Session
from ..errors import PersonamixError
from ..stats import Stats
from ..targets import Target, log_probs, token_scores


@dataclass(frozen=True)
class SamplerConfig:
    """Settings of the chunked samplers (scr, spec) and of every rejection loop.

    k:           chunk size (tokens drafted from the reference per step); scr, spec.
    window:      W, how many recent chunk scores the scr bound is estimated from.
    gamma:       safety margin: scr uses log M_j = max(window_j) + log(gamma), gamma >= 1.
    warmup:      scr chunks verified token by token with the exact bound before the window
                 estimate is used (the window fills meanwhile).
    bound:       "window" (the paper's estimate) or "exact" (oracle per-token bound: every
                 chunk verified token by token with M = max over the vocabulary; exact for p*).
    max_retries: Token-RS proposals per token before sampling p* directly (bounds the loop).
    """

    k: int = 4
    window: int = 20
    gamma: float = 1.2
    warmup: int = 5
    bound: Literal["window", "exact"] = "window"
    max_retries: int = 256

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise PersonamixError(msg)

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        need(is_int(self.k) and 1 <= self.k <= 64, f"k (chunk size) must be an integer in 1..64, got {self.k!r}")
        need(is_int(self.window) and 1 <= self.window <= 100_000, f"window must be an integer >= 1, got {self.window!r}")
        need(isinstance(self.gamma, (int, float)) and not isinstance(self.gamma, bool)
             and math.isfinite(self.gamma) and self.gamma >= 1.0,
             f"gamma (safety margin on M) must be a finite number >= 1, got {self.gamma!r}")
        need(is_int(self.warmup) and self.warmup >= 0, f"warmup must be an integer >= 0, got {self.warmup!r}")
        need(self.bound in ("window", "exact"), f"bound must be 'window' or 'exact', got {self.bound!r}")
        need(is_int(self.max_retries) and 1 <= self.max_retries <= 1_000_000,
             f"max_retries must be an integer in 1..1000000, got {self.max_retries!r}")


def draw(p: torch.Tensor, n: int, rng: torch.Generator) -> torch.Tensor:
    """n independent draws [n] from unnormalised probabilities `p` [V], by inverse CDF
    (torch.multinomial takes ~1 ms on a 49k vocabulary on CPU, this ~0.2 ms)."""
    cdf = p.cumsum(0)
    total = cdf[-1]
    if not bool(torch.isfinite(total) & (total > 0)):
        raise PersonamixError(f"cannot sample: the distribution's mass is {float(total)} (non-finite logits?)")
    u = torch.rand(n, generator=rng, device=p.device, dtype=cdf.dtype) * total
    u.clamp_max_(torch.nextafter(total, torch.zeros_like(total)))   # u < total even where rounding says otherwise
    # the first index whose cumulative mass exceeds u: never a zero-probability token
    return torch.searchsorted(cdf, u, right=True)


def sample_token(logp: torch.Tensor, rng: torch.Generator) -> int:
    """One draw from the distribution with log-probabilities `logp` [V]."""
    return int(draw(logp.exp(), 1, rng))


def draft(session: Session, seq: list[int], k: int, target: Target,
          rng: torch.Generator) -> tuple[list[int], torch.Tensor]:
    """Sample k tokens from the reference after `seq` (k single-row forwards).

    Returns the chunk and the reference log-probs at its k positions [k, V] (with the
    target's temperature / top-k / top-p), the proposal q of every drafted token.
    """
    chunk: list[int] = []
    logq = []
    for _ in range(k):
        lq = log_probs(session.logits("ref", seq + chunk, 1)[:, -1], target)[0]
        chunk.append(sample_token(lq, rng))
        logq.append(lq)
    return chunk, torch.stack(logq)


def rejection_sample_token(logp: torch.Tensor, target: Target, rng: torch.Generator,
                           max_retries: int, stats: Stats) -> tuple[int, int, bool]:
    """Token-RS at one position (the paper's baseline), exact for p*.

    logp [N+1, V]: log-probs of every row at this position. Propose t ~ pi_ref and accept with
    probability exp(S(t) - log M), log M = max_t S(t) over the support (the exact bound, so the
    accepted token is distributed as p*). After `max_retries` rejections the token is drawn
    from p* directly: every branch then yields p*, so the bounded loop stays exact.
    Proposals at one position need no new forward, so they are drawn in blocks.
    Returns (token, proposals tried, whether one was accepted); clamps and exhausted loops go into `stats`.
    """
    s, clamped = token_scores(logp, target)
    ref = logp[0]
    log_m = s.masked_fill(~torch.isfinite(ref), float("-inf")).max()
    p_ref = ref.exp()
    tried = 0
    while tried < max_retries:
        n = min(32, max_retries - tried)
        props = draw(p_ref, n, rng)
        log_u = torch.rand(n, generator=rng, device=ref.device).log()
        ok = log_u < s[props] - log_m
        first = int(ok.float().argmax()) if bool(ok.any()) else n
        used = min(first + 1, n)
        tried += used
        stats.clamps += int(clamped[props[:used]].sum())
        if first < n:
            return int(props[first]), tried, True
    stats.rs_exhausted += 1
    return sample_token(torch.log_softmax(ref + s, dim=-1), rng), tried, False
