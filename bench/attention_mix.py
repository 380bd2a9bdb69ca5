"""The batched backend's attention for short calls on CPU, its three ways (batching.CPU_ATTENTION)
timed side by side on forwards of the mix a busy server packs (at 16 clients, recorded: ~8
one-token reference draft calls and ~2 SCR chunk calls of 4 adapter rows x 4 tokens per forward),
at several context lengths: the AVX2 kernel (cpu_attention.py, the default where it runs), two
batched matmuls with the query heads of each KV head stacked over padded queries and a mask
(`_Batch._grouped_attention`) and SDPA with a mask. `--compare lora` times the same forwards
with their LoRA deltas on the CPU kernel (cpu_lora.py, the default where it runs) and on
PyTorch's matmuls instead, `--compare pointwise` with the decoder's norms, rotary embeddings and
SiLU in the CPU kernels (cpu_pointwise.py, the default where they run) and in PyTorch's ops
(decoder.TorchOps). Eight random adapters, the four of a chunk call's rows one pole of
each MBTI axis (as the server's personas), so a forward's chunks use all eight.

    python bench/attention_mix.py [--mix 8,2 16,4] [--contexts 45 200 500] [--steps 20]
                                  [--compare attention|lora|pointwise] [--out docs/bench/attention_mix.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from cpu_linear import cpu_name  # this folder

from personamix import Generator
from personamix.backends import batching
from personamix.backends.cpu_attention import attention_problem
from personamix.backends.cpu_pointwise import KernelOps, pointwise_problem
from personamix.backends.decoder import TorchOps
from personamix.cli.common import quiet
from personamix.loading import DEFAULT_MODEL, random_adapters

AXES = ["EI", "NS", "TF", "JP"]
NAMES = [pole for axis in AXES for pole in axis]


def persona(i: int) -> list[str]:
    """The adapters of the i-th call's rows: one pole of each axis (i's bits)."""
    return [axis[(i >> bit) & 1] for bit, axis in enumerate(AXES)]


def prefilled(gen: Generator, group: str, n: int, ctx: int) -> list:
    b, out = gen.backend, []
    for i in range(n):
        cache = b.new_cache(group, persona(i))
        ids = [1000 + (7 * (i + j)) % 30000 for j in range(ctx + 3 * i % 20)]   # contexts of different lengths
        b.forward(group, torch.tensor(ids), cache, 1, persona(i))
        out.append(cache)
    return out


def one_forward(gen: Generator, drafts: list, chunks: list, t: int) -> float:
    """One packed forward: a one-token call per draft cache, a 4-token call per chunk cache;
    rolled back afterwards so every forward sees the same contexts."""
    b = gen.backend
    calls = [b.call("ref", torch.tensor([5 + t]), c, 1, persona(i)) for i, c in enumerate(drafts)]
    calls += [b.call("prefs", torch.tensor([5 + t, 6, 7, 8]), c, 4, persona(i)) for i, c in enumerate(chunks)]
    start = time.perf_counter()
    b.run(calls)
    took = time.perf_counter() - start
    for c in drafts:
        b.crop(c, 1)
    for c in chunks:
        b.crop(c, 4)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mix", nargs="+", default=["8,2", "16,4"], help="draft calls,chunk calls per forward")
    ap.add_argument("--contexts", type=int, nargs="+", default=[45, 200, 500])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compare", choices=["attention", "lora", "pointwise"], default="attention",
                    help="the short calls' attention paths, the LoRA deltas' or the pointwise steps' (kernel, torch)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    quiet()
    gen = Generator.from_pretrained(DEFAULT_MODEL, adapters=random_adapters(DEFAULT_MODEL, NAMES), backend="batched",
                                    device="cpu")
    default = batching.CPU_ATTENTION
    gen.backend.pool.fill = 0.0        # (idle: no tensors yet) zeroed: the grouped and sdpa paths read masked positions
    rows_state, decoder = gen.backend.lora.rows, gen.backend.decoder
    own_lora, own_ops = rows_state.kernel, decoder and decoder.ops
    if a.compare == "pointwise":
        problem = ("no plain decoder (the model's own forward)" if decoder is None else None if own_ops is KernelOps
                   else pointwise_problem(decoder) or "the backend does not use it")
        modes, base_mode = (["kernel"] if problem is None else []) + ["torch"], "torch"

        def use(mode: str) -> None:
            decoder.ops = KernelOps if mode == "kernel" else TorchOps
    elif a.compare == "lora":
        problem = None if rows_state.kernel else "the backend was built without it"
        modes, base_mode = (["kernel"] if problem is None else []) + ["torch"], "torch"

        def use(mode: str) -> None:
            rows_state.kernel = mode == "kernel"
    else:
        problem = attention_problem(torch.float32, torch.device("cpu"), 64)
        modes, base_mode = (["kernel"] if problem is None else []) + ["grouped", "sdpa"], "grouped"

        def use(mode: str) -> None:
            batching.CPU_ATTENTION = mode
    others = [m for m in modes if m != base_mode]     # each as a speed-up over the PyTorch path before the kernel
    if problem:
        print(f"the {a.compare} kernel does not run here: {problem}")
    rows = []
    for mix in a.mix:
        d, c = (int(x) for x in mix.split(","))
        for ctx in a.contexts:
            drafts, chunks = prefilled(gen, "ref", d, ctx), prefilled(gen, "prefs", c, ctx)
            times = {m: [] for m in modes}
            for t in range(a.steps + 2):
                for m in modes if t % 2 else modes[::-1]:    # alternating, first one then the other: all see
                    use(m)                                    # the same machine state
                    took = one_forward(gen, drafts, chunks, t)
                    if t >= 2:
                        times[m].append(took)
            batching.CPU_ATTENTION, rows_state.kernel = default, own_lora
            if decoder is not None:
                decoder.ops = own_ops
            for cache in drafts + chunks:
                gen.backend.free_cache(cache)
            ms = {m: 1000 * statistics.median(times[m]) for m in modes}
            rows.append((d, c, ctx, ms))
            print(f"{d} drafts + {c} chunks, context {ctx}: " + ", ".join(f"{m} {ms[m]:.1f} ms" for m in modes),
                  flush=True)
    info = (f"SmolLM2-135M-Instruct, batched backend, 8 random rank-8 LoRA adapters (4 per chunk call), fp32, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}; {a.compare} paths, "
            f"median of {a.steps} forwards each, alternating")
    head = ["draft calls", "chunk calls (4 rows x 4 tokens)", "context"] + [f"{m} ms per forward" for m in modes]
    head += [f"{m}: x {base_mode}" for m in others]
    table = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    table += [f"| {d} | {c} | {ctx} | " + " | ".join(f"{ms[m]:.1f}" for m in modes) + " | "
              + " | ".join(f"{ms[base_mode] / ms[m]:.3f}" for m in others) + " |" for d, c, ctx, ms in rows]
    print(info)
    print("\n".join(table))
    if a.out:
        with open(a.out, "w") as f:
            title = {"attention": "Short calls' attention on CPU: the AVX2 kernel, grouped matmuls and SDPA",
                     "lora": "LoRA deltas of a packed forward on CPU: the AVX2 kernel and PyTorch's matmuls",
                     "pointwise": "A packed forward's norms, rotary embeddings and SiLU on CPU: the AVX2 kernels "
                                  "and PyTorch's ops"}[a.compare]
            f.write(f"# {title}\n\n")
            command = f"python bench/attention_mix.py {' '.join(sys.argv[1:])}"
            f.write(f"Command: `{command}`\n\n{info}.\n\n"
                    + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
