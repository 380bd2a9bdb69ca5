"""How much other threads' work slows the batched backend's packed forward on CPU.

In `personamix serve` every request's sampler runs in its own thread, beside the forward that
one of them leads on all cores (backends/omp.py). This times the forward of the server's mix
(8 one-token draft calls + 2 SCR chunk calls of 4 adapter rows x 4 tokens, 45-token contexts),
led by a generation thread as in the server, alone and while K threads do what a sampler does
between its forwards (log-probs and the target's scores over 5 x 4 x 49k logits, then a wait),
with those threads at the default priority and at nice 19 (Linux).

    python bench/contention.py [--threads 0 2 4 8] [--duty-ms 10] [--out docs/bench/contention.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from attention_mix import NAMES, one_forward, prefilled  # the server's mix of calls (this folder)

from personamix import Generator
from personamix.backends import omp
from personamix.cli.common import quiet
from personamix.engine.targets import Target, log_probs, token_scores
from personamix.loading import DEFAULT_MODEL, random_adapters


def forwards(gen: Generator, drafts: list, chunks: list, steps: int) -> list[float]:
    """`steps` packed forwards led from a non-main thread (a team of all cores, as in the server)."""
    out = []

    def lead():
        omp.use_one_thread()
        for t in range(steps + 2):
            with omp.team(gen.backend.threads):
                took = one_forward(gen, drafts, chunks, t)
            if t >= 2:
                out.append(took)

    thread = threading.Thread(target=lead)
    thread.start()
    thread.join()
    return out


def sampler_like(stop: threading.Event, nice: int, wait_s: float) -> None:
    omp.use_one_thread()
    if nice:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    target = Target(names=tuple(NAMES), weights=(0.25,) * 4, aggregation="linear", temperature=0.7, top_p=0.9)
    logits = torch.randn(5, 4, 49152) * 3
    while not stop.is_set():
        token_scores(log_probs(logits, target), target)
        stop.wait(wait_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 2, 4, 8])
    ap.add_argument("--duty-ms", type=float, default=10.0, help="each busy thread's wait between two rounds of math")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    quiet()
    gen = Generator.from_pretrained(DEFAULT_MODEL, adapters=random_adapters(DEFAULT_MODEL, NAMES), backend="batched",
                                    device="cpu")
    drafts, chunks = prefilled(gen, "ref", 8, 45), prefilled(gen, "prefs", 2, 45)
    omp.release_team()          # the main thread filled the caches: hand its team back, as the server does
    rows = []
    for k in a.threads:
        row = [k]
        for nice in ([0] if k == 0 else [0, 19]):
            stop = threading.Event()
            busy = [threading.Thread(target=sampler_like, args=(stop, nice, a.duty_ms / 1000), daemon=True)
                    for _ in range(k)]
            for t in busy:
                t.start()
            ms = 1000 * statistics.median(forwards(gen, drafts, chunks, a.steps))
            stop.set()
            for t in busy:
                t.join()
            row.append(ms)
            print(f"{k} busy threads at nice {nice}: forward {ms:.1f} ms", flush=True)
        rows.append(row)
    base = rows[0][1]
    table = ["| busy sampler-like threads | forward ms (default priority) | x alone | forward ms (threads at nice 19) "
             "| x alone |", "|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r[0]} | {r[1]:.1f} | {r[1] / base:.2f} | " +
                     (f"{r[2]:.1f} | {r[2] / base:.2f} |" if len(r) > 2 else "- | - |"))
    info = (f"8 draft + 2 chunk calls per forward, 45-token contexts, {gen.backend.threads} cores, torch "
            f"{torch.__version__}; busy threads: log-probs + target scores of [5, 4, 49152], then {a.duty_ms:g} ms "
            f"waiting; median of {a.steps} forwards")
    print(info)
    print("\n".join(table))
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"# A packed forward beside sampler threads\n\nCommand: `python bench/contention.py --out {a.out}`"
                    f"\n\n{info}.\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
