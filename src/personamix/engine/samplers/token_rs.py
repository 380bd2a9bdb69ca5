"""`token-rs`: the paper's baseline. Per token, score all N+1 rows in one forward, then
rejection-sample: propose t ~ pi_ref, accept with probability exp(S(t) - log M), where
M = max_t exp(S(t)) is the exact bound at that step (see common.rejection_sample_token). The
first block of proposals (draws.RS_BLOCK) is drawn by the backend with the forward (Session.draw,
engine/draws.py: every token-rs generation's in a shared forward at once); in the rare step where
none is accepted the sampler tries the rest of max_retries itself, over the same logits.
Greedy (temperature 0): the limit of an exact sampler of p* is argmax_t p*(t|Y), taken directly
(no proposals): the same tokens as greedy `token`.
Over an inference engine, which returns no whole distribution, the bound is the sliding-window
estimate instead (common.window_rejection_token): two round trips per token."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator

import torch

from ..draws import RS_BLOCK
from ..params import SamplingParams
from ..session import Session
from ..stats import Stats
from ..targets import Target, log_probs_on_support
from .common import rejection_sample_token, window_rejection_token


def sample(session: Session, prompt: list[int], target: Target, params: SamplingParams,
           rng: torch.Generator, stats: Stats) -> Iterator[list[int]]:
    seq = list(prompt)
    if session.scores_remotely and not params.greedy:
        window: deque = deque(maxlen=params.window)
        while True:
            t, tried, ok = window_rejection_token(session, seq, target, window, math.log(params.gamma),
                                                  params.max_retries, rng, stats)
            stats.proposals += tried
            stats.accepted += ok
            seq.append(t)
            yield [t]
    while True:
        if params.greedy:                 # argmax p*: the `token` method's greedy step (draws.py)
            drawn = session.draw(seq, target, rng, greedy=True, mixed=True)
            stats.clamps += drawn.clamps
            t = drawn.token
        else:                             # the first block drawn by the backend with the forward (draws.py)
            drawn = session.draw(seq, target, rng, mixed=True, propose=min(RS_BLOCK, params.max_retries))
            stats.proposals += drawn.proposals
            stats.clamps += drawn.clamps
            t, ok = drawn.token, drawn.accepted
            if not ok:                    # rare: go on with the rest of max_retries, over the memo's logits
                logp, ids = log_probs_on_support(session.logits("all", seq)[:, -1], target)   # [N+1, U]
                t, tried, ok = rejection_sample_token(logp, target, rng, params.max_retries - drawn.proposals,
                                                      stats, ids)
                stats.proposals += tried
            stats.accepted += ok
        seq.append(t)
        yield [t]
