"""Does torch.compile pay off for a decoding step on this machine?

One new token at a 100-token context through the plain reference (1 row) and through N+1 rows
(the `token` method's step), eager vs `torch.compile` (inductor, default mode; fixed shapes via
transformers' StaticCache so the compiled graph is reused), median of 30 steps each after the
compile warm-up. Prints the compile time and the step times.

    python bench/compile_probe.py [--rows 1 5] [--out docs/compile_probe.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import StaticCache

from personamix.cli.common import quiet
from personamix.loading import DEFAULT_MODEL, load_reference

CTX = 100


def steps(forward, model, rows: int, n: int) -> tuple[float, list[float]]:
    """(seconds of the first two steps, the steps after) with a fresh static cache."""
    cache = StaticCache(config=model.config, max_cache_len=CTX + n + 8)
    ids = torch.arange(CTX).view(1, -1).expand(rows, -1) + 1000
    with torch.inference_mode():
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        times = []
        for i in range(n + 2):
            pos = torch.tensor([CTX + i])
            t = time.perf_counter()
            forward(input_ids=torch.full((rows, 1), 5), cache=cache, use_cache=True, logits_to_keep=1,
                    position_ids=pos.view(1, 1).expand(rows, 1))
            times.append(time.perf_counter() - t)
    return sum(times[:2]), times[2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    quiet()
    model, _ = load_reference(DEFAULT_MODEL, torch.device("cpu"), None)
    compiled = torch.compile(model.forward)
    lines = ["| rows | eager ms/step | compiled ms/step | compiled / eager | first two compiled steps (compile) |",
             "|---|---|---|---|---|"]
    for rows in a.rows:
        _, eager = steps(model.forward, model, rows, a.steps)
        warm, comp = steps(compiled, model, rows, a.steps)
        _, eager2 = steps(model.forward, model, rows, a.steps)          # eager again: drift check
        e, c = statistics.median(eager + eager2) * 1e3, statistics.median(comp) * 1e3
        lines.append(f"| {rows} | {e:.1f} | {c:.1f} | {c / e:.2f} | {warm:.0f} s |")
        print(lines[-1], flush=True)
    info = (f"SmolLM2-135M-Instruct fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} cores; one new token at a {CTX}-token context, StaticCache, median of "
            f"{a.steps} steps (eager: two runs, before and after the compiled one)")
    print(info)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"# torch.compile on this machine\n\n{info}.\n\nCommand: `python bench/compile_probe.py "
                    f"{' '.join(sys.argv[1:])}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
