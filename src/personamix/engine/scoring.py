"""Scoring drafted chunks of many generations at once: SCR's step 2 (samplers/scr.py).

After the forward that scores a chunk C = c_1..c_k under the N preference models, SCR needs,
per prefix C_{1:j}, its score S_j = agg(l(C_{1:j})) (eq. 1 and 4: l_i the sum of the prefix's token
log ratios log pi_i(c_m|.) - log pi_ref(c_m|.)), whether S_j was clamped, and a fresh uniform
log u per cascade test. Run by each generation on its own that was 67 tensor operations and 3
read-backs per chunk, each a kernel launch or a wait for the stream on a GPU; a busy server
scores a chunk for about one generation in k + 1 of every forward. `score_chunks` runs it for
every chunk scored in one forward at once: one set of operations for all of them, a `rand` from
each generation's own generator, and one read-back per group (bench/scr_scoring.py counts
both).

A chunk's result does not depend on its company. Chunks are grouped by what changes the
operations (weights, aggregation, clamp floor, temperature, k) and by a width that depends on
the chunk alone (`width`): each chunk's logits, on the U columns of its supports (targets.
log_probs_on_support's ids), are padded with -inf to that width and computed with the same
row-wise operations whatever else is in the group, so a seeded generation gets the same bits
alone or beside others (tests/test_scoring.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .targets import Target, chunk_log_probs, prefix_scores

#: chunks on more columns than this are scored at their own width (e.g. the whole vocabulary:
#: nothing truncated), narrower ones at the next power of two from 64 (top-p 0.9 over the default
#: model: tens to hundreds of columns)
WIDEST_BUCKET = 4096


def width(columns: int) -> int:
    """The width a chunk on this many columns is scored at: a function of its own columns only."""
    return columns if columns > WIDEST_BUCKET else max(64, 1 << (columns - 1).bit_length())


@dataclass(frozen=True, eq=False)
class Score:
    """One generation's request: score its drafted chunk. `logq` [k, U]: the reference's
    log-probs at the chunk's k positions on U columns (-inf off each position's support: the
    proposal q, samplers.common.draft), `chunk` [k]: the chunk's columns. `rng`: draw a uniform
    log u per prefix for the cascade from it (None: no uniforms, SCR's exact verification)."""

    target: Target
    logq: torch.Tensor
    chunk: torch.Tensor
    rng: torch.Generator | None = None

    @property
    def key(self) -> tuple:
        """Chunks with the same key run the same operations, so they can be scored together."""
        t, (k, u) = self.target, self.logq.shape
        return t.weights, t.aggregation, t.clamp_floor, t.temperature, k, width(u)


@dataclass(frozen=True)
class Scored:
    """A chunk's scores: S_j of its prefixes C_{1:j}, j = 1..k (eq. 8), the cascade's log u per
    prefix (None without `Score.rng`) and whether each S_j was clamped (None where the target
    cannot clamp: Target.can_clamp)."""

    s: list[float]
    log_u: list[float] | None
    clamped: list[bool] | None


def score_chunks(logits: Sequence[torch.Tensor], scores: Sequence[Score]) -> list[Scored]:
    """Each chunk's scores: logits[b] [N, k, U] are scores[b]'s chunk under the N preference
    models, on the columns of its `logq`. One read-back per group of the same `Score.key`."""
    if len(logits) != len(scores):
        raise ValueError(f"{len(logits)} logits for {len(scores)} chunks")
    groups: dict[tuple, list[int]] = {}
    for b, (lg, sc) in enumerate(zip(logits, scores)):
        if lg.dim() != 3 or lg.shape[1:] != sc.logq.shape or sc.chunk.shape != sc.logq.shape[:1]:
            raise ValueError(f"chunk {b}: logits {tuple(lg.shape)}, logq {tuple(sc.logq.shape)}, chunk "
                             f"{tuple(sc.chunk.shape)}: expected [N, k, U], [k, U] and [k]")
        groups.setdefault(sc.key, []).append(b)
    out: list[Scored | None] = [None] * len(scores)
    for rows in groups.values():
        for b, scored in zip(rows, _score_group([logits[b] for b in rows], [scores[b] for b in rows])):
            out[b] = scored
    return out


def _padded(x: torch.Tensor, w: int) -> torch.Tensor:
    """x [..., U] -> [..., w], -inf past U."""
    return x if x.shape[-1] == w else F.pad(x, (0, w - x.shape[-1]), value=float("-inf"))


def _stacked(xs: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return xs[0].unsqueeze(dim) if len(xs) == 1 else torch.stack(xs, dim)


def _score_group(logits: list[torch.Tensor], scores: list[Score]) -> list[Scored]:
    """Chunks of one key: logits [N, k, U_b] each."""
    target, (*_, k, w) = scores[0].target, scores[0].key
    x = _stacked([_padded(lg, w) for lg in logits], dim=1)                          # [N, b, k, w]
    logq = _stacked([_padded(sc.logq, w) for sc in scores])                          # [b, k, w]
    chunk = _stacked([sc.chunk for sc in scores])                                    # [b, k] columns
    pref_tok = chunk_log_probs(x, target, torch.isfinite(logq), chunk)              # [N, b, k]
    ref_tok = logq.gather(-1, chunk.unsqueeze(-1)).squeeze(-1)                       # [b, k]
    s, clamped = prefix_scores(ref_tok, pref_tok, target)                           # [b, k]
    back = [s]
    uniform = [sc.rng is not None for sc in scores]
    if any(uniform):     # each generation's own stream; zeros (log: -inf, not read) for the others
        u = [torch.rand(k, generator=sc.rng, device=s.device) if sc.rng is not None else s.new_zeros(k)
             for sc in scores]
        back.append(_stacked(u).log().to(s.dtype))
    if target.can_clamp:
        back.append(clamped.to(s.dtype))
    back = _stacked(back).tolist()                                                   # the group's one read-back
    return [Scored(back[0][r], back[1][r] if uni else None,
                   [bool(c) for c in back[-1][r]] if target.can_clamp else None)
            for r, uni in enumerate(uniform)]


__all__ = ["WIDEST_BUCKET", "Score", "Scored", "score_chunks", "width"]
