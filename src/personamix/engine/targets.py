"""The math of multi-personality targets: weights, logits processing, aggregation, bounds.

Notation (MPG paper, Sec. 3). A reference model pi_ref and N preference models pi_i
(DPO fine-tunes of pi_ref). For a continuation C (one token or a chunk) after prefix Y the
log density ratio of model i is

    l_i(C|Y) = log pi_i(C|Y) - log pi_ref(C|Y)                                  (eq. 1)

and an aggregation of the ratios with user weights alpha_i gives the score S(C|Y):

    linear    S = log sum_i alpha_i exp(l_i)         (the paper's target, eq. 4)
    geometric S = sum_i alpha_i l_i                  (MOD-style product of experts)

The target is pi*(C|Y) proportional to pi_ref(C|Y) exp(S(C|Y)). At the token level this is

    p*(t|Y) = pi_ref(t|Y) exp(S(t|Y)) / Z(Y)                                      (eq. 5)

For `linear` with alpha_i >= 0 summing to 1 it is the mixture sum_i alpha_i pi_i(t|Y); for
`geometric` it is pi_ref^(1 - sum alpha) * prod_i pi_i^alpha_i, renormalised.

Everything in this module is pure tensor math without models, so samplers and tests share
one definition of the target.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import PersonamixError
from ..mbti import parse_persona

Aggregation = Literal["linear", "geometric"]
AGGREGATIONS: tuple[str, ...] = ("linear", "geometric")

#: Floor for the linear score when sum_i alpha_i exp(l_i) <= 0 (possible with negative
#: weights). exp(-30) ~ 1e-13: the clamped continuation keeps a vanishing but finite share
#: of the target, so logs, ratios and bounds stay finite. Every clamp is counted in the
#: sampler's stats (`clamps`).
CLAMP_FLOOR = -30.0

@dataclass(frozen=True)
class Target:
    """A fully specified multi-personality target.

    names:        preference-model names, in backend row order (row i+1 is names[i]).
    weights:      alpha_i for each name (0 for a model that takes no part).
    aggregation:  "linear" (paper) or "geometric" (MOD-style).
    temperature:  divides every model's logits before ratios are formed (> 0).
    top_k/top_p:  optional truncation of the reference (proposal) distribution; every model is
                  restricted to, and renormalised on, the same support before ratios are formed,
                  so all samplers share one target. 0 / 1.0 mean off.
    clamp_floor:  the linear floor, see CLAMP_FLOOR.
    """

    names: tuple[str, ...]
    weights: tuple[float, ...]
    aggregation: Aggregation = "linear"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    clamp_floor: float = CLAMP_FLOOR

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise PersonamixError(
                f"unknown aggregation {self.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}"
            )
        if len(self.names) != len(self.weights):
            raise PersonamixError("Target needs one weight per preference model")
        if self.names:  # the `base` method has no preference models and no weights
            check_weights(dict(zip(self.names, self.weights)), self.aggregation)
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise PersonamixError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise PersonamixError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise PersonamixError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")

    @property
    def can_clamp(self) -> bool:
        """Whether a score can hit the floor: linear aggregation with a negative weight. Otherwise
        `aggregate` never clamps, and samplers need not read its `clamped` back."""
        return self.aggregation == "linear" and any(w < 0 for w in self.weights)


# ---------------------------------------------------------------------------------------------
# Weights and personas
# ---------------------------------------------------------------------------------------------

def resolve_weights(available: Sequence[str], persona: str | None = None,
                    weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Turn a persona shorthand or an explicit weight map into {name: alpha} over `available`.

    `persona="ENTJ"` puts equal weights 1/4 on the models named E, N, T and J. Exactly one of
    persona / weights may be given; with neither, every model gets an equal weight.
    """
    if persona is not None and weights is not None:
        raise PersonamixError("give either persona= or weights=, not both")
    if not available:
        raise PersonamixError("no preference models are loaded: a persona or weights need adapters "
                              "(use method='base' for the reference alone)")
    if persona is not None:
        letters = parse_persona(persona)
        missing = [c for c in letters if c not in available]
        if missing:
            raise PersonamixError(
                f"persona {persona!r} needs adapter(s) named {', '.join(missing)}; loaded: "
                f"{', '.join(available)}"
            )
        return {c: 1.0 / len(letters) for c in letters}
    if weights is None:
        return {name: 1.0 / len(available) for name in available}
    if not isinstance(weights, Mapping) or not weights:
        raise PersonamixError("weights must be a non-empty mapping {adapter name: weight}")
    unknown = [n for n in weights if n not in available]
    if unknown:
        raise PersonamixError(f"weights name unknown adapter(s) {', '.join(map(str, unknown))}; "
                              f"loaded: {', '.join(available)}")
    out = {}
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise PersonamixError(f"weight for {name!r} must be a number, got {w!r}")
        out[name] = float(w)
    return out


