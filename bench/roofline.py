"""How many times one client's tokens/s this CPU lets 16 clients reach: the load test's ratio
against its roofline.

One client's forwards carry a row or a few: their time is bounded below by streaming the
model's weights from memory once (the linear layers at one row). 16 clients' forwards carry ~60
row-tokens: their time is bounded below by the linear layers' arithmetic at that many rows. Both
bounds are measured here with the linear kernel the backend uses (packing.linear_kernel; the
model's shapes, each layer its own weights, as bench/cpu_linear.py) at a grid of row counts, and
summed over the level's forwards: each forward's decoder linear layers at its rows, and the output
layer at its rows that need the whole vocabulary (recorded during the run by a wrapper around the
backend's forward and a hook on the model's output layer; between grid points, linear interpolation). The LoRA deltas,
attention, norms, the draws and the Python around them are left out, so each bound is an upper
bound on tokens/s at that level.

The in-process mix (bench/inprocess_load.py: SCR, the load test's prompts, personas and settings,
no HTTP) gives each level's tokens per forward and rows per forward; then

    bound tok/s = tokens / (sum over the level's forwards of the linear layers' time at their rows)

and the ratio's roofline is the 16-client bound over the one-client bound: what `x 1 client` of
docs/loadtest.md would be if everything but the linear layers cost nothing at both levels.
Prints one table (and writes it with --out).

`--method` runs the mix with another sampler (the load test's is SCR): each spends its own
row-tokens per emitted token, so each has its own roofline.

    python bench/roofline.py [--clients 1 16] [--requests 2] [--method scr] [--rounds 5] [--out docs/bench/roofline.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import inprocess_load  # this folder
import torch
from cpu_linear import HEAD, LAYER, cpu_name  # this folder
from inprocess_load import PROMPTS, request, run_clients  # this folder
from torch import nn

from personamix import Generator
from personamix.backends.packing import KERNELS, linear_kernel
from personamix.cli.common import quiet

GRID = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128]   # row counts the linear layers are timed at


def level(gen: Generator, clients: int, per_client: int, first: int, seen: dict[str, list[int]]) -> dict:
    """`clients` concurrent generations of `per_client` requests each: tokens, seconds,
    forwards, and each forward's rows and output-layer rows over the whole vocabulary (`seen`)."""
    b = gen.backend
    f0, busy0 = b.forwards, b.busy_s
    seen["rows"].clear()
    seen["head"].clear()
    tokens, wall = run_clients(gen, clients, per_client, first)
    return {"clients": clients, "tokens": tokens, "wall": wall,
            "forwards": b.forwards - f0, "busy": b.busy_s - busy0, "rows": list(seen["rows"]),
            "head": list(seen["head"])}


def linear_ms(kernel: str, rows: list[int], rounds: int) -> dict[int, tuple[float, float]]:
    """(the decoder's linear layers, the output layer) ms at each row count, median of `rounds`."""
    torch.manual_seed(0)
    cls, _ = KERNELS[kernel]
    decoder = [cls(nn.Linear(i, o, bias=False)) for i, o in LAYER * 30]
    head = cls(nn.Linear(*HEAD, bias=False))
    out = {}
    with torch.inference_mode():
        for m in rows:
            xs = {576: torch.randn(m, 576), 1536: torch.randn(m, 1536)}
            dec, hd = [], []
            for r in range(rounds + 1):                                   # round 0 warms up
                start = time.perf_counter()
                for layer in decoder:
                    layer(xs[layer.in_features])
                mid = time.perf_counter()
                head(xs[576])
                if r:
                    dec.append(mid - start)
                    hd.append(time.perf_counter() - mid)
            out[m] = (1e3 * statistics.median(dec), 1e3 * statistics.median(hd))
    return out


