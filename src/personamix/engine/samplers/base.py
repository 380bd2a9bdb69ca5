"""`base`: the reference model alone (the speed baseline; ignores the preference models).
Over an inference engine the engine samples ENGINE_CHUNK tokens per call."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..params import SamplingParams
from ..session import Session
from ..stats import Stats
from ..targets import Target, log_probs_on_support
from .common import engine_seed, sample_token

ENGINE_CHUNK = 16   # tokens per engine call: a step streams this many at once


def sample(session: Session, prompt: list[int], target: Target, params: SamplingParams,
           rng: torch.Generator, stats: Stats) -> Iterator[list[int]]:
    seq = list(prompt)
    while session.scores_remotely:
        n = min(ENGINE_CHUNK, params.max_new_tokens, session.backend.max_length - len(seq))
        out = session.sample(seq, n, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                             seed=engine_seed(rng)).tokens
        seq.extend(out)
        yield out
    while True:
        logp, ids = log_probs_on_support(session.logits("ref", seq)[:, -1], target)   # [1, U]: the support's ids
        t = sample_token(logp[0], rng, params.greedy, ids)
        seq.append(t)
        yield [t]
