"""The backend contract: how samplers reach models, over row groups with KV caches.

Rows are numbered like the paper's models: row 0 is the reference pi_ref, rows 1..N the
preference models. A sampler works on *groups* of rows that advance together:

    "ref"    row 0 alone       (drafting, the `base` method)
    "prefs"  rows 1..N         (scoring a drafted chunk)
    "all"    rows 0..N         (token-level methods: every row in one forward)

A `Session` holds one cache per group for one generation. `logits(group, seq, n)` returns
the logits after the last n tokens of `seq`, feeding only what the cache lacks and rolling
back what it holds beyond the shared prefix (a rejected draft); `draw(seq, target, rng)` the
reference's (or the target p*'s) next token after `seq`, drawn by the backend with that forward
(draws.py). Nothing
else touches a model: a backend implements `Backend` (new_cache, forward, crop) and every sampler
runs on it, whether the models are in this process (backends/) or behind a server.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch

from ..errors import PersonamixError
from .draws import Draw, Drawn, draw_next
from .scoring import Score, Scored, score_chunks
from .targets import Target

Group = Literal["ref", "prefs", "all"]
GROUPS: tuple[str, ...] = ("ref", "prefs", "all")


class Backend(ABC):
    """Scores groups of rows over caches. Subclasses set the four facts below (and dtype, where the
    models run in this process) in __init__ and declare what else they can do in the class
    attributes (capabilities, never probed)."""

    names: tuple[str, ...]       # preference-model names, row i+1 = names[i]
    vocab_size: int
    max_length: int              # context length in tokens
    device: torch.device
    #: the models' dtype in this process (None where they run elsewhere: the remote backend)
    dtype: torch.dtype | None = None
    #: which kernel runs the models' linear layers on CPU (backends/packing.py: onednn, avx2; None:
    #: PyTorch's own, or not in this process)
    linear_kernel: str | None = None

    #: short name (`backend=` in Generator.from_pretrained, GET /health)
    kind: ClassVar[str] = "?"
    #: forward_together runs the calls of several groups in ONE forward (SCR then scores a chunk
    #: and takes the next draft step at once)
    fuses_groups: ClassVar[bool] = False
    #: concurrent generations (threads) share forwards; `forwards` / `calls` count them. Such a
    #: backend also has `forward_score(calls, names, score, ahead)`: forward_together whose first
    #: call is SCR's chunk scoring, returning (logits, passes, scoring.Scored, Drawn or None), every
    #: chunk of a forward scored at once, and the last call's next token drawn `ahead` of its turn
    #: if asked (Session.score_chunk)
    shares_forwards: ClassVar[bool] = False
    #: forward_together takes a 5th item per call, `columns` (vocabulary ids [U]), and computes those
    #: calls' logits at those ids only ([rows, n_logits, U]: the output layer over U of V ids);
    #: Session asks for whole logits and indexes them on a backend without it
    restricts_columns: ClassVar[bool] = False
    #: the models run on an inference engine that samples drafts and scores given tokens itself
    #: (`sample`, `propose`, `score`, `score_next`: backends/remote.py); scr and
    #: token-rs then take their scores-only form
    scores_remotely: ClassVar[bool] = False
    #: `forward` can return whole next-token distributions (always, in this process)
    full_distributions: bool = True

    @abstractmethod
    def new_cache(self, group: Group, names: Sequence[str]) -> object:
        """An empty cache for one group of one generation."""

    @abstractmethod
    def forward(self, group: Group, tokens: torch.Tensor, cache: object, n_logits: int,
                names: Sequence[str]) -> tuple[torch.Tensor, int]:
        """Logits [rows, n_logits, V] after the last n_logits of `tokens` (fed after what `cache`
        holds; the cache then holds them too), and the number of model forward passes used.
        `names`: the preference models taking part (rows 1.. of the group, in that order)."""

    @abstractmethod
    def crop(self, cache: object, n_remove: int) -> None:
        """Forget the last n_remove tokens of `cache`."""

    def check(self, params) -> None:
        """Raise PersonamixError if this backend cannot run a generation with these SamplingParams
        (called before the generation starts, so a server can answer 400 instead of failing mid-stream)."""
        return None

    def close(self) -> None:
        """Release what the backend holds (connections, threads); the models stay usable in-process."""
        return None

    def free_cache(self, cache: object) -> None:
        """A finished generation's cache: give back what it holds now rather than when it is
        garbage-collected (the batched backend's pool slots)."""
        return None

    def cache_prefixes(self, max_mb: float) -> bool:
        """Keep the keys/values of prompt prefixes across generations, up to `max_mb` MB (0: stop),
        if this backend can (the batched one: backends/prefix_cache.py). Whether it does."""
        return False

    def forward_draw(self, tokens: torch.Tensor, cache: object, names: Sequence[str],
                     draw: Draw) -> tuple[Drawn, torch.Tensor, int]:
        """A call for the next token only, drawn here (draws.draw_next): of the "ref" group, or of
        "all" for a `mixed` draw (from p*). Returns (the draw, the logits [rows, 1, V], forward
        passes). A backend that shares forwards draws the tokens of all the calls in one forward at once."""
        logits, passes = self.forward("all" if draw.mixed else "ref", tokens, cache, 1, names)
        return draw_next(logits[:, -1][None], [draw])[0], logits, passes

    def forward_together(self, calls: Sequence[tuple[Group, torch.Tensor, object, int]],
                         names: Sequence[str]) -> tuple[list[torch.Tensor], int]:
        """`forward` for calls (group, tokens, cache, n_logits) of different groups of one
        generation: ([logits per call], forward passes). One forward each unless `fuses_groups`."""
        results = [self.forward(g, t, c, n, names) for g, t, c, n in calls]
        return [r[0] for r in results], sum(r[1] for r in results)


class Session:
    """KV caches of one generation, one per group, created on first use.

    `logits(group, seq, n)` is the call samplers need: it returns the logits that follow
    each of the last n tokens of `seq`, reusing the group's cache for the longest prefix it
    shares with `seq` and rolling the rest back (`truncate`). So a rejected draft is undone by
    simply asking about the sequence without it; the prefix is never recomputed. `draw` is the
    same over the reference for one drafted token, drawn by the backend.
    """

    MEMO = 8   # logits kept per group for the latest positions (a draft's tail, reused after a rollback)

    def __init__(self, backend: Backend, names: Sequence[str] | None = None):
        self.backend = backend
        self.names = tuple(backend.names if names is None else names)
        unknown = [n for n in self.names if n not in backend.names]
        if unknown:
            raise PersonamixError(f"unknown preference model(s) {', '.join(unknown)}")
        self.id = uuid.uuid4().hex  # one generation's calls carry it (a router can keep them on one replica)
        self.forward_passes = 0   # model forwards (engine requests, for a remote backend)
        self.round_trips = 0      # waits on an engine (concurrent requests count once)
        self._caches: dict[str, object] = {}
        self._tokens: dict[str, list[int]] = {}
        # group -> {p: logits [rows, V] after the first p cached tokens}; valid while those stay cached
        self._memo: dict[str, dict[int, torch.Tensor]] = {}
        # a draw made ahead of its turn (score_chunk): (position, the memo's logits there, the draw)
        self._ahead: tuple[int, torch.Tensor, Draw, Drawn] | None = None
        self.ahead_made = self.ahead_taken = 0   # draws made ahead of their turn (score_chunk), and taken

    @property
    def scores_remotely(self) -> bool:
        """The models run on an inference engine: sample / score / score_next instead of logits."""
        return self.backend.scores_remotely

    # -- scores-only calls (backends.remote): each counts its engine requests and one round trip

    def sample(self, seq: Sequence[int], max_tokens: int, **settings):
        """The engine's continuation of the reference: Sampled(tokens, their log-probs)."""
        self._count(1)
        return self.backend.sample(seq, max_tokens, session=self.id, **settings)

    def propose(self, seq: Sequence[int], n: int, *, seed: int):
        """n single-token proposals from the reference: Sampled(tokens, their log-probs)."""
        self._count(1)
        return self.backend.propose(seq, n, seed=seed, session=self.id)

    def score(self, seq: Sequence[int], n_last: int) -> torch.Tensor:
        """[N, n_last] log-probs of the last n_last tokens of seq under the session's preference models."""
        self._count(len(self.names))
        return self.backend.score(self.names, seq, n_last, session=self.id)

    def score_next(self, seq: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        """[N, U] log-probs of each token in token_ids after seq, under the session's preference models."""
        self._count(len(self.names))
        return self.backend.score_next(self.names, seq, token_ids, session=self.id)

    def _count(self, calls: int) -> None:
        self.forward_passes += calls
        self.round_trips += 1

    def cached(self, group: Group) -> list[int]:
        """The tokens whose keys/values the group's cache holds."""
        return self._tokens.get(group, [])

    def logits(self, group: Group, seq: Sequence[int], n_logits: int = 1) -> torch.Tensor:
        """Logits [rows, n_logits, V]: row r, column j predicts the token after seq[len(seq) - n_logits + j]."""
        return self.logits_together([(group, seq, n_logits)])[0]

    @property
    def fuses(self) -> bool:
        """Whether `logits_together` runs the requests of several groups in ONE forward."""
        return self.backend.fuses_groups

    def logits_together(self, requests: Sequence[tuple]) -> list[torch.Tensor]:
        """`logits` for several (group, seq, n_logits) of different groups; one forward for all
        when the backend can (`fuses`), else one per group. A request may carry a 4th item,
        `columns`: vocabulary ids [U] (ascending or not; None: all), and its logits are then
        [rows, n_logits, U], those ids' only (computed only there where the backend
        `restricts_columns`: SCR's chunk scoring needs its support's ids only)."""
        return self._logits_together(requests)[0]

    def score_chunk(self, requests: Sequence[tuple], score: Score,
                    ahead: Draw | None = None) -> tuple[list[torch.Tensor], Scored]:
        """`logits_together` whose first request is SCR's chunk scoring ("prefs" at the chunk's k
        positions, on the columns of score.logq), and the chunk's scores (scoring.score_chunks). A
        backend that shares forwards scores the chunks of all the calls in one forward at once
        (its `forward_score`); otherwise, or from the memo, they are scored here, by the same function.

        `ahead`: the draw `draw` will be asked for after the last request (a "ref" request of one
        position: SCR's next draft step, needed if the chunk is accepted whole), a Draw with
        `ahead` set. A backend that
        shares forwards draws it in this forward, with the other generations' draws, and puts the
        generator back (draws.Draw.ahead); `draw` takes it when asked for that very draw while
        nothing drew from the generator since, so the tokens are the same bits either way. On a
        GPU that is one step less in the generation's turn between forwards (~37 launches and a
        read-back, under the GIL that every generation shares)."""
        out, scored = self._logits_together(requests, score, ahead)
        return out, scored if scored is not None else score_chunks(out[:1], [score])[0]

    def _logits_together(self, requests: Sequence[tuple], score: Score | None = None,
                         ahead: Draw | None = None) -> tuple[list[torch.Tensor], Scored | None]:
        """logits_together, and request 0's chunk scored by the backend where it shares forwards
        (with the last request's next token drawn `ahead`, see score_chunk)."""
        if len({r[0] for r in requests}) != len(requests):
            raise ValueError("one request per group")
        out: list[torch.Tensor | None] = [None] * len(requests)
        todo = []        # (index, group, seq, new tokens, n_logits, columns)
        for i, (group, seq, n_logits, *rest) in enumerate(requests):
            columns = rest[0] if rest else None
            out[i] = self._from_cache(group, seq, n_logits)
            if out[i] is not None:
                out[i] = out[i] if columns is None else out[i].index_select(-1, columns)
            else:
                todo.append((i, group, seq, self._new_tokens(group, seq), n_logits, columns))
        if not todo:
            return out, None
        restrict = self.backend.restricts_columns and any(c is not None for *_, c in todo)
        calls = [(g, new, self._caches[g], n, c) if restrict else (g, new, self._caches[g], n)
                 for _, g, _, new, n, c in todo]
        scored = drawn = None
        if ahead is not None and (todo[-1][0] != len(requests) - 1 or todo[-1][1] != "ref" or todo[-1][4] != 1
                                  or todo[-1][5] is not None):
            ahead = None                  # the last request is not a "ref" position to compute now
        if (score is not None and todo[0][0] == 0 and self.backend.shares_forwards
                and (restrict or todo[0][5] is None)):      # the logits the backend scores are score.logq's columns
            logits, passes, scored, drawn = self.backend.forward_score(calls, self.names, score, ahead)
        elif len(todo) > 1 or restrict:
            logits, passes = self.backend.forward_together(calls, self.names)
        else:
            _, g, _, new, n, _ = todo[0]
            logits, passes = self.backend.forward(g, new, self._caches[g], n, self.names)
            logits = [logits]
        self._count_forward(passes)
        for (i, group, seq, _, n_logits, columns), lg in zip(todo, logits):
            if columns is None or not restrict:     # whole distributions: the memo keeps them
                self._remember(group, seq, n_logits, lg)
                if columns is not None:
                    lg = lg.index_select(-1, columns)
            else:
                self._tokens[group] = list(seq)
            out[i] = lg
        if drawn is not None:
            _, group, seq, *_ = todo[-1]
            self._ahead = (len(seq), self._memo[group][len(seq)], ahead, drawn)
            self.ahead_made += 1
        return out, scored

    def draw(self, seq: Sequence[int], target: Target, rng: torch.Generator, greedy: bool = False,
             mixed: bool = False, propose: int = 0) -> Drawn:
        """The reference's next token after `seq` under the target's temperature / top-k / top-p
        (its argmax when `greedy`), with the proposal's log-probs on the support (draws.Drawn);
        with `mixed`, the next token from the token-level target p* (eq. 5) of all N+1 rows
        instead (`propose`: by Token-RS's first block of that many proposals, draws.Draw). The
        backend draws it in the forward that computes the logits, together with every other
        generation's draw there (Backend.forward_draw); logits the memo still holds (a
        rolled-back draft's) are drawn from here, by the same function."""
        request = Draw(target, rng, greedy, mixed, propose)
        group = "all" if mixed else "ref"
        ahead, self._ahead = self._ahead, None
        logits = self._from_cache(group, seq, 1)
        if logits is not None:
            if ahead is not None and self._drawn_ahead(ahead, group, seq, request):
                self.ahead_taken += 1
                return ahead[3].checked()
            return draw_next(logits[:, -1][None], [request])[0].checked()
        drawn, logits, passes = self.backend.forward_draw(self._new_tokens(group, seq), self._caches[group],
                                                          self.names, request)
        self._count_forward(passes)
        self._remember(group, seq, 1, logits)
        return drawn.checked()

    def _drawn_ahead(self, ahead: tuple, group: Group, seq: Sequence[int], request: Draw) -> bool:
        """Whether the draw made ahead (score_chunk) is `request` after `seq`: the same position, the
        same logits still in the memo (not recomputed since), the same settings and generator,
        and nothing drawn from it since (Drawn.take, which then moves the generator on)."""
        position, logits, made, drawn = ahead
        return (group == "ref" and position == len(seq) and self._memo.get(group, {}).get(position) is logits
                and made.target is request.target and made.rng is request.rng
                and (made.greedy, made.mixed, made.propose) == (request.greedy, request.mixed, request.propose)
                and drawn.take(request.rng))

    def _new_tokens(self, group: Group, seq: Sequence[int]) -> torch.Tensor:
        """What the group's cache lacks of `seq`, as a tensor (the cache is created if need be)."""
        if group not in self._caches:
            self._caches[group] = self.backend.new_cache(group, self.names)
        return torch.tensor(seq[len(self.cached(group)):], dtype=torch.long, device=self.backend.device)

    def _count_forward(self, passes: int) -> None:
        self.forward_passes += passes
        self.round_trips += self.backend.scores_remotely

    def _remember(self, group: Group, seq: Sequence[int], n_logits: int, logits: torch.Tensor) -> None:
        """The cache now holds `seq`; the memo keeps its last n_logits positions' logits [rows, n_logits, V]."""
        self._tokens[group] = list(seq)
        memo = self._memo.setdefault(group, {})
        for j, p in enumerate(range(len(seq) - n_logits + 1, len(seq) + 1)):
            memo[p] = logits[:, j]
        for p in sorted(memo)[:-self.MEMO]:
            del memo[p]

    def _from_cache(self, group: Group, seq: Sequence[int], n_logits: int) -> torch.Tensor | None:
        """The logits if the memo has them (after rolling the cache back to `seq`); else None,
        with the cache rolled back to the longest prefix it shares with `seq` that leaves at
        least n_logits tokens to feed."""
        if group not in GROUPS:
            raise ValueError(f"unknown group {group!r}")
        if not 1 <= n_logits <= len(seq):
            raise ValueError(f"n_logits={n_logits} for a sequence of {len(seq)} tokens")
        if len(seq) > self.backend.max_length:
            raise PersonamixError(f"sequence of {len(seq)} tokens exceeds the model's context of "
                                  f"{self.backend.max_length} tokens")
        cached = self.cached(group)
        keep = min(len(cached), len(seq))
        if cached[:keep] != list(seq[:keep]):      # C-speed check first; then find the first mismatch
            keep = next(i for i, (a, b) in enumerate(zip(cached, seq)) if a != b)
        memo = self._memo.setdefault(group, {})
        wanted = range(len(seq) - n_logits + 1, len(seq) + 1)
        if keep == len(seq) and all(p in memo for p in wanted):
            self.truncate(group, keep)               # e.g. rolled back into a draft: logits already known
            return torch.stack([memo[p] for p in wanted], dim=1)
        self.truncate(group, min(keep, len(seq) - n_logits))
        return None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """The generation is over: its caches go back to the backend."""
        for cache in self._caches.values():
            self.backend.free_cache(cache)
        self._caches.clear()
        self._tokens.clear()
        self._memo.clear()

    def truncate(self, group: Group, length: int) -> None:
        """Roll the group's cache back to its first `length` tokens."""
        cached = self.cached(group)
        if not 0 <= length <= len(cached):
            raise ValueError(f"cannot truncate group {group!r} of length {len(cached)} to {length}")
        if length < len(cached):
            self.backend.crop(self._caches[group], len(cached) - length)
            self._tokens[group] = cached[:length]
            memo = self._memo.get(group, {})
            for p in [p for p in memo if p > length]:
                del memo[p]


