"""The batched backend's attention for short calls on CPU: two batched matmuls with the query
heads of each KV head stacked (`_Batch._grouped_attention`, the default) against SDPA with a
mask (what it replaced), timed side by side on forwards of the mix a busy server packs (at 16
clients, recorded: ~8 one-token reference draft calls and ~2 SCR chunk calls of 4 adapter rows
x 4 tokens per forward), at several context lengths.

    python bench/attention_mix.py [--mix 8,2 16,4] [--contexts 45 200 500] [--steps 20]
                                  [--out docs/bench/attention_mix.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from personamix import Generator
from personamix.backends import batching
from personamix.cli.common import quiet
from personamix.loading import DEFAULT_MODEL, random_adapters

NAMES = ["A", "B", "C", "D"]


def prefilled(gen: Generator, group: str, n: int, ctx: int) -> list:
    b, out = gen.backend, []
    for i in range(n):
        cache = b.new_cache(group, NAMES)
        ids = [1000 + (7 * (i + j)) % 30000 for j in range(ctx + 3 * i % 20)]   # contexts of different lengths
        b.forward(group, torch.tensor(ids), cache, 1, NAMES)
        out.append(cache)
    return out


def one_forward(gen: Generator, drafts: list, chunks: list, t: int) -> float:
    """One packed forward: a one-token call per draft cache, a 4-token call per chunk cache;
    rolled back afterwards so every forward sees the same contexts."""
    b = gen.backend
    calls = [b.call("ref", torch.tensor([5 + t]), c, 1, NAMES) for c in drafts]
    calls += [b.call("prefs", torch.tensor([5 + t, 6, 7, 8]), c, 4, NAMES) for c in chunks]
    start = time.perf_counter()
    b.run(calls)
    took = time.perf_counter() - start
    for c in drafts:
        b.crop(c, 1)
    for c in chunks:
        b.crop(c, 4)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mix", nargs="+", default=["8,2", "16,4"], help="draft calls,chunk calls per forward")
    ap.add_argument("--contexts", type=int, nargs="+", default=[45, 200, 500])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    quiet()
    gen = Generator.from_pretrained(DEFAULT_MODEL, adapters=random_adapters(DEFAULT_MODEL, NAMES), backend="batched",
                                    device="cpu")
    rows = []
    for mix in a.mix:
        d, c = (int(x) for x in mix.split(","))
        for ctx in a.contexts:
            drafts, chunks = prefilled(gen, "ref", d, ctx), prefilled(gen, "prefs", c, ctx)
            times = {True: [], False: []}
            for t in range(a.steps + 2):
                for grouped in (True, False):              # alternating: both see the same machine state
                    batching.GROUPED_ON_CPU = grouped
                    took = one_forward(gen, drafts, chunks, t)
                    if t >= 2:
                        times[grouped].append(took)
            batching.GROUPED_ON_CPU = True
            for cache in drafts + chunks:
                gen.backend.free_cache(cache)
            g, s = (1000 * statistics.median(times[x]) for x in (True, False))
            rows.append((d, c, ctx, s, g))
            print(f"{d} drafts + {c} chunks, context {ctx}: SDPA {s:.1f} ms, grouped {g:.1f} ms ({s / g:.3f}x)",
                  flush=True)
    info = (f"SmolLM2-135M-Instruct, batched backend, 4 random rank-8 LoRA adapters, fp32, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {platform.machine()}; median of {a.steps} forwards each, alternating")
    table = ["| draft calls | chunk calls (4 rows x 4 tokens) | context | SDPA ms per forward | grouped ms per forward "
             "| speed-up |", "|---|---|---|---|---|---|"]
    table += [f"| {d} | {c} | {ctx} | {s:.1f} | {g:.1f} | {s / g:.3f}x |" for d, c, ctx, s, g in rows]
    print(info)
    print("\n".join(table))
    if a.out:
        with open(a.out, "w") as f:
            f.write("# Short calls' attention on CPU: grouped matmuls vs SDPA\n\n")
            f.write(f"Command: `python bench/attention_mix.py --out {a.out}`\n\n{info}.\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
