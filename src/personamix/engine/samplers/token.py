"""`token`: exact direct sampling from the token-level target p* (eq. 5) at every step.

All N+1 rows are scored in one forward; p*(t|Y) = softmax(log pi_ref(t|Y) + S(t|Y)) on the
reference's support, drawn by the backend with that forward (Session.draw, engine/draws.py: the
steps of every `token` generation in a shared forward at once). Greedy (temperature 0): argmax_t p*(t|Y).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..params import SamplingParams
from ..session import Session
from ..stats import Stats
from ..targets import Target


def sample(session: Session, prompt: list[int], target: Target, params: SamplingParams,
           rng: torch.Generator, stats: Stats) -> Iterator[list[int]]:
    seq = list(prompt)
    while True:
        drawn = session.draw(seq, target, rng, params.greedy, mixed=True)   # p* of the N+1 rows (draws.py)
        stats.clamps += drawn.clamps
        seq.append(drawn.token)
        yield [drawn.token]
