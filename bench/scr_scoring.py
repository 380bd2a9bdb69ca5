"""SCR's chunk scoring (step 2's math after the scoring forward: S_j of the k prefixes, their clamp
flags, the cascade's uniforms) for B generations whose chunks one forward scored: each
generation's former step on its own (per-position logsumexp over its supports, then
prefix_scores, its uniforms, a read-back), `scoring.score_chunks` one chunk at a time (what a
lone generation runs now), and `score_chunks` over all B at once (what the batched backend runs
after a forward). Counted: tensor operations (on a GPU each a kernel launch or more, issued under
the GIL) and read-backs (each a wait for the stream); timed: ms on this CPU, one thread (a
generation thread's), or on a GPU with `--device cuda`.

    python bench/scr_scoring.py [--rows 1 4 16 64] [--k 4] [--top-p 0.9] [--temperature 0.7]
                                [--repeats 20] [--device cpu] [--out docs/bench/scr_scoring.md]

Logits: the default model's with the shipped MBTI adapters E, N, T, J (equal weights, linear) at
the last positions of a chat prompt (bench/draws.py); chunk b covers k positions from b mod 64,
its tokens drawn from the reference, the preference models' logits on the union of its supports
(as the batched backend's output layer computes them).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from draws import NAMES, model_logits  # bench/draws.py: the same logits (this folder)

from personamix.engine.scoring import Score, score_chunks
from personamix.engine.targets import Target, column_of, log_probs_on_support, prefix_scores
from personamix.testing import SamplerWork


def former(logits: list[torch.Tensor], scores: list[Score]) -> list[list[float]]:
    """Each generation's step before scoring.py: log p(c_j) by a logsumexp over position j's
    on-support columns (one nonzero for the chunk), prefix_scores, k uniforms, one read-back."""
    out = []
    for lg, sc in zip(logits, scores):
        t, support, k = sc.target.temperature, torch.isfinite(sc.logq), sc.logq.shape[0]
        both = torch.cat([sc.chunk, support.sum(-1)]).tolist()
        chunk, sizes = both[:k], both[k:]
        on = support.nonzero()[:, 1].split(sizes)
        tok = []
        for j in range(k):
            x = lg[:, j].float()
            kept = x if sizes[j] == x.shape[-1] else x.index_select(-1, on[j])
            tok.append((x[:, chunk[j]] / t - torch.logsumexp(kept / t, -1)).masked_fill(~support[j, chunk[j]],
                                                                                            float("-inf")))
        ref_tok = sc.logq.gather(1, sc.chunk.view(-1, 1)).squeeze(1)
        s, clamped = prefix_scores(ref_tok, torch.stack(tok, dim=1), sc.target)
        log_u = torch.rand(k, generator=sc.rng, device=s.device).log().to(s.dtype)
        rows = [s, log_u, clamped.to(s.dtype)] if sc.target.can_clamp else [s, log_u]
        out.append(torch.stack(rows).tolist()[0])
    return out


def one_by_one(logits: list[torch.Tensor], scores: list[Score]) -> list[list[float]]:
    return [score_chunks([lg], [sc])[0].s for lg, sc in zip(logits, scores)]


def together(logits: list[torch.Tensor], scores: list[Score]) -> list[list[float]]:
    return [r.s for r in score_chunks(logits, scores)]


def chunks(base: torch.Tensor, rows: int, k: int, target: Target) -> list[tuple[torch.Tensor, Score]]:
    """(logits [N, k, U], Score) of `rows` chunks drafted from the reference over base [P, 1 + N, V]."""
    g = torch.Generator(device=base.device).manual_seed(0)
    out = []
    for b in range(rows):
        at = b % (base.shape[0] - k + 1)
        x = base[at: at + k].transpose(0, 1)                                         # [1 + N, k, V]
        logp, ids = log_probs_on_support(x[:1], target)                               # [1, k, U]
        cols = torch.multinomial(logp[0].exp(), 1, generator=g).squeeze(1)           # [k]
        on = x[1:] if ids is None else x[1:].index_select(-1, ids)
        tokens = cols if ids is None else ids[cols]
        out.append((on, Score(target, logp[0], column_of(ids, tokens))))
    return out


def measure(f, work: list[tuple[torch.Tensor, Score]], repeats: int) -> tuple[int, int, float, list]:
    """(ops, read-backs, ms) for the B chunks, and the scores of the first call."""
    dev = work[0][0].device

    def requests(seed: int) -> list[Score]:
        return [Score(sc.target, sc.logq, sc.chunk, torch.Generator(device=dev).manual_seed(seed + b))
                for b, (_, sc) in enumerate(work)]
    logits = [lg for lg, _ in work]
    f(logits, requests(1))                                                           # warm-up
    with SamplerWork() as counted:
        s = f(logits, requests(0))
    start = time.perf_counter()
    for r in range(repeats):
        f(logits, requests(r))
    return counted.ops, counted.reads, (time.perf_counter() - start) / repeats * 1e3, s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    base = model_logits(device)
    target = Target(NAMES, (0.25,) * len(NAMES), temperature=a.temperature, top_p=a.top_p)
    lines = [f"Default model's logits, chunks of k={a.k} drafted at {base.shape[0]} positions of a chat prompt, "
             f"N={len(NAMES)} (linear, equal weights); temperature {a.temperature}, top-p {a.top_p}; device {device}"
             f"{' (one thread)' if device.type == 'cpu' else ''}, torch {torch.__version__}, {platform.machine()}, "
             f"{os.cpu_count()} cores.", "",
             "| chunks B | former step, one by one: ops | read-backs | ms | score_chunks, one by one: ops | read-backs "
             "| ms | score_chunks, all at once: ops | read-backs | ms | ops ratio (former / at once) | same S |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rows in a.rows:
        work = chunks(base, rows, a.k, target)
        o0, r0, t0, s0 = measure(former, work, a.repeats)
        o1, r1, t1, s1 = measure(one_by_one, work, a.repeats)
        o2, r2, t2, s2 = measure(together, work, a.repeats)
        close = s1 == s2 and torch.allclose(torch.tensor(s0), torch.tensor(s1), atol=1e-4)
        lines.append(f"| {rows} | {o0} | {r0} | {t0:.2f} | {o1} | {r1} | {t1:.2f} | {o2} | {r2} | {t2:.2f} | "
                     f"{o0 / o2:.1f}x | {'yes' if close else 'NO'} |")
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            f.write("# SCR's chunk scoring: one by one vs all of a forward's chunks at once\n\n"
                    f"Command: `python bench/scr_scoring.py {' '.join(sys.argv[1:])}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
