"""Drawing the next token of many generations at once: the reference's, or the target p*'s.

Most of a busy server's calls are one-token steps of the reference alone: SCR's and spec's drafts
(k of every k + 1 calls) and the `base` method. Each needs the same small program on the
reference's logits at one position: temperature, the top-k / top-p support, log-probs on it
(the proposal q), a draw. Run by every generation on its own, that is 37 tensor operations and
2 read-backs per generation per step, each a kernel launch or a wait for the stream on a GPU
(docs/bench/gpu.md: at 64 clients the generations' own work was 37% of the time). `draw_next`
runs it for all rows of one forward at once (vLLM's sampler does the same for its requests): one
set of operations for all rows, plus a `rand` from each row's generator and the views that hand
each row its result (64 rows: 359 operations against 2,368, bench/draws.py), and two read-backs.

The token-level methods' steps are the same program over a generation's N + 1 rows (`mixed`
draws, logits [B, N + 1, V]) followed by the target's math (targets.token_target, eq. 5): a draw
from p* (`token`), or Token-RS's first block of proposals against the exact bound (`propose`).
Draws of one set of weights and aggregation go together (`Draw.mix`); 64 `token` steps: 382
operations against 3,520.

A row's result does not depend on its company. Rows are grouped by kind (no truncation; top-p;
top-k, which runs row by row) and, for top-p, by the prefix of most likely tokens that holds
top_p of its mass (targets.TOP_P_PREFIXES: 64, 1024, then the whole vocabulary); a row is
computed at that prefix's width whatever else is in the batch, with the same row-wise
operations, so a seeded generation draws the same bits alone or beside others (checked by
tests/test_draws.py). Against `log_probs_on_support` + `sample_token` of one row (and
`token_target`, `rejection_sample_token` for mixed draws), the support and the token are the
same and the log-probs equal up to float rounding: a row's log-softmax runs over its prefix's
width with -inf past its support, not over the support alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import PersonamixError
from .targets import TOP_P_PREFIXES, Target, log_probs_on_support, token_scores, token_target

#: on CPU, rows are drawn in passes of at most this many: a pass's [rows, V] temporaries then stay
#: small enough for the caches and the allocator's free lists (64 rows of the default model's
#: vocabulary on one core: at once 17-46 ms, in passes of 16 20-31 ms, one by one 31-46 ms, runs of
#: bench/draws.py). Other devices draw every row in one pass (there the count of operations is the cost).
CPU_ROWS_PER_PASS = 16


#: proposals a Token-RS draw tries in one block, read back once (samplers.common.rejection_sample_token)
RS_BLOCK = 32


@dataclass(frozen=True, eq=False)
class Draw:
    """One generation's request: the next token from the reference under `target`'s temperature
    / top-k / top-p, drawn with `rng` (its argmax when `greedy`; then `rng` is not used). `mixed`:
    from the token-level target p* (eq. 5) instead, the N+1 rows' log-probs on the reference's
    support aggregated with the target's weights (the `token` method's step). `propose` (with
    `mixed`, not `greedy`): Token-RS's first block instead (the paper's baseline, samplers/
    token_rs.py): up to `propose` proposals t ~ the reference on the support, each accepted with
    probability exp(S(t) - log M), M = max_t exp(S(t|Y)) over the support (the exact bound); the
    token is the first accepted. If none is, the draw is not `accepted` (token -1, no error) and
    the caller goes on from there (samplers.common.rejection_sample_token). `ahead`: drawn before
    its turn (SCR's next draft step, in the forward that scores the chunk before it): `rng` is put
    back where it was, and the Drawn holds its states before and after (`Drawn.take`)."""

    target: Target
    rng: torch.Generator
    greedy: bool = False
    mixed: bool = False
    propose: int = 0
    ahead: bool = False

    def __post_init__(self) -> None:
        if self.propose and (not self.mixed or self.greedy or self.propose < 0):
            raise ValueError("propose: a positive number of proposals, for a mixed draw that is not greedy")

    @property
    def rows(self) -> int:
        """Rows of logits the draw reads: the reference, and with `mixed` the N preference models."""
        return 1 + len(self.target.weights) if self.mixed else 1

    @property
    def mix(self) -> tuple | None:
        """What p*'s math needs beyond the support (None for the reference): draws with the same
        `mix` run the same operations, so they can be drawn together."""
        t = self.target
        return (t.weights, t.aggregation, t.clamp_floor, self.propose) if self.mixed else None


@dataclass(frozen=True, eq=False)
class Drawn:
    """A draw's outcome: the token (a vocabulary id), the reference's log-probs on the support
    [U] (the proposal q) and the support's vocabulary ids [U] (ascending; None: the whole
    vocabulary, U = V). `error`: why nothing could be drawn (token -1). A `mixed` draw's `logq`
    is log p* on the support (a Token-RS draw's stays q); `clamps` counts the clamped scores it
    met where Target.can_clamp (targets.aggregate: the token's, or the proposals' tried); a
    Token-RS draw says how many proposals it tried and whether one was `accepted`. A draw made
    `ahead` keeps its generator's states before and after it (`rng_states`)."""

    token: int
    logq: torch.Tensor
    ids: torch.Tensor | None
    error: PersonamixError | None = None
    clamps: int = 0
    proposals: int = 0
    accepted: bool = False
    rng_states: tuple[torch.Tensor, torch.Tensor] | None = None

    def checked(self) -> Drawn:
        if self.error is not None:
            raise self.error
        return self

    def take(self, rng: torch.Generator) -> bool:
        """For a draw made `ahead` with `rng`: whether it is the draw `rng` would make now from the
        same logits, i.e. nothing drew from `rng` since (it is still in the state before); if so,
        `rng` moves on to the state after, as if it had drawn it now."""
        if self.rng_states is None or not torch.equal(rng.get_state(), self.rng_states[0]):
            return False
        rng.set_state(self.rng_states[1])
        return True


@dataclass
class _Group:
    """Rows drawn by one set of operations: log-probs [b, m] on columns `ids` [b, m] (ascending,
    then the vocabulary size past a row's support; None: column = id, m = V), each row's support
    size (`sizes`); for mixed draws whether each column's score was clamped [b, m] (None: never);
    for Token-RS draws the scores S [b, m] (`logp` is then the reference's)."""

    rows: list[int]
    logp: torch.Tensor
    ids: torch.Tensor | None
    sizes: list[int]
    clamped: torch.Tensor | None = None
    scores: torch.Tensor | None = None


def draw_next(logits: torch.Tensor, draws: Sequence[Draw], rows_per_pass: int | None = None) -> list[Drawn]:
    """One token for each draw: `logits` [B, V] (the reference at one position, row b for
    draws[b]), or [B, R, V] (each draw's R rows: for `mixed` draws the reference and its N
    preference models, every draw with the same `mix`), in passes of `rows_per_pass` draws (None:
    CPU_ROWS_PER_PASS on CPU, all elsewhere). A pass reads back once per top-p prefix tried (see
    the module docstring; none without top-p) and once for all its tokens (and clamp flags)."""
    x = logits.unsqueeze(1) if logits.dim() == 2 else logits                         # [B, R, V]
    if (x.dim() != 3 or x.shape[0] != len(draws)
            or any(d.rows != x.shape[1] or d.mix != draws[0].mix for d in draws)):
        raise ValueError(f"logits {tuple(logits.shape)} for {len(draws)} draws: expected [B, V], or "
                         "[B, N + 1, V] for mixed draws of one `mix` (weights, aggregation, proposals)")
    if rows_per_pass is None:
        rows_per_pass = CPU_ROWS_PER_PASS if x.device.type == "cpu" else len(draws)
    if len(draws) > rows_per_pass:
        return [d for i in range(0, len(draws), rows_per_pass)
                for d in draw_next(x[i: i + rows_per_pass], draws[i: i + rows_per_pass], rows_per_pass)]
    ahead = {b: d.rng.get_state() for b, d in enumerate(draws) if d.ahead}
    out = _draw_pass(x, draws)
    for b, before in ahead.items():          # put the generator back; Drawn.take moves it on
        out[b] = dataclasses.replace(out[b], rng_states=(before, draws[b].rng.get_state()))
        draws[b].rng.set_state(before)
    return out


def _draw_pass(x: torch.Tensor, draws: Sequence[Draw]) -> list[Drawn]:
    """draw_next's work for one pass: x [B, R, V]."""
    vocab = x.shape[-1]
    whole = [b for b, d in enumerate(draws) if not d.target.top_k and d.target.top_p >= 1.0]
    top_p = [b for b, d in enumerate(draws) if not d.target.top_k and d.target.top_p < 1.0]
    groups = []
    if whole:
        x_whole, t = _picked(x, whole, draws)
        groups.append(_group(whole, torch.log_softmax(_scaled(x_whole.float(), t), dim=-1), None,
                             [vocab] * len(whole), draws))
    if top_p:
        groups += _top_p_groups(*_picked(x, top_p, draws), top_p, draws, vocab)
    for b, d in enumerate(draws):
        if d.target.top_k:       # rare in practice: row by row, through the general path
            logp, ids = log_probs_on_support(x[b], d.target)                             # [R, U]
            groups.append(_group([b], logp[None], None if ids is None else ids[None], [logp.shape[-1]], draws))
    sampled = [_sample(g, draws) for g in groups]
    extras = [e.flatten() for _, _, e in sampled if e is not None]
    back = [t for t, _, _ in sampled] + extras
    back = (back[0] if len(back) == 1 else torch.cat(back)).tolist()                # the pass's one read-back
    tokens, extras = back[:len(draws)], iter(back[len(draws):])
    out: list[Drawn | None] = [None] * len(draws)
    at = 0
    for g, (_, total, extra) in zip(groups, sampled):
        width = g.logp.shape[-1]
        for r, (b, n) in enumerate(zip(g.rows, g.sizes)):
            token = tokens[at + r]
            logq, ids = g.logp[r], None if g.ids is None else g.ids[r]
            if n < width:
                logq, ids = logq[:n], ids[:n]
            if g.scores is not None:                           # Token-RS: mass usable, accepted, tried[, clamps]
                ok, accepted, tried, *clamps = (next(extras) for _ in range(extra.shape[1]))
                out[b] = Drawn(token, logq, ids, None if ok else no_mass(total[r]), sum(clamps), tried, bool(accepted))
            else:
                error = None if token >= 0 else no_mass(total[r])
                out[b] = Drawn(token, logq, ids, error, next(extras) if extra is not None else 0)
        at += len(g.rows)
    return out


def _per_row(values: list[float], like: torch.Tensor) -> float | torch.Tensor:
    """One number for every row (no tensor to make), else one per row, shaped [b, 1, ...] to
    broadcast over `like` (the same bits either way)."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, device=like.device, dtype=like.dtype).view(-1, *[1] * (like.dim() - 1))


def _picked(x: torch.Tensor, rows: list[int], draws: Sequence[Draw]) -> tuple[torch.Tensor, float | torch.Tensor]:
    """x[rows] [b, R, V] and their draws' temperatures (a number, or one per draw [b, 1, 1])."""
    x = x if len(rows) == x.shape[0] else x[rows]
    return x, _per_row([draws[b].target.temperature for b in rows], x)


def _scaled(x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """x / temperature t (x in fp32)."""
    return x if isinstance(t, float) and t == 1.0 else x / t


def _group(rows: list[int], logp: torch.Tensor, ids: torch.Tensor | None, sizes: list[int],
           draws: Sequence[Draw]) -> _Group:
    """The draws `rows`, whose R rows' log-probs on their supports are logp [b, R, m]: a group
    drawing from the reference (R = 1), or from p* (eq. 5: targets.token_target, which takes the
    rows first: [R, b, m]) with its scores' clamp flags where the target can clamp."""
    if logp.shape[1] == 1:
        return _Group(rows, logp[:, 0], ids, sizes)
    target = draws[rows[0]].target                     # its weights, aggregation, floor: every row's (`mix`)
    if draws[rows[0]].propose:
        s, clamped = token_scores(logp.transpose(0, 1), target)                           # [b, m]
        return _Group(rows, logp[:, 0], ids, sizes, clamped if target.can_clamp else None, s)
    logp_star, _, clamped = token_target(logp.transpose(0, 1), target)                  # [b, m]
    return _Group(rows, logp_star, ids, sizes, clamped if target.can_clamp else None)


@functools.lru_cache(maxsize=16)
def _columns(m: int, device: torch.device) -> torch.Tensor:
    """0 .. m-1 as a row [1, m] (read only)."""
    return torch.arange(m, device=device).view(1, -1)


def _top_p_groups(x: torch.Tensor, t: float | torch.Tensor, rows: list[int], draws: Sequence[Draw],
                  vocab: int) -> list[_Group]:
    """The top-p draws' supports and log-probs: x [b, R, V] (the logits of `rows`), t their
    temperatures. A draw's support is the shortest prefix of its reference's most likely tokens
    whose mass reaches top_p (the first always stays), as targets._support decides it, imposed on
    all its R rows; each draw is computed at the width of the first prefix (TOP_P_PREFIXES, then
    the whole vocabulary) that holds top_p, one group per width. Only the reference's row is
    scaled whole; the others on the support's columns only."""
    t_ref = t if isinstance(t, float) else t[:, 0]                                  # [b, 1]
    probs = torch.softmax(_scaled(x[:, 0].float(), t_ref), dim=-1)                  # [b, V] the reference's
    p_all = _per_row([draws[b].target.top_p for b in rows], probs)                  # a number, or [b, 1]
    pending = list(range(len(rows)))        # positions in `rows` still without a support
    groups = []
    widths = [m for m in TOP_P_PREFIXES if m < vocab] + [vocab]
    for m in widths:
        some = len(pending) < len(rows)
        pick = torch.tensor(pending, device=x.device) if some else None
        sub = probs.index_select(0, pick) if some else probs
        p = p_all.index_select(0, pick) if some and isinstance(p_all, torch.Tensor) else p_all
        if m < vocab:
            top, order = torch.topk(sub, m, dim=-1)                                 # [b', m]
        else:
            top, order = torch.sort(sub, dim=-1, descending=True)
        kept = ((top.cumsum(-1) - top) < p).sum(-1)                                 # the mass before a token only grows
        n = kept if m == vocab else torch.where(top.sum(-1) >= (p if isinstance(p, float) else p.view(-1)), kept, -1)
        # -1: the prefix holds less than top_p
        n_list = n.tolist()                                                          # one read-back per width tried
        done = [i for i, k in enumerate(n_list) if k >= 0]
        if done:
            if len(done) < len(n_list):
                keep = torch.tensor(done, device=x.device)
                order, n = order.index_select(0, keep), n.index_select(0, keep)
            at = [pending[i] for i in done]
            drop = _columns(m, x.device) >= n.view(-1, 1)                           # [d, m] past each draw's n
            ids = order.masked_fill(drop, vocab).sort(dim=-1).values                 # its ids ascending, then V
            xs, ts = x, t
            if len(at) < len(rows):
                pick = torch.tensor(at, device=x.device)
                xs, ts = x.index_select(0, pick), t if isinstance(t, float) else t.index_select(0, pick)
            at_ids = ids.clamp_max(vocab - 1).unsqueeze(1)                            # [d, 1, m]
            on = xs.gather(2, at_ids if xs.shape[1] == 1 else at_ids.expand(-1, xs.shape[1], -1))   # [d, R, m]
            logp = torch.log_softmax(_scaled(on.float(), ts).masked_fill(drop.unsqueeze(1), float("-inf")), dim=-1)
            groups.append(_group([rows[i] for i in at], logp, ids, [n_list[i] for i in done], draws))
        pending = [pending[i] for i, k in enumerate(n_list) if k < 0]
        if not pending:
            break
    return groups


@functools.lru_cache(maxsize=16)
def _zero(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros((), device=device, dtype=dtype)


def inverse_cdf(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draws by inverse CDF: for cumulative masses `cdf` [..., m] and uniforms u [..., n] in [0, 1),
    the first column whose cumulative mass exceeds u times the row's total [..., n]. Never a
    zero-probability column; past the last one only where the mass is not `usable`, and then
    clamped to it, so that indexing with the result stays in bounds."""
    total = cdf[..., -1:]                                                            # [..., 1]
    x = torch.minimum(u * total, torch.nextafter(total, _zero(cdf.device, cdf.dtype)))   # < total despite rounding
    return torch.searchsorted(cdf, x, right=True).clamp_max_(cdf.shape[-1] - 1)


def usable(total: torch.Tensor) -> torch.Tensor:
    """Whether a distribution of this total mass can be sampled: finite and > 0 (bool)."""
    return (total > 0) & (total < math.inf)


def no_mass(total: torch.Tensor) -> PersonamixError:
    return PersonamixError(f"cannot sample: the distribution's mass is {float(total)} (non-finite logits?)")


def _sample(g: _Group, draws: Sequence[Draw]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The group's tokens (vocabulary ids; -1 where a row's mass cannot be sampled), its rows'
    total masses, and what else is read back with the tokens [b] or [b, j] (None: nothing):
    whether each token's score was clamped (where the group can clamp), or a Token-RS group's
    (`_propose`). Each row's uniforms come from its own generator, so a generation's random
    stream is its own; a row's draw lands on its support (its cdf reaches the total there and
    stays, past it are zeros)."""
    if g.scores is not None:
        return _propose(g, draws)
    dev = g.logp.device
    greedy = [draws[b].greedy for b in g.rows]
    cdf = g.logp.exp().cumsum(-1)                                                   # [b, m]
    u = [torch.zeros(1, device=dev, dtype=cdf.dtype) if gr else
         torch.rand(1, generator=draws[b].rng, device=dev, dtype=cdf.dtype) for b, gr in zip(g.rows, greedy)]
    i = inverse_cdf(cdf, (u[0] if len(u) == 1 else torch.cat(u)).view(-1, 1)).squeeze(1)   # [b]
    total = cdf[:, -1]                                                              # [b]
    ok = usable(total)
    if any(greedy):
        flag = torch.tensor(greedy, device=dev)
        i = torch.where(flag, g.logp.argmax(-1), i)
        ok = ok | flag
    token = i if g.ids is None else g.ids.gather(1, i.view(-1, 1)).squeeze(1)
    clamped = None if g.clamped is None else g.clamped.gather(1, i.view(-1, 1)).squeeze(1).long()
    return torch.where(ok, token, -1), total, clamped


def _propose(g: _Group, draws: Sequence[Draw]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-RS's first block for every row of the group (Draw.propose)."""
    return rs_block(g.logp, g.scores, g.clamped, g.ids, draws[g.rows[0]].propose, [draws[b].rng for b in g.rows])


def rs_block(ref: torch.Tensor, s: torch.Tensor, clamped: torch.Tensor | None, ids: torch.Tensor | None,
             n: int, rngs: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of Token-RS for b rows at once (the paper's baseline; samplers/token_rs.py): n
    proposals t ~ q and n uniforms u per row, from the row's own generator in that order, t
    accepted iff log u < S(t) - log M with log M = max S over the row's support (the exact bound),
    the first accepted kept. The batched draws' first block and every block of one generation's
    loop (samplers.common.rejection_sample_token) run this, so both take the same random stream.

    ref [b, m]: the reference's log-probs q (-inf off the support), s [b, m]: the scores S,
    clamped [b, m]: whether each score was clamped (None: none can be), ids [b, m]: each column's
    vocabulary id (None: column = id). Returns the tokens [b] (-1 where none was accepted, or the
    mass is not usable), the rows' total masses [b], and per row [mass usable, accepted,
    proposals tried (up to the first accepted), clamped scores among them (with `clamped`)]
    [b, 3 or 4], to be read back with the tokens."""
    dev = ref.device
    cdf = ref.exp().cumsum(-1)                                                      # [b, m]
    u, log_u = zip(*((torch.rand(n, generator=rng, device=dev, dtype=cdf.dtype),
                      torch.rand(n, generator=rng, device=dev)) for rng in rngs))
    u, log_u = (x[0][None] if len(x) == 1 else torch.stack(x) for x in (u, log_u))   # [b, n]
    props = inverse_cdf(cdf, u)                                                     # [b, n] columns
    log_m = s.masked_fill(~torch.isfinite(ref), float("-inf")).amax(-1, keepdim=True)   # [b, 1] log M on the support
    ok = log_u.log() < s.gather(1, props) - log_m                                   # [b, n]
    first = ok.float().argmax(-1, keepdim=True)                                     # [b, 1] (0 when none passed)
    col = props.gather(1, first)
    token = (col if ids is None else ids.gather(1, col)).squeeze(1)                 # [b]
    total = cdf[:, -1]
    mass, accepted = usable(total), ok.any(-1)
    tried = torch.where(accepted, first.squeeze(1) + 1, n)                           # [b]
    extra = [mass.long(), accepted.long(), tried]
    if clamped is not None:
        extra.append((clamped.gather(1, props) & (_columns(n, dev) < tried.view(-1, 1))).sum(-1))
    return torch.where(mass & accepted, token, -1), total, torch.stack(extra, dim=1)


__all__ = ["CPU_ROWS_PER_PASS", "RS_BLOCK", "Draw", "Drawn", "draw_next", "inverse_cdf", "no_mass", "rs_block",
           "usable"]
