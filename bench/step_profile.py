"""Where a decoding step's time goes: one new token at a 100-token context through
(a) the plain reference, 1 row; (b) the plain reference with N+1 identical rows (the floor
for any one-forward scoring of N+1 rows); (c) the fast multi-LoRA backend, N+1 rows;
(d) PEFT adapter_names=, N+1 rows. (a)-(c) both with PyTorch's default linear kernels and
with prepacked weights (the kernel packing.py picks for this CPU). Median of 2 x 20 steps each, interleaved.

    python bench/step_profile.py [--n 2 4 8] [--out docs/step_profile.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import DynamicCache

from personamix import Generator
from personamix.backends.packing import chosen_kernel, pack_linears
from personamix.cli.common import quiet
from personamix.engine.session import Session
from personamix.loading import DEFAULT_MODEL, load_reference, random_adapters

CTX = list(range(1000, 1100))


def plain_step(model, rows: int, steps: int) -> list[float]:
    cache, out = DynamicCache(), []
    with torch.inference_mode():
        model(input_ids=torch.tensor([CTX] * rows), cache=cache, use_cache=True, logits_to_keep=1)
        for _ in range(steps):
            t = time.perf_counter()
            model(input_ids=torch.tensor([[5]] * rows), cache=cache, use_cache=True, logits_to_keep=1)
            out.append(time.perf_counter() - t)
    return out


def session_step(gen: Generator, steps: int) -> list[float]:
    s, out = Session(gen.backend), []
    s.logits("all", CTX)
    for i in range(steps):
        t = time.perf_counter()
        s.logits("all", CTX + [5] * (i + 1))
        out.append(time.perf_counter() - t)
    return out


def profile_ops(gen: Generator, steps: int = 10) -> str:
    from torch.profiler import profile

    s = Session(gen.backend)
    s.logits("all", CTX)
    with profile() as prof:
        for i in range(steps):
            s.logits("all", CTX + [5] * (i + 1))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
    print(table)
    return table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators")
    a = ap.parse_args()
    quiet()
    plain, _ = load_reference(DEFAULT_MODEL, torch.device("cpu"))
    packed, _ = load_reference(DEFAULT_MODEL, torch.device("cpu"))
    kernel = chosen_kernel()                                # this CPU's (packing.py); the fast backend's too
    if not pack_linears(packed, kernel):
        raise SystemExit(f"{kernel}-packed linear layers are not usable on this machine")
    cols = [("p1", "plain, 1 row"), ("pn", "plain, N+1 rows"), ("fast", "fast multi-LoRA, N+1 rows"),
            ("q1", f"{kernel}: plain, 1 row"), ("qn", f"{kernel}: plain, N+1 rows"),
            ("qfast", f"{kernel}: fast, N+1 rows"), ("peft", "PEFT adapter_names, N+1 rows")]
    lines = ["| N | " + " | ".join(c for _, c in cols) + f" | {kernel} fast / {kernel} plain 1 row | "
             f"{kernel} fast / plain 1 row |", "|---|" + "---|" * (len(cols) + 2)]
    for n in a.n:
        adapters = random_adapters(DEFAULT_MODEL, [chr(ord("A") + i) for i in range(n)])
        fast = Generator.from_pretrained(DEFAULT_MODEL, adapters=adapters, backend="fast", device="cpu", onednn=False)
        qfast = Generator.from_pretrained(DEFAULT_MODEL, adapters=adapters, backend="fast", device="cpu")
        peft = Generator.from_pretrained(DEFAULT_MODEL, adapters=adapters, backend="lora", device="cpu")
        runs = {k: [] for k, _ in cols}
        for _ in range(2):                                  # interleave two rounds
            runs["p1"] += plain_step(plain, 1, a.steps)
            runs["pn"] += plain_step(plain, n + 1, a.steps)
            runs["fast"] += session_step(fast, a.steps)
            runs["q1"] += plain_step(packed, 1, a.steps)
            runs["qn"] += plain_step(packed, n + 1, a.steps)
            runs["qfast"] += session_step(qfast, a.steps)
            runs["peft"] += session_step(peft, a.steps)
        med = {k: statistics.median(v) * 1000 for k, v in runs.items()}
        lines.append(f"| {n} | " + " | ".join(f"{med[k]:.1f} ms" for k, _ in cols)
                     + f" | {med['qfast'] / med['q1']:.2f} | {med['qfast'] / med['p1']:.2f} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    prof_table = profile_ops(qfast) if a.profile else ""
    if a.out:
        with open(a.out, "w") as f:
            f.write("# One decoding step, by backend\n\nSmolLM2-135M-Instruct fp32, 2-core CPU, one new token at a "
                    f"100-token context, random rank-8 LoRA on q/k/v/o, median of {2 * a.steps} steps.\n\n"
                    f"Command: `python bench/step_profile.py {' '.join(sys.argv[1:])}`\n\n{table}\n")
            if prof_table:
                f.write(f"\n## torch.profiler: one fast-backend step (oneDNN) with N={a.n[-1]} ({a.n[-1] + 1} rows), "
                        f"top operators by self CPU time\n\n```\n{prof_table}\n```\n")


if __name__ == "__main__":
    main()