def at(ms: dict[int, tuple[float, float]], part: int, rows: int) -> float:
    """The decoder's (part 0) or the output layer's (part 1) ms at `rows`, interpolated linearly
    between the grid's row counts around it (0 rows: 0 ms; outside the grid: in proportion to the
    nearest)."""
    if rows <= 0:
        return 0.0
    below, above = [g for g in ms if g <= rows], [g for g in ms if g >= rows]
    if not below or not above:
        g = max(below) if below else min(above)
        return ms[g][part] * rows / g
    lo, hi = max(below), min(above)
    return ms[lo][part] if lo == hi else ms[lo][part] + (ms[hi][part] - ms[lo][part]) * (rows - lo) / (hi - lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level (one client: at least 8)")
    ap.add_argument("--method", default="scr", choices=["scr", "token", "token-rs", "spec", "base"],
                    help="every client's sampling method (the load test's: scr)")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds of the linear layers per row count")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    inprocess_load.METHOD = a.method      # what its `request` sends
    quiet()
    gen = Generator.from_pretrained(adapters="mbti", backend="batched", device="cpu")   # a CPU's roofline
    kernel = linear_kernel(gen.backend.model)
    if kernel is None:
        raise SystemExit("the model's linear layers run on PyTorch's own kernels here (no prepacked CPU kernel): "
                         "this benchmark times the backend's kernel")
    gen.backend.cache_prefixes(256)
    seen: dict[str, list[int]] = {"rows": [], "head": []}      # per forward: row-tokens; whole-vocabulary rows
    b = gen.backend
    b.model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen["head"].append(args[0].shape[0]))

    def run(calls, run=b.run):           # the backend's forward, and what it computed
        rows, heads = b.row_tokens, len(seen["head"])
        run(calls)
        seen["rows"].append(b.row_tokens - rows)
        seen["head"] += [0] * (len(seen["head"]) == heads)    # no row over the whole vocabulary
    b.run = run
    warm = threading.Thread(target=lambda: [request(gen, i, i) for i in range(len(PROMPTS))])
    warm.start()
    warm.join()                                            # every prompt cached, as in the load test
    first, runs = len(PROMPTS), []
    for c in a.clients:
        per_client = max(a.requests, -(-8 // c))
        runs.append(level(gen, c, per_client, first, seen))
        first += c * per_client
    most = max(max(r["rows"], default=1) for r in runs)
    ms = linear_ms(kernel, [g for g in GRID if g < most] + [min([g for g in GRID if g >= most] or [most])], a.rounds)
    lines = ["| clients | tok/s | tokens per forward | row-tokens per forward (whole-vocabulary rows) "
             "| ms per forward | linear layers' ms per forward (bound) | bound tok/s | share of the bound |",
             "|---|---|---|---|---|---|---|---|"]
    bounds = []
    for r in runs:
        n = r["forwards"]
        if len(r["rows"]) != n or len(r["head"]) != n:
            raise SystemExit(f"{n} forwards, but the wrapper saw {len(r['rows'])} and the output layer's hook "
                             f"{len(r['head'])}: not one of each per forward")
        floor = (sum(at(ms, 0, x) for x in r["rows"]) + sum(at(ms, 1, x) for x in r["head"])) / n   # ms per forward
        per_forward, tok_s = r["tokens"] / n, r["tokens"] / r["wall"]
        bound = per_forward / floor * 1e3
        bounds.append((tok_s, bound))
        lines.append(f"| {r['clients']} | {tok_s:.1f} | {per_forward:.2f} | {sum(r['rows']) / n:.1f} "
                     f"({sum(r['head']) / n:.1f}) | {1e3 * r['busy'] / n:.1f} | {floor:.1f} | {bound:.1f} "
                     f"| {tok_s / bound:.0%} |")
    table = "\n".join(lines)
    flops = {m: 2 * m * sum(i * o for i, o in LAYER * 30) / 1e6 for m in ms}     # MFLOP of the decoder's layers
    grid = "\n".join(["| rows | decoder's linear layers ms | GFLOP/s | output layer ms |", "|---|---|---|---|"]
                     + [f"| {m} | {d:.1f} | {flops[m] / d:.0f} | {h:.1f} |" for m, (d, h) in sorted(ms.items())])
    summary = [f"x {runs[0]['clients']} client{'s' if runs[0]['clients'] > 1 else ''} at "
               f"{r['clients']} clients: measured {t / bounds[0][0]:.2f}, roofline {bd / bounds[0][1]:.2f}"
               for r, (t, bd) in zip(runs[1:], bounds[1:])]
    info = (f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; linear kernel "
            f"{kernel}; in-process {a.method} mix of bench/inprocess_load.py (batched backend, MBTI adapters, "
            f"prefix cache 256 MB); linear layers' medians of {a.rounds} rounds")
    print(info)
    print(table)
    print("\n".join(summary))
    print(grid)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"# The load test's ratio against its roofline\n\n{info}.\n\n"
                    f"Command: `python bench/roofline.py {' '.join(sys.argv[1:])}`\n\n{table}\n\n"
                    + "\n".join(summary) + f"\n\nThe linear layers at each row count ({kernel}):\n\n{grid}\n")


if __name__ == "__main__":
    main()
