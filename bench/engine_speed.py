"""Tokens/s of every method on the embedded default model with N random LoRA adapters,
measured side by side (methods interleaved in each repeat), plus transformers' own
`generate()` of the reference as the single-model yardstick.

    python bench/engine_speed.py [--n 2 4 8] [--backends fast lora] [--tokens 64] [--repeats 3] [--out docs/speed.md]

A backend name with ":plain" (e.g. batched:plain) runs it with PyTorch's default linear
kernels instead of prepacked weights, ":onednn", ":avx2" or ":avx512" on that linear kernel (packing.py;
default: the one chosen for this CPU); `generate() [onednn]`, `[avx2]`, `[avx512]` is transformers' loop on a
reference whose linear layers were packed the same way.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from personamix import Generator
from personamix.backends.packing import ENV, KERNELS, pack_linears
from personamix.cli.common import quiet
from personamix.evaluation.bench import hf_generate
from personamix.loading import DEFAULT_MODEL, load_reference, random_adapters


def label(method: str, backend: str | None) -> str:
    return method if backend is None else f"{method} [{backend}]"


PROMPT = "Write a short paragraph about how you like to spend a free weekend."
METHODS = ["base", "token", "token-rs", "scr", "spec"]


def generator(spec: str, adapters: dict[str, str]) -> Generator:
    """A generator for "BACKEND[:plain|:onednn|:avx2|:avx512]" (see the module docstring)."""
    backend, _, kernel = spec.partition(":")
    before = os.environ.get(ENV)
    if kernel in KERNELS:
        os.environ[ENV] = kernel             # read when the backend packs its linear layers
    try:
        return Generator.from_pretrained(DEFAULT_MODEL, adapters=adapters, backend=backend, device="cpu",
                                         onednn=kernel != "plain")
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--backends", nargs="+", default=["fast", "lora"],
                    help="batched, fast (multi-LoRA), lora (PEFT adapter_names=), separate (merged copies); "
                         "NAME:plain without prepacked weights, NAME:onednn / :avx2 / :avx512 on that linear kernel")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--out", default=None, help="also write a Markdown table here")
    a = ap.parse_args()
    quiet()
    torch.manual_seed(0)
    rows = []
    yardsticks = {"generate()": load_reference(DEFAULT_MODEL, torch.device("cpu"))[0]}
    for kernel in KERNELS:
        packed, _ = load_reference(DEFAULT_MODEL, torch.device("cpu"))
        if pack_linears(packed, kernel):
            yardsticks[f"generate() [{kernel}]"] = packed
    for n in a.n:
        names = [chr(ord("A") + i) for i in range(n)]
        adapters = random_adapters(DEFAULT_MODEL, names)
        gens = {b: generator(b, adapters) for b in a.backends}
        ids = next(iter(gens.values())).encode(PROMPT)
        weights = {name: 1.0 / n for name in names}
        runs_of = [(y, None, None) for y in yardsticks] + [(m, b, g) for b, g in gens.items() for m in METHODS]
        results: dict[str, list] = {label(m, b): [] for m, b, _ in runs_of}
        for rep in range(a.repeats + 1):                      # repeat 0 is the warm-up
            for method, backend, gen in runs_of:
                if gen is None:
                    tps, extra = hf_generate(yardsticks[method], ids, a.tokens, rep), {}
                else:
                    kw = {} if method == "base" else {"weights": weights}
                    r = gen.generate(ids, method=method, max_new_tokens=a.tokens, seed=rep, ignore_eos=True,
                                     k=a.k, **kw)
                    tps, extra = r.stats.tokens_per_s, r.stats
                if rep:
                    results[label(method, backend)].append((tps, extra))
        base_med = statistics.median(t for t, _ in results[label("base", a.backends[0])])
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
            f"methods and backends interleaved; x base is against `base` on the {a.backends[0]} backend")
    print(info)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"# Engine speed\n\n{info}.\n\nCommand: `python bench/engine_speed.py {' '.join(sys.argv[1:])}`\n\n"
                    f"{table}\n")


if __name__ == "__main__":
    main()
