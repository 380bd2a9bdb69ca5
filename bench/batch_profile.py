"""Where a packed forward of the batched backend spends its time as the number of calls in it
grows: C generations, each at a 100-token context with its N+1 rows ("all"), take one decoding
step together in ONE forward (backend.run, what the server's concurrent requests do), timed
for C in 1, 4, 16 (and 64), plus torch.profiler's top operators at the largest C, and the
sampler-side work of one step (the target's math over the vocabulary) for comparison.

    python bench/batch_profile.py [--n 4] [--calls 1 4 16 64] [--steps 10] [--device cpu] [--graphs]
                                  [--out docs/batch_profile.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from personamix import Generator
from personamix.backends.batching import SHORT
from personamix.backends.cuda_graphs import StaticSteps
from personamix.cli.common import quiet
from personamix.engine.targets import Target, log_probs, token_target
from personamix.loading import DEFAULT_MODEL, random_adapters

CTX = 100


def prefilled(gen: Generator, c: int, names: tuple[str, ...] | None = None) -> list:
    """c caches of the "all" group (the reference + `names`, default every adapter), each holding a
    different CTX-token context."""
    b, caches = gen.backend, []
    names = names or b.names
    for i in range(c):
        cache = b.new_cache("all", names)
        b.forward("all", torch.tensor([1000 + (7 * (i + j)) % 30000 for j in range(CTX)], device=b.device),
                  cache, 1, names)
        caches.append(cache)
    return caches


def step_calls(gen: Generator, caches: list, token: int, names: tuple[str, ...] | None = None) -> list:
    """One decoding-step call per cache (its next token), ready for backend.run (one forward)."""
    b = gen.backend
    return [b.call("all", torch.tensor([token], device=b.device), cache, 1, names or b.names) for cache in caches]


def time_forwards(gen: Generator, c: int, steps: int, names: tuple[str, ...]) -> list[float]:
    sessions = prefilled(gen, c, names)
    out = []
    for t in range(steps + 1):
        calls = step_calls(gen, sessions, 5 + t, names)
        start = time.perf_counter()
        gen.backend.run(calls)
        if gen.device_sync:
            gen.device_sync()
        if t:                                          # the first step warms the shapes up (or captures)
            out.append(time.perf_counter() - start)
    for cache in sessions:
        gen.backend.free_cache(cache)
    return out


def graphs_vs_eager(gen: Generator, c: int, names: tuple[str, ...]) -> float:
    """Max |logit difference| of one decoding step of c calls replayed from a CUDA graph (or, off
    CUDA, the same padded step run eagerly) against the packed forward without graphs."""
    b, graphs = gen.backend, gen.backend.graphs
    sessions = prefilled(gen, c, names)
    got = []
    for use in (graphs, None):
        b.graphs = use
        calls = step_calls(gen, sessions, 5, names)
        b.run(calls)
        got.append(torch.cat([x.logits.float() for x in calls]))
        for cache in sessions:
            b.crop(cache, 1)
    b.graphs = graphs
    for cache in sessions:
        b.free_cache(cache)
    return (got[0] - got[1]).abs().max().item()


def target_math(gen: Generator, n: int, steps: int) -> float:
    """Seconds of one token step's target math (log-softmax of N+1 rows, the linear target)."""
    logits = torch.randn(n + 1, 1, gen.backend.vocab_size, device=gen.backend.device)
    target = Target(tuple(gen.adapter_names[:n]), tuple(1.0 / n for _ in range(n)))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        token_target(log_probs(logits[:, -1], target), target)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--used", type=int, default=None,
                    help="adapters each call uses, the first K of the N (default all; a persona uses 4 of 8 poles)")
    ap.add_argument("--calls", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the backend's)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--graphs", action="store_true",
                    help="also time each step replayed from CUDA graphs (cuda_graphs.py) against eager")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    quiet()
    names = [chr(ord("A") + i) for i in range(a.n)]
    used = tuple(names[: a.used or a.n])
    r = len(used) + 1                                  # rows per call
    dtype = getattr(torch, a.dtype) if a.dtype else None
    gen = Generator.from_pretrained(DEFAULT_MODEL, adapters=random_adapters(DEFAULT_MODEL, names), backend="batched",
                                    device=a.device, dtype=dtype)
    gen.device_sync = torch.cuda.synchronize if gen.backend.device.type == "cuda" else None
    rows, graphed = [], []
    graphs = gen.backend.graphs
    if a.graphs and graphs is None:   # off CUDA: the same padded steps, run eagerly (no capture)
        b = gen.backend
        b.pool.fill = 0.0    # (idle) padded steps read positions no row wrote (KVPool.fill)
        graphs = b.graphs = StaticSteps(b.model, b.pool, b.lora.rows, len(b.names), False, SHORT)
    for c in a.calls:
        gen.backend.graphs = None                          # eager first: the table's main columns
        t = statistics.median(time_forwards(gen, c, a.steps, used))
        rows.append((c, t))
        print(f"{c} calls ({c * r} rows): {1000 * t:.1f} ms per forward, {1000 * t / c:.2f} ms per call",
              flush=True)
        gen.backend.graphs = graphs
        if a.graphs:
            diff = graphs_vs_eager(gen, c, used)
            tg = statistics.median(time_forwards(gen, c, a.steps, used))
            graphed.append((c, t, tg, diff))
            print(f"  CUDA graphs: {1000 * tg:.1f} ms per forward ({t / tg:.2f}x), logits differ by {diff:.3g} "
                  f"from eager; {graphs.captures} captures so far", flush=True)
    math_s = target_math(gen, len(used), 20)
    lines = ["| calls in the forward | rows | ms per forward | ms per call | calls / s | x one call's rate |",
             "|---|---|---|---|---|---|"]
    base = rows[0][1] / rows[0][0]
    for c, t in rows:
        lines.append(f"| {c} | {c * r} | {1000 * t:.1f} | {1000 * t / c:.2f} | {c / t:.1f} | "
                     f"{base * c / t:.2f} |")
    if graphed:
        how = ("The same steps replayed from CUDA graphs" if gen.backend.device.type == "cuda"
               else "The same steps padded as for CUDA graphs, run eagerly (no CUDA here)")
        lines += ["", how + " (backends/cuda_graphs.py; the first step of each "
                  "row, which captures, not timed):", "",
                  "| calls in the forward | eager ms | CUDA graphs ms | speed-up | max abs logit diff vs eager |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c} | {1000 * t:.1f} | {1000 * tg:.1f} | {t / tg:.2f}x | {diff:.3g} |"
                  for c, t, tg, diff in graphed]
    text = ("\n".join(lines) + f"\n\nThe target math of one token step (log-softmax of {r} rows over the "
            f"vocabulary, the linear target): {1000 * math_s:.2f} ms, done by each generation's thread outside the "
            "forward.\n")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        cuda = gen.backend.device.type == "cuda"
        sessions = prefilled(gen, a.calls[-1], used)
        gen.backend.run(step_calls(gen, sessions, 3, used))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for t in range(3):
                gen.backend.run(step_calls(gen, sessions, 4 + t, used))
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
        events = prof.key_averages()
        ops = sum(e.count for e in events if e.device_type.name == "CPU") / 3
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA") / 3
        text += f"\nOperator calls per forward (nested ones included): {ops:.0f}" + (
            f"; GPU kernels per forward: {kernels:.0f}.\n" if cuda else ".\n")
        text += (f"\ntorch.profiler, 3 forwards of {a.calls[-1]} calls "
                 f"({'static steps' if gen.backend.graphs is not None else 'eager'}; {1000 * wall:.1f} ms of wall "
                 "time under the profiler), top operators by self CPU time:\n\n```\n"
                 + events.table(sort_by="self_cpu_time_total", row_limit=14) + "\n```\n")
        if cuda:   # how busy the GPU was: kernels' time over the wall time (low = the host's launches are the limit)
            busy = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e6
            text += (f"\nGPU kernels ran {1000 * busy:.1f} ms of those {1000 * wall:.1f} ms ({busy / wall:.0%} busy). "
                     "Top operators by GPU time:\n\n```\n"
                     + events.table(sort_by="self_device_time_total", row_limit=14) + "\n```\n")
    info = (f"SmolLM2-135M-Instruct, batched backend, N={a.n} random rank-8 LoRA adapters (each call uses "
            f"{len(used)}), {CTX}-token contexts, "
            f"one new token per call, device {gen.backend.device}, dtype {next(gen.backend.model.parameters()).dtype}, "
            f"torch {torch.__version__}, {os.cpu_count()} cores {platform.machine()}; median of {a.steps} forwards")
    print(info)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"# A packed forward of the batched backend, by calls in it\n\n{info}.\n\n"
                    f"Command: `python bench/batch_profile.py {' '.join(sys.argv[1:])}`\n\n{text}")


if __name__ == "__main__":
    main()
