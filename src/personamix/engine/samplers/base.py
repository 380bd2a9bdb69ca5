"""`base`: the reference model alone (the speed baseline; ignores the preference models).
Over an inference engine the engine samples ENGINE_CHUNK tokens per call."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..params import SamplingParams
from ..session import Session
from ..stats import Stats
from ..targets import Target
from .common import engine_seed

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
        t = session.draw(seq, target, rng, params.greedy).token    # drawn with the forward's other draws
        seq.append(t)
        yield [t]
