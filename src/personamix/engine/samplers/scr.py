"""`scr`: Speculative Chunk-level Rejection sampling, the MPG paper's method (Sec. 4).

One step, after prefix Y:
 1. draft C = c_1..c_k ~ pi_ref and keep log pi_ref(c_j | Y, C_<j)          (k ref forwards)
 2. score C under the N preference models in ONE forward; every prefix C_{1:j} then has
    l_i(C_{1:j}) = sum_{m<=j} log pi_i(c_m|.) - log pi_ref(c_m|.) and S_j = agg(l(C_{1:j}))
 3. cascade j = k, k-1, ..., 1: accept C_{1:j} if log u < S_j - log M_j (fresh u each test),
    where log M_j = max(window_j) + log(gamma) is the sliding-window bound estimate
 4. all prefixes rejected: single-token fallback, Token-RS at position 1 with the exact
    bound (so every step emits >= 1 token and the step's work is bounded)
 5. the S_j of the drafted chunk enter window_j (size W) after the decision.
With a backend that fuses groups (the batched one), the reference's step after c_k rides along
in the scoring forward of step 2, so when C is accepted whole the next draft starts without a
forward of its own (k forwards per accepted k-token chunk instead of k + 1). Where the backend
shares forwards among generations, that step's token is drawn in the same forward too, ahead of
its turn, and taken only if it is then the very same draw (Session.score_chunk): the same tokens,
one draw fewer in the generation's own turn between forwards.

Choices where the paper is vague (documented in docs/samplers.md):
 * one window per prefix length j: S of a j-token prefix is a sum of j token log ratios, so
   the bounds of different lengths live on different scales;
 * every drafted chunk enters the windows, accepted or not: M bounds S over pi_ref's drafts;
 * warm-up: the first `warmup` chunks are verified token by token with the exact per-token
   bound (token c_j accepted w.p. exp(S(c_j) - max_t S(t)), Token-RS at the first rejection),
   which is exact and fills the windows; the paper's "variance conditions" are not used;
 * bound="exact" verifies every chunk that way (the oracle: exact for p* for any k; for k=1
   it is SCR with M = the true max).
A window estimate can be too low (S_j > log M_j: a "bound violation"); the test is then
capped at 1 and the output is biased toward such chunks. tests/test_exactness.py measures it.

Over an inference engine (session.scores_remotely; backends/remote.py) a round is: the engine
drafts ENGINE_LOOKAHEAD chunks C, C' (one sampling call; its sampled tokens' log-probs are log q),
the N adapters score them at once (N calls), and the cascade runs on C as above; C' is tested
in the same way, against the windows updated with C, only if C was accepted whole, and is
dropped otherwise. C' is what the next step would have drafted after an accepted C, so this
changes when chunks are drafted and scored, not which are accepted: an engine scores a few more
tokens for almost nothing (the cost is the context), and an accepted chunk saves a round trip
(bench/engine_lookahead.py measures 1, 2 and 3 chunks a round; docs/scale-out.md). Drafting the
next round speculatively while this one is scored was tried and dropped: on a CPU engine it
competes with the scoring for the same cores and is wasted whenever a chunk fails. Without whole distributions
there is no exact bound, so the windows are seeded with the first chunk's own scores (no exact
warm-up) and the fallback is Token-RS against the j=1 window (common.window_rejection_token).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from functools import partial

import torch

from ..draws import Draw
from ..params import SamplingParams
from ..scoring import Score
from ..session import Session
from ..stats import Stats
from ..targets import Target, column_of, log_probs, prefix_scores, token_scores
from .common import draft, engine_seed, rejection_sample_token, window_rejection_token

#: chunks drafted and scored per round over an inference engine (see the module docstring)
ENGINE_LOOKAHEAD = 2


def sample(session: Session, prompt: list[int], target: Target, params: SamplingParams,
           rng: torch.Generator, stats: Stats) -> Iterator[list[int]]:
    if session.scores_remotely:
        yield from _sample_on_engine(session, prompt, target, params, rng, stats)
        return
    seq = list(prompt)
    log_gamma = math.log(params.gamma)
    windows = [deque(maxlen=params.window) for _ in range(params.k)]   # windows[j-1]: recent S_j
    chunks = 0
    while True:
        k = min(params.k, session.backend.max_length - len(seq))   # never draft past the context
        # the step's math needs the chunk's supports only (every other id has probability 0 under
        # every row): it runs on their ids' columns, ids None = all, and the preference models'
        # output layer is computed there only where the backend can (restricts_columns)
        chunk, logq, ids = draft(session, seq, k, target, rng)                      # [k, U], ids [U]
        chunk_c = column_of(ids, torch.tensor(chunk, device=logq.device))         # [k] the chunk's columns
        exact = params.bound == "exact" or chunks < max(params.warmup, 1)   # >= 1: the windows need a score
        # the cascade's numbers (S_j, a fresh log u per test, the clamps if any can be), computed by
        # the backend with every chunk scored in the same forward (scoring.py); exact: no uniforms
        score = Score(target, logq, chunk_c, None if exact else rng)
        scoring = ("prefs", seq + chunk[:-1], k, ids)
        if session.fuses and len(seq) + k < session.backend.max_length:
            # the next step's first draft logits (after the whole chunk) ride along in the scoring
            # forward; used when C is accepted whole, else rolled back like any rejected draft. Its
            # draw is made there too, ahead of its turn, and taken only if it is the same draw then
            # (Session.score_chunk); the exact verification draws in between, so not then
            ahead = None if exact else Draw(target, rng, ahead=True)
            (pref_logits, _), scored = session.score_chunk([scoring, ("ref", seq + chunk, 1)], score,
                                                           ahead)                                  # [N, k, U]
        else:
            (pref_logits,), scored = session.score_chunk([scoring], score)                    # [N, k, U]
        stats.proposals += k
        s_list = scored.s
        if exact:
            stats.warmup_chunks += params.bound != "exact"
            out = _verify_exact(logq, pref_logits, chunk, chunk_c, ids, target, params, rng, stats)
        else:
            # whole distributions only for the fallback (at position 1)
            fallback = partial(_first_token_rs, logq[0], pref_logits[:, 0], ids, target, rng, params.max_retries, stats)
            out = _cascade(chunk, s_list, scored.log_u, scored.clamped, windows, log_gamma, stats, fallback)
        for j in range(k):
            windows[j].append(s_list[j])
        chunks += 1
        seq.extend(out)
        yield out


def _sample_on_engine(session: Session, prompt: list[int], target: Target, params: SamplingParams,
                      rng: torch.Generator, stats: Stats) -> Iterator[list[int]]:
    """SCR over an inference engine (see the module docstring)."""
    seq = list(prompt)
    log_gamma = math.log(params.gamma)
    windows = [deque(maxlen=params.window) for _ in range(params.k)]
    max_length = session.backend.max_length

    def sizes(start: int) -> list[int]:      # the chunks of one round: ENGINE_LOOKAHEAD of k, within the context
        out, room = [], max_length - start
        for _ in range(ENGINE_LOOKAHEAD):
            if room > 0:
                out.append(min(params.k, room))
                room -= out[-1]
        return out

    while True:
        ks = sizes(len(seq))
        drafted = session.sample(seq, sum(ks), temperature=1.0, top_k=0, top_p=1.0, seed=engine_seed(rng))
        tokens, logq = drafted.tokens[:sum(ks)], torch.tensor(drafted.logprobs[:sum(ks)])
        pref = session.score(seq + tokens, len(tokens))                              # [N, sum(ks)]
        offset = 0
        for k in ks:
            chunk = tokens[offset: offset + k]
            s, clamped = prefix_scores(logq[offset: offset + k], pref[:, offset: offset + k], target)   # [k]
            stats.proposals += k
            s_list = s.tolist()
            if not windows[0]:      # no exact warm-up over an engine: the first chunk seeds the windows
                for j in range(k):
                    windows[j].append(s_list[j])
            fallback = partial(window_rejection_token, session, seq, target, windows[0], log_gamma,
                               params.max_retries, rng, stats)
            log_u = torch.rand(k, generator=rng, device=s.device).log().tolist()
            out = _cascade(chunk, s_list, log_u, clamped.tolist() if target.can_clamp else None, windows,
                           log_gamma, stats, fallback)
            for j in range(k):
                windows[j].append(s_list[j])
            seq.extend(out)
            yield out
            if out != chunk:     # the chunks after this one are of no use
                break
            offset += k


def _cascade(chunk: list[int], s: list[float], log_u: list[float], clamped: list | None, windows, log_gamma: float,
             stats: Stats, fallback) -> list[int]:
    """Steps 3-4: test C_{1:k}, ..., C_{1:1} against the window bounds, then fall back to one
    token of Token-RS (`fallback()` returns (token, tried, accepted)). s: S_j of the k prefixes,
    log_u: a fresh log u for each test, clamped: whether S_j was clamped (None: none can be)."""
    k = len(chunk)
    for j in range(k, 0, -1):
        log_m = max(windows[j - 1]) + log_gamma
        stats.chunks_proposed[j] += 1
        stats.bound_violations += s[j - 1] > log_m
        if clamped is not None:
            stats.clamps += int(clamped[j - 1])
        if log_u[j - 1] < s[j - 1] - log_m:
            stats.chunks_accepted[j] += 1
            stats.accepted += j
            return chunk[:j]
    stats.fallback_tokens += 1
    return [fallback()[0]]


def _first_token_rs(logq, pref_logits, ids, target, rng, max_retries, stats) -> tuple[int, int, bool]:
    """Step 4's fallback: Token-RS at the chunk's first position, from the reference's log-probs
    logq [U] (-inf off its support) and the preference models' logits there [N, U], all on the
    columns `ids` (vocabulary ids; None: all)."""
    logp = torch.cat([logq[None], log_probs(pref_logits, target, torch.isfinite(logq))])   # [N+1, U]
    return rejection_sample_token(logp, target, rng, max_retries, stats, ids)


def _verify_exact(logq, pref_logits, chunk, chunk_c, ids, target, params, rng, stats) -> list[int]:
    """Token-by-token verification with the exact bound: token-level Token-RS whose first
    proposal at position j is the drafted c_j; exact for p* (warm-up and bound="exact").
    logq [k, U] the reference's log-probs (-inf off its supports), pref_logits [N, k, U], all on
    the columns `ids` (vocabulary ids; None: all); chunk_c [k]: the chunk's columns."""
    logp = torch.cat([logq[None], log_probs(pref_logits, target, torch.isfinite(logq))])   # [N+1, k, U]
    s, clamped = token_scores(logp, target)                                        # [k, U]
    log_m = s.masked_fill(~torch.isfinite(logp[0]), float("-inf")).amax(-1)       # [k]
    idx = chunk_c.view(-1, 1)
    ok = (torch.rand(len(chunk), generator=rng, device=s.device).log()
          < s.gather(1, idx).squeeze(1) - log_m).tolist()
    n = ok.index(False) if False in ok else len(chunk)
    stats.accepted += n
    if target.can_clamp:
        stats.clamps += int(clamped.gather(1, idx)[: n + 1].sum())
    if n == len(chunk):
        return list(chunk)
    stats.proposals -= len(chunk) - n - 1      # drafted tokens after the rejection were never tested
    stats.fallback_tokens += 1
    return chunk[:n] + [rejection_sample_token(logp[:, n], target, rng, params.max_retries, stats, ids)[0]]
