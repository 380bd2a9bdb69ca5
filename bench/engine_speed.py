"""Tokens/s of every method on the embedded default model with N random LoRA adapters,
measured side by side (methods interleaved in each repeat), plus transformers' own
`generate()` of the reference as the single-model yardstick.

    python bench/engine_speed.py [--n 2 4] [--tokens 64] [--repeats 3] [--out docs/speed.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from personamix import Generator
from personamix.cli import _quiet, random_adapters
from personamix.models import DEFAULT_MODEL

PROMPT = "Write a short paragraph about how you like to spend a free weekend."
METHODS = ["base", "token", "token-rs", "scr", "spec"]


def hf_generate(gen: Generator, ids: list[int], tokens: int, seed: int) -> float:
    model = gen.backend.model
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    torch.manual_seed(seed)
    x = torch.tensor([ids])
    start = time.perf_counter()
    if hasattr(gen.backend.model, "disable_adapter"):
        with gen.backend.model.disable_adapter():
            out = model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, top_k=0)
    else:
        out = model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, top_k=0)
    elapsed = time.perf_counter() - start
    return (out.shape[1] - x.shape[1]) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--out", default=None, help="also write a Markdown table here")
    a = ap.parse_args()
    _quiet()
    torch.manual_seed(0)
    rows = []
    for n in a.n:
        names = [chr(ord("A") + i) for i in range(n)]
        gen = Generator.from_pretrained(DEFAULT_MODEL, adapters=random_adapters(DEFAULT_MODEL, names), device="cpu")
        ids = gen.encode(PROMPT)
        weights = {name: 1.0 / n for name in names}
        results: dict[str, list] = {m: [] for m in ["generate()"] + METHODS}
        for rep in range(a.repeats + 1):                      # repeat 0 is the warm-up
            for method in ["generate()"] + METHODS:
                if method == "generate()":
                    tps, extra = hf_generate(gen, ids, a.tokens, rep), {}
                else:
                    kw = {} if method == "base" else {"weights": weights}
                    r = gen.generate(ids, method=method, max_new_tokens=a.tokens, seed=rep, ignore_eos=True,
                                     k=a.k, **kw)
                    tps, extra = r.stats.tokens_per_s, r.stats
                if rep:
                    results[method].append((tps, extra))
        base_med = statistics.median(t for t, _ in results["base"])
        hf_med = statistics.median(t for t, _ in results["generate()"])
        for method, runs in results.items():
            tps = [t for t, _ in runs]
            st = [s for _, s in runs if s]
            acc = [s.acceptance_rate for s in st if s.acceptance_rate is not None]
            fpt = [s.forward_passes_per_token for s in st]
            med = statistics.median(tps)
            rows.append(dict(N=n, method=method, tps=med, lo=min(tps), hi=max(tps), vs_base=med / base_med,
                             vs_hf=med / hf_med, acc=statistics.median(acc) if acc else None,
                             fpt=statistics.median(fpt) if fpt else None))
    header = ("| N | method | tok/s median | min-max | x base | x generate() | acceptance | forwards/token |\n"
              "|---|---|---|---|---|---|---|---|")
    lines = [header]
    for r in rows:
        acc = f"{r['acc']:.1%}" if r["acc"] is not None else "-"
        fpt = f"{r['fpt']:.2f}" if r["fpt"] is not None else "-"
        lines.append(f"| {r['N']} | {r['method']} | {r['tps']:.1f} | {r['lo']:.1f}-{r['hi']:.1f} | "
                     f"{r['vs_base']:.2f} | {r['vs_hf']:.2f} | {acc} | {fpt} |")
    table = "\n".join(lines)
    info = (f"SmolLM2-135M-Instruct fp32, CPU ({os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {platform.machine()}), {a.tokens} new tokens, k={a.k}, "
            f"random rank-8 LoRA adapters on q/k/v/o, median of {a.repeats} repeats after a warm-up, "
            f"methods interleaved")
    print(info)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"# Engine speed\n\n{info}.\n\nCommand: `python bench/engine_speed.py --out {a.out}`\n\n"
                    f"{table}\n")


if __name__ == "__main__":
    main()
