"""The batched backend's attention for short calls on CPU, its three ways (batching.CPU_ATTENTION)
timed side by side on forwards of the mix a busy server packs (at 16 clients, recorded: ~8
one-token reference draft calls and ~2 SCR chunk calls of 4 adapter rows x 4 tokens per forward),
at several context lengths: the AVX2 kernel (cpu_attention.py, the default where it runs), two
batched matmuls with the query heads of each KV head stacked over padded queries and a mask
(`_Batch._grouped_attention`) and SDPA with a mask.

    python bench/attention_mix.py [--mix 8,2 16,4] [--contexts 45 200 500] [--steps 20]
                                  [--out docs/bench/attention_mix.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from cpu_linear import cpu_name  # this folder

from personamix import Generator
from personamix.backends import batching
from personamix.backends.cpu_attention import attention_problem
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
    default = batching.CPU_ATTENTION
    gen.backend.pool.fill = 0.0        # (idle: no tensors yet) zeroed: the grouped and sdpa paths read masked positions
    problem = attention_problem(torch.float32, torch.device("cpu"), 64)
    modes = (["kernel"] if problem is None else []) + ["grouped", "sdpa"]
    others = [m for m in modes if m != "grouped"]     # each as a speed-up over grouped (the default before the kernel)
    if problem:
        print(f"the attention kernel does not run here: {problem}")
    rows = []
    for mix in a.mix:
        d, c = (int(x) for x in mix.split(","))
        for ctx in a.contexts:
            drafts, chunks = prefilled(gen, "ref", d, ctx), prefilled(gen, "prefs", c, ctx)
            times = {m: [] for m in modes}
            for t in range(a.steps + 2):
                for m in modes:                               # alternating: all see the same machine state
                    batching.CPU_ATTENTION = m
                    took = one_forward(gen, drafts, chunks, t)
                    if t >= 2:
                        times[m].append(took)
            batching.CPU_ATTENTION = default
            for cache in drafts + chunks:
                gen.backend.free_cache(cache)
            ms = {m: 1000 * statistics.median(times[m]) for m in modes}
            rows.append((d, c, ctx, ms))
            print(f"{d} drafts + {c} chunks, context {ctx}: " + ", ".join(f"{m} {ms[m]:.1f} ms" for m in modes),
                  flush=True)
    info = (f"SmolLM2-135M-Instruct, batched backend, 4 random rank-8 LoRA adapters, fp32, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {cpu_name()}; median of {a.steps} forwards each, alternating")
    head = ["draft calls", "chunk calls (4 rows x 4 tokens)", "context"] + [f"{m} ms per forward" for m in modes]
    head += [f"{m}: x grouped" for m in others]
    table = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    table += [f"| {d} | {c} | {ctx} | " + " | ".join(f"{ms[m]:.1f}" for m in modes) + " | "
              + " | ".join(f"{ms['grouped'] / ms[m]:.3f}" for m in others) + " |" for d, c, ctx, ms in rows]
    print(info)
    print("\n".join(table))
    if a.out:
        with open(a.out, "w") as f:
            f.write("# Short calls' attention on CPU: the AVX2 kernel, grouped matmuls and SDPA\n\n")
            f.write(f"Command: `python bench/attention_mix.py --out {a.out}`\n\n{info}.\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
