"""What a second OpenMP team costs: microseconds per op of a decoding step's kinds of work, run
in a thread alone, beside another thread that holds an idle team (libgomp then throttles every
team's spin-wait), and beside one that handed its team back (backends/omp.py). Linux + libgomp.

    python bench/omp_teams.py
"""
from __future__ import annotations

import os
import platform
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn

from personamix.backends import omp
from personamix.backends.onednn import PackedLinear


def ops() -> dict:
    torch.manual_seed(0)
    linear = PackedLinear(nn.Linear(576, 1536))
    x, logits = torch.randn(1, 576), torch.randn(21, 49152)
    q, kv = torch.randn(5, 9, 4, 64), torch.randn(5, 3, 80, 64)
    return {"one-row linear 576->1536 (oneDNN)": lambda: linear(x),
            "log_softmax [21, 49152]": lambda: torch.log_softmax(logits, -1),
            "SDPA, 5 rows x 4 queries, 80 keys": lambda: F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)}


def per_op_us(f, n: int = 2000) -> float:
    f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return 1e6 * (time.perf_counter() - start) / n


def in_thread(fn, beside: str) -> float:
    """fn's time in a fresh thread; `beside`: none, an idle team in another thread, or one handed back."""
    done, ready, out = threading.Event(), threading.Event(), {}

    def other():
        torch.randn(256, 8192).exp()      # a parallel region: this thread now holds a team
        if beside == "released":
            omp.use_one_thread()          # ... and hands it back
        ready.set()
        done.wait()

    helper = threading.Thread(target=other) if beside != "none" else None
    if helper:
        helper.start()
        ready.wait()
    else:
        ready.set()
    worker = threading.Thread(target=lambda: out.setdefault("us", per_op_us(fn)))
    worker.start()
    worker.join()
    done.set()
    if helper:
        helper.join()
    return out["us"]


def main() -> None:
    torch.set_grad_enabled(False)
    if omp._libgomp() is None:
        raise SystemExit("PyTorch here does not run on libgomp: nothing to measure")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| op | alone | beside an idle team | beside a team handed back |\n|---|---|---|---|")
    work = ops()
    omp.release_team()                    # the main thread's (set-up above): not a factor below
    for name, fn in work.items():
        alone, idle, released = (in_thread(fn, b) for b in ("none", "idle", "released"))
        print(f"| {name} | {alone:.0f} us | {idle:.0f} us ({idle / alone:.2f}x) | {released:.0f} us |")


if __name__ == "__main__":
    main()
