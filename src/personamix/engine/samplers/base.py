"""`base`: the reference model alone (the speed baseline; ignores the preference models)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..params import SamplingParams
from ..session import Session
from ..stats import Stats
from ..targets import Target, log_probs
from .common import sample_token


def sample(session: Session, prompt: list[int], target: Target, params: SamplingParams,
           rng: torch.Generator, stats: Stats) -> Iterator[list[int]]:
    seq = list(prompt)
    while True:
        t = sample_token(log_probs(session.logits("ref", seq)[:, -1], target)[0], rng, params.greedy)
        seq.append(t)
        yield [t]