def check_weights(weights: Mapping[str, float], aggregation: str) -> None:
    """Raise unless the weights define a target distribution for this aggregation.

    Any finite reals, not all zero. `linear` also needs a positive weight: with every
    alpha_i <= 0 the sum sum_i alpha_i exp(l_i) is <= 0 for every continuation.
    """
    values = list(weights.values())
    if any(not math.isfinite(w) for w in values):
        raise PersonamixError(f"weights must be finite numbers, got {dict(weights)}")
    if all(w == 0 for w in values):
        raise PersonamixError("weights are all zero: they cannot form a target distribution")
    if aggregation == "linear" and not any(w > 0 for w in values):
        raise PersonamixError(
            "linear aggregation needs at least one positive weight: with all weights <= 0, "
            "sum_i alpha_i r_i is never positive and no distribution is left "
            f"(got {dict(weights)}; use aggregation='geometric' for purely negative steering)"
        )


# ---------------------------------------------------------------------------------------------
# Logits -> log-probabilities on a shared support
# ---------------------------------------------------------------------------------------------

def log_probs(logits: torch.Tensor, target: Target, support: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities of every row of `logits` [R, ..., V] under the target's sampling settings.

    Temperature divides every row. Top-k / top-p are decided on the reference (the proposal):
    on row 0 of `logits` unless `support` (a bool mask [..., V], e.g. `isfinite` of reference
    log-probs computed elsewhere) is given, and the same support is imposed on every row before
    renormalising, so the ratios l_i compare distributions on one support. Off-support: -inf.
    """
    x = logits.float() / target.temperature
    if support is None and (target.top_k or target.top_p < 1.0):
        support = _support(x[0], target.top_k, target.top_p)
    if support is not None:
        x = x.masked_fill(~support, float("-inf"))
    return torch.log_softmax(x, dim=-1)


def log_probs_on_support(logits: torch.Tensor, target: Target,
                         support: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`log_probs` over the support's ids only: (log-probs [R, ..., U], ids [U]) where ids are the
    vocabulary ids (ascending) on the support at any position; ids None (and U = V) when nothing is
    truncated. Every other id has log-prob -inf in every row, so the target's math (ratios, S, the
    bound, p*, a draw) needs only these columns: with top-p 0.9 a few to a few hundred of 49k,
    and passes over [R, ..., V] that are mostly -inf were most of a sampler's own time (SCR's exact
    warm-up verification 7.3 -> 0.16 ms per chunk on one core). Column u of the result is id ids[u]
    (`vocab_id`); a draw over it picks the same token as over the vocabulary (the cumulative sums
    skip only zeros)."""
    if support is None and target.top_p < 1.0 and not target.top_k and logits.dim() == 2:
        # one position's rows [R, V]: its ids, every one on it; only the reference's row is needed
        # whole, the others are divided by the temperature on the support's columns only
        ids = _support_ids(logits[0].float() / target.temperature, target.top_p)
        return torch.log_softmax(logits.index_select(-1, ids).float() / target.temperature, dim=-1), ids
    x = logits.float() / target.temperature
    if support is None and (target.top_k or target.top_p < 1.0):
        support = _support(x[0], target.top_k, target.top_p)
    if support is None:
        return torch.log_softmax(x, dim=-1), None
    ids = support_ids(support)
    if ids is None:                                                                      # every id: no copy
        return torch.log_softmax(x.masked_fill(~support, float("-inf")), dim=-1), None
    x = x.index_select(-1, ids).masked_fill(~support.index_select(-1, ids), float("-inf"))
    return torch.log_softmax(x, dim=-1), ids


def support_ids(support: torch.Tensor) -> torch.Tensor | None:
    """The vocabulary ids [U] (ascending) on `support` [..., V] (bool) at any position; None when
    that is every id."""
    on = support.reshape(-1, support.shape[-1]).any(0)                                  # [V]
    return None if bool(on.all()) else on.nonzero().squeeze(1)


def on_columns(x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """x [..., V] at the columns of `log_probs_on_support`'s result [..., U]."""
    return x if ids is None else x.index_select(-1, ids)


def to_vocabulary(x: torch.Tensor, ids: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """x [..., U] on the columns `ids` (log-probs) -> [..., vocab], -inf at every other id."""
    if ids is None:
        return x
    return x.new_full((*x.shape[:-1], vocab), float("-inf")).index_copy_(-1, ids, x)


def column_of(ids: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """The columns of vocabulary ids `tokens` in `log_probs_on_support`'s result (for ids on the
    support; one off it gets some other column: check `vocab_id` where that can happen)."""
    return tokens if ids is None else torch.searchsorted(ids, tokens).clamp_max(ids.shape[0] - 1)


def vocab_id(ids: torch.Tensor | None, column: int) -> int:
    """The vocabulary id of a column of `log_probs_on_support`'s result."""
    return column if ids is None else int(ids[column])


#: prefixes of the most likely tokens tried for top-p, shortest first, before the whole vocabulary
#: (on one core over 49k tokens: topk of 64 0.05 ms, of 1024 0.25 ms, a full sort ~3 ms)
TOP_P_PREFIXES = (64, 1024)


def _support(ref_logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    keep = torch.ones_like(ref_logits, dtype=torch.bool)
    if top_k and top_k < ref_logits.shape[-1]:
        kth = torch.topk(ref_logits, top_k, dim=-1).values[..., -1:]
        keep &= ref_logits >= kth
    if top_p < 1.0:
        # keep the smallest prefix (by probability) whose mass reaches top_p; the first token always
        # stays. Sorting the whole vocabulary was a quarter of a busy server's CPU: sort only the
        # most likely tokens (TOP_P_PREFIXES, shortest first), which is exact whenever they hold
        # top_p of the mass (every later token then has at least top_p before it); otherwise sort
        # everything.
        top, order = _top_p_sorted(torch.softmax(ref_logits, dim=-1), top_p)
        drop_sorted = (top.cumsum(-1) - top) >= top_p
        drop = torch.ones_like(keep).scatter(-1, order, drop_sorted)    # outside the prefix: dropped
        keep &= ~drop
    return keep


def _sorted_prefixes(probs: torch.Tensor):
    """The most likely tokens in descending order: the TOP_P_PREFIXES shortest first, then the
    whole vocabulary. Yields (probs, ids, whole), [..., m]; top-p stops at the first that holds
    top_p of the mass."""
    for k in TOP_P_PREFIXES:
        if k >= probs.shape[-1]:
            break
        yield (*torch.topk(probs, k, dim=-1), False)
    yield (*torch.sort(probs, dim=-1, descending=True), True)


def _top_p_sorted(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely tokens in descending order, enough of them to hold top_p of the mass at
    every position (TOP_P_PREFIXES first, else the whole vocabulary): (probs, ids), [..., m]."""
    for top, order, whole in _sorted_prefixes(probs):
        if whole or bool((top.sum(-1) >= top_p).all()):
            return top, order


def _support_ids(ref_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """`_support(ref_logits, 0, top_p)` of ONE position [V] as its ids [U], ascending (no pass over
    the vocabulary to build a mask). What `_top_p_sorted` decides, with one read-back per prefix
    tried: whether the prefix holds top_p and how many of its tokens are kept, together."""
    for top, order, whole in _sorted_prefixes(torch.softmax(ref_logits, dim=-1)):
        kept = ((top.cumsum(-1) - top) < top_p).sum()    # a prefix: the mass before a token only grows
        n = int(kept if whole else torch.where(top.sum() >= top_p, kept, -1))   # -1: holds less than top_p
        if n >= 0:
            return order[:n].sort().values


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Weights:
    """The weights alpha on one device and dtype, with what `aggregate` needs of them worked out
    once on the host (a sampler aggregates at every step: no read-back, no copy to the device).
    Shared by every generation with these weights: read only."""

    w: torch.Tensor                  # [N]
    negative: bool                   # any alpha_i < 0
    positive: torch.Tensor | None    # [P] the i with alpha_i > 0; None: every i
    log_positive: torch.Tensor       # [P] log alpha_i of those


@functools.lru_cache(maxsize=256)
def _weights_on(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> _Weights:
    w = torch.tensor(values, device=device, dtype=dtype)
    keep = [i for i, a in enumerate(values) if a > 0]
    positive = None if len(keep) == len(values) else torch.tensor(keep, device=device)
    return _Weights(w, any(a < 0 for a in values), positive, torch.log(w if positive is None else w[positive]))


def aggregate(log_ratios: torch.Tensor, weights: torch.Tensor | Sequence[float], aggregation: str,
              floor: float = CLAMP_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """S from log ratios `log_ratios` [N, ...] and weights [N] (a tensor or numbers, e.g.
    `Target.weights`: those need no read-back); returns (S [...], clamped [...]).

    linear:    S = log sum_i alpha_i exp(l_i), with signs handled stably:
               P = logsumexp_{alpha_i>0}(log alpha_i + l_i), Q = logsumexp_{alpha_i<0}(log|alpha_i| + l_i),
               S = P + log(1 - exp(Q - P)) when Q < P, else clamped to `floor`.
    geometric: S = sum_i alpha_i l_i (never clamped).
    """
    values = weights.tolist() if isinstance(weights, torch.Tensor) else weights
    prepared = _weights_on(tuple(float(a) for a in values), log_ratios.device, log_ratios.dtype)
    per_model = (-1, *([1] * (log_ratios.dim() - 1)))                                  # [N, 1, ...]
    w = prepared.w.view(per_model)
    if aggregation == "geometric":
        s = (w * log_ratios).sum(0)
        return s, torch.zeros_like(s, dtype=torch.bool)
    if aggregation != "linear":
        raise PersonamixError(f"unknown aggregation {aggregation!r}")
    if not prepared.negative:   # the usual case: Q = -inf, so S = P exactly and nothing is clamped
        kept = log_ratios if prepared.positive is None else log_ratios.index_select(0, prepared.positive)
        s = torch.logsumexp(prepared.log_positive.view(per_model) + kept, dim=0)
        return s, torch.zeros_like(s, dtype=torch.bool)
    neg_inf = torch.tensor(float("-inf"), dtype=log_ratios.dtype, device=log_ratios.device)
    log_w = torch.log(w.abs())  # -inf where alpha_i == 0: those models drop out
    pos = torch.logsumexp(torch.where(w > 0, log_w + log_ratios, neg_inf), dim=0)
    neg = torch.logsumexp(torch.where(w < 0, log_w + log_ratios, neg_inf), dim=0)
    clamped = ~(neg < pos)
    diff = torch.where(clamped, torch.full_like(pos, -1.0), neg - pos)  # any negative number: masked below
    s = pos + torch.log(-torch.expm1(diff))
    s = torch.where(clamped, torch.full_like(s, floor), s)
    return s, clamped


def token_scores(logp: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level S(t|Y) over the vocabulary from log-probs [N+1, ..., V] (row 0 = reference).

    Off-support tokens (reference log-prob -inf) get l_i = 0, so S is finite there; their
    target log-probability stays -inf through the reference term.
    """
    ref = logp[0]
    log_ratios = torch.where(torch.isfinite(ref), logp[1:] - ref, 0.0)
    return aggregate(log_ratios, target.weights, target.aggregation, target.clamp_floor)


def token_target(logp: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p*(t|Y) (eq. 5) over the vocabulary; returns (log p* [..., V], S [..., V], clamped)."""
    s, clamped = token_scores(logp, target)
    return torch.log_softmax(logp[0] + s, dim=-1), s, clamped


def chunk_log_probs(logits: torch.Tensor, target: Target, support: torch.Tensor,
                    chunk: torch.Tensor) -> torch.Tensor:
    """log_probs(logits, target, support) at the chunk's own tokens only: logits [R, ..., k, U] of R
    rows at the k chunk positions, on U columns (the supports' ids, log_probs_on_support; or the
    vocabulary), support [..., k, U] (bool), chunk [..., k] (the tokens' columns) -> [R, ..., k].

    log p(c_j) = x(c_j) - logsumexp over the support of x, x = logits / temperature: SCR's cascade
    needs no more, so no [R, ..., k, U] log-probs are written. A token off the support gets -inf,
    as in log_probs. No read-back."""
    x = logits.float()
    x = (x if target.temperature == 1.0 else x / target.temperature).masked_fill(~support, float("-inf"))
    tok = x.gather(-1, chunk.unsqueeze(-1).expand(*x.shape[:-1], 1)).squeeze(-1)       # [R, ..., k]
    return (tok - torch.logsumexp(x, dim=-1)).masked_fill(tok == float("-inf"), float("-inf"))


def prefix_scores(ref_tok: torch.Tensor, pref_tok: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """S of every prefix C_{1:j} of a chunk from its tokens' log-probs: ref_tok [..., k] under
    pi_ref, pref_tok [N, ..., k] under each pi_i (the leading dims: chunks scored at once). A
    prefix's log ratio is the sum of its token log ratios:
    l_i(C_{1:j}|Y) = sum_{m<=j} log pi_i(c_m|Y,C_{<m}) - log pi_ref(c_m|Y,C_{<m}).
    Returns (S [..., k], clamped [..., k])."""
    cum = (pref_tok - ref_tok).cumsum(dim=-1)                                           # [N, ..., k]
    return aggregate(cum, target.weights, target.aggregation, target.clamp_floor)
