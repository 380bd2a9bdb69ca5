"""Where the time of one and of C scr generations over a local engine goes: the client's CPU
seconds (this process) and the engine's (every vLLM process on this machine, from ps).

    python bench/engine_cpu.py --url http://127.0.0.1:8000/v1 [--concurrency 8] [--tokens 32]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from personamix import Generator
from personamix.cli.common import quiet

PROMPT = "Write a short paragraph about how you like to spend a free weekend."


def client_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def engine_cpu() -> float:
    """CPU seconds of the processes whose command line names vLLM."""
    out = subprocess.run(["ps", "-eo", "cputimes,args"], capture_output=True, text=True).stdout
    return float(sum(int(line.split()[0]) for line in out.splitlines()[1:] if "vllm" in line.lower()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    quiet()
    gen = Generator.from_engine(a.url)
    names = gen.adapter_names[:2]
    ids = gen.encode(PROMPT)
    gen.generate(ids, method="scr", weights={x: 0.5 for x in names}, max_new_tokens=8, seed=0)   # warm-up
    print("| generations in flight | tokens | wall s | aggregate tok/s | client CPU s | engine CPU s |\n"
          "|---|---|---|---|---|---|")
    for c in (1, a.concurrency):
        c0, e0, t0 = client_cpu(), engine_cpu(), time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            n = sum(pool.map(lambda i: gen.generate(ids, method="scr", weights={x: 0.5 for x in names},
                                                    max_new_tokens=a.tokens, seed=i, ignore_eos=True).stats.new_tokens,
                             range(c)))
        wall = time.perf_counter() - t0
        print(f"| {c} | {n} | {wall:.1f} | {n / wall:.2f} | {client_cpu() - c0:.1f} | {engine_cpu() - e0:.0f} |")
    print(f"\n{os.cpu_count()} cores on this machine (client and engine share them)")


if __name__ == "__main__":
    main()
