"""SCR's per-chunk target math on one CPU core: the drafted tokens' log-probs from the N
preference models' logits [N, k, V], as whole log-probs then a gather (what SCR did before) vs
`targets.chunk_log_probs` (logsumexp over each position's support, the chunk's tokens only).

    python bench/scr_scoring.py [--n 4 8] [--k 4] [--repeats 200]

Random logits (scale 3, the preference models the reference plus noise 0.3) over the default
model's vocabulary; one thread, as in a generation thread of the batched backend (omp.py).
"""
from __future__ import annotations

import argparse
import time

import torch

from personamix.engine.targets import Target, chunk_log_probs, log_probs

VOCAB = 49152


def old(logq, pref, target, chunk):
    """The previous path: [N+1, k, V] log-probs, gathered at the chunk."""
    logp = torch.cat([logq[None], log_probs(pref, target, torch.isfinite(logq))])
    return logp[1:].gather(-1, chunk.view(1, -1, 1).expand(pref.shape[0], -1, 1)).squeeze(-1)


def new(logq, pref, target, chunk):
    return chunk_log_probs(pref, target, torch.isfinite(logq), chunk)


def timed(f, args, repeats: int) -> float:
    f(*args)
    start = time.perf_counter()
    for _ in range(repeats):
        f(*args)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=200)
    a = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print("| N | k | settings | support (mean tokens) | log-probs + gather ms | chunk_log_probs ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for n in a.n:
        for settings in ({"temperature": 0.7, "top_p": 0.9}, {}):
            target = Target(names=tuple(f"m{i}" for i in range(n)), weights=(1.0,) * n, **settings)
            ref = torch.randn(a.k, VOCAB, generator=g) * 3
            pref = ref + torch.randn(n, a.k, VOCAB, generator=g) * 0.3
            logq = log_probs(ref, target)
            chunk = torch.stack([torch.multinomial(logq[j].exp(), 1, generator=g)[0] for j in range(a.k)])
            assert torch.allclose(old(logq, pref, target, chunk), new(logq, pref, target, chunk), atol=1e-5)
            t_old = timed(old, (logq, pref, target, chunk), a.repeats)
            t_new = timed(new, (logq, pref, target, chunk), a.repeats)
            name = ", ".join(f"{k}={v}" for k, v in settings.items()) or "full vocabulary"
            on = torch.isfinite(logq).sum(-1).float().mean()
            print(f"| {n} | {a.k} | {name} | {on:.0f} | {t_old:.2f} | {t_new:.2f} | {t_old / t_new:.1f}x |")


if __name__ == "__main__":
    main()
