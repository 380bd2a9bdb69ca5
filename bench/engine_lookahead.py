"""SCR over an inference engine with 1, 2 and 3 chunks drafted and scored per round
(personamix.engine.samplers.scr.ENGINE_LOOKAHEAD), interleaved, against a running engine.

    python bench/engine_lookahead.py --url http://127.0.0.1:8000/v1 [--n 2] [--tokens 32] [--repeats 8]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from personamix import Generator
from personamix.cli.common import quiet
from personamix.engine.samplers import scr

PROMPT = "Write a short paragraph about how you like to spend a free weekend."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--lookahead", type=int, nargs="+", default=[1, 2, 3])
    a = ap.parse_args()
    quiet()
    gen = Generator.from_engine(a.url)
    names = gen.adapter_names[: a.n]
    weights = {x: 1.0 / a.n for x in names}
    ids = gen.encode(PROMPT)
    gen.generate(ids, method="scr", weights=weights, max_new_tokens=8, seed=0)      # warm-up
    runs: dict[int, list] = {m: [] for m in a.lookahead}
    for rep in range(a.repeats):
        for m in a.lookahead:
            scr.ENGINE_LOOKAHEAD = m
            s = gen.generate(ids, method="scr", weights=weights, max_new_tokens=a.tokens, seed=rep,
                             ignore_eos=True).stats
            runs[m].append((s.tokens_per_s, s.round_trips / s.new_tokens, s.acceptance_rate))
    print(f"scr over {a.url}, N={a.n} ({', '.join(names)}), {a.tokens} tokens, {a.repeats} seeds, "
          f"client {os.cpu_count()} cores {platform.machine()}")
    print("| chunks per round | tok/s (median) | round trips/token | acceptance |\n|---|---|---|---|")
    for m, rs in runs.items():
        print(f"| {m} | {statistics.median(r[0] for r in rs):.2f} | {statistics.median(r[1] for r in rs):.2f} | "
              f"{statistics.median(r[2] for r in rs):.1%} |")


if __name__ == "__main__":
    main()
