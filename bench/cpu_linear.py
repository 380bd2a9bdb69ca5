"""The linear layers of one SmolLM2-135M forward by kernel and number of rows, on this CPU.

The 150 decoder linears of the model's shapes (30 layers of q/k/v fused 576->960, o 576->576,
gate and up 576->1536, down 1536->576) plus the output layer (576->49152), with random weights,
each layer its own weights, run in order: the weights stream from memory as in a real forward
(424 + 113 MB; no cache holds them). Kernels, interleaved in each round: PyTorch's default
(F.linear), oneDNN-prepacked (onednn.py) and the AVX2 kernel (avx2.py) where it runs. Median of
rounds, ms per pass; x onednn = oneDNN's time / the kernel's.

    python bench/cpu_linear.py [--rows 1 5 16 58 220] [--rounds 5] [--out docs/bench/cpu_linear.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from personamix.backends.packing import KERNELS

LAYER = [(576, 960), (576, 576), (576, 1536), (576, 1536), (1536, 576)]   # (in, out) per decoder layer
HEAD = (576, 49152)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    # a cloud VM's model name is often just "AMD EPYC": the family and model tell the generation apart
    family = " ".join(f"{k} {fields[k].strip()}" for k in ("CPU family", "Model") if k in fields)
    return f"{fields.get('Model name', '?').strip()} ({family}; {isa}, {os.cpu_count()} cores)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 5, 9, 16, 58, 220])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--out", default=None, help="also write a Markdown table here")
    a = ap.parse_args()
    torch.manual_seed(0)
    shapes = LAYER * a.layers + [HEAD]
    plain = [nn.Linear(i, o, bias=False) for i, o in shapes]
    kernels = {"F.linear": plain}
    for name, (cls, problem) in KERNELS.items():
        why = problem(plain[0])
        if why is None:
            kernels[name] = [cls(lin) for lin in plain]
        else:
            print(f"{name}: not run ({why})", file=sys.stderr)
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for m in a.rows:
            xs = {576: torch.randn(m, 576), 1536: torch.randn(m, 1536)}
            for r in range(a.rounds + 1):                          # round 0 warms up
                for name, layers in kernels.items():
                    start = time.perf_counter()
                    for layer in layers:
                        layer(xs[layer.in_features])
                    if r:
                        times.setdefault((name, m), []).append(time.perf_counter() - start)
    names = list(kernels)
    lines = ["| rows | " + " | ".join(f"{n} ms" for n in names) + " | "
             + " | ".join(f"x onednn: {n}" for n in names if n != "onednn") + " |",
             "|---|" + "---|" * (2 * len(names) - 1)]
    for m in a.rows:
        med = {n: statistics.median(times[(n, m)]) * 1e3 for n in names}
        ratios = [f"{med['onednn'] / med[n]:.2f}" if "onednn" in med else "-" for n in names if n != "onednn"]
        lines.append(f"| {m} | " + " | ".join(f"{med[n]:.1f}" for n in names) + " | " + " | ".join(ratios) + " |")
    info = (f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; "
            f"{len(shapes)} linear layers of SmolLM2-135M's shapes, median of {a.rounds} rounds, kernels interleaved")
    table = "\n".join(lines)
    print(info)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"# Linear layers by kernel (one forward's worth)\n\n{info}.\n\n"
                    f"Command: `python bench/cpu_linear.py {' '.join(sys.argv[1:])}`\n\n{table}\n")


if __name__ == "__main__":
    main()
