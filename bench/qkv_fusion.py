"""q/k/v projections as one matmul (backends/qkv.py) against three, in the batched backend's
packed forwards: the default model with the shipped MBTI adapters, forwards of the mixes a busy
server packs (D one-token reference drafts + C SCR chunk calls of 4 adapter rows x 4 tokens, the
chunks' personas alternating ENTJ / ISFP so all 8 adapters take part), at a 60-token context.
The two backends are timed in alternation, either first in turn (median of each round's
median); the logits of one forward of each mix are compared.

    python bench/qkv_fusion.py [--mixes 1,0 16,0 16,4 16,8] [--rounds 6] [--steps 10] [--device cpu]
                               [--out docs/bench/qkv_fusion.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from personamix import Generator
from personamix.backends import qkv
from personamix.cli.common import quiet

CTX = 60
PERSONAS = (("E", "N", "T", "J"), ("I", "S", "F", "P"))


def build(fused: bool, device: str | None = None) -> Generator:
    real = qkv.fuse_qkv
    if not fused:
        qkv.fuse_qkv = lambda model, rows=None: 0      # the backend as it was: three projections
    try:
        return Generator.from_pretrained(adapters="mbti", backend="batched", device=device)
    finally:
        qkv.fuse_qkv = real


class Mix:
    """Caches for D drafts and C chunk calls, each holding a CTX-token context."""

    def __init__(self, gen: Generator, drafts: int, chunks: int):
        self.b = b = gen.backend
        self.drafts, self.chunks = [], []
        for i in range(drafts + chunks):
            group, names = ("ref", ()) if i < drafts else ("prefs", PERSONAS[i % 2])
            cache = b.new_cache(group, names)
            b.forward(group, torch.tensor([1000 + (7 * (i + j)) % 30000 for j in range(CTX)], device=b.device),
                      cache, 1, names)
            (self.drafts if i < drafts else self.chunks).append((cache, names))

    def forward(self, t: int) -> tuple[float, list[torch.Tensor]]:
        """One packed forward (rolled back afterwards): seconds, the calls' logits."""
        b = self.b
        calls = [b.call("ref", torch.tensor([5 + t], device=b.device), c, 1, ()) for c, _ in self.drafts]
        calls += [b.call("prefs", torch.tensor([5 + t, 6, 7, 8], device=b.device), c, 4, names)
                  for c, names in self.chunks]
        start = time.perf_counter()
        b.run(calls)
        if b.device.type == "cuda":
            torch.cuda.synchronize()                   # the kernels' time, not their launch
        took = time.perf_counter() - start
        for c, _ in self.drafts:
            b.crop(c, 1)
        for c, _ in self.chunks:
            b.crop(c, 4)
        return took, [c.logits for c in calls]

    def close(self) -> None:
        for c, _ in self.drafts + self.chunks:
            self.b.free_cache(c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mixes", nargs="+", default=["1,0", "16,0", "16,4", "16,8"], help="drafts,chunks per forward")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default=None, help="default: a GPU if there is one, else cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    quiet()
    gens = {"three": build(False, a.device), "one": build(True, a.device)}
    assert gens["one"].backend.lora.fused_layers > 0 and gens["three"].backend.lora.fused_layers == 0
    rows = []
    for mix in a.mixes:
        d, c = (int(x) for x in mix.split(","))
        mixes = {k: Mix(g, d, c) for k, g in gens.items()}
        logits = {k: m.forward(0)[1] for k, m in mixes.items()}
        diff = max((x - y).abs().max().item() for x, y in zip(logits["three"], logits["one"]))
        times = {k: [] for k in gens}
        for m in mixes.values():
            for t in range(3):
                m.forward(t)                                       # warm the shapes (and the caches)
        for r in range(a.rounds):
            for k in (("three", "one") if r % 2 == 0 else ("one", "three")):   # either goes first in turn
                times[k].append(statistics.median(mixes[k].forward(t)[0] for t in range(a.steps)))
        for m in mixes.values():
            m.close()
        three, one = (1000 * statistics.median(times[k]) for k in ("three", "one"))
        rows.append((d, c, d + 16 * c, three, one, diff))
        print(f"{d} drafts + {c} chunks: three {three:.1f} ms, one {one:.1f} ms ({three / one:.2f}x), "
              f"logits differ by {diff:.2g}", flush=True)
    b = gens["one"].backend
    lines = [f"Default model, shipped MBTI adapters (8, rank 8, on q/k/v/o), batched backend on {b.device} in "
             f"{str(b.dtype).removeprefix('torch.')}, {CTX}-token contexts, CUDA graphs "
             f"{'on' if b.graphs is not None else 'off'}, "
             f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; median of "
             f"{a.rounds} alternating rounds of {a.steps} forwards.", "",
             "| drafts | chunk calls | row-tokens | three projections, ms per forward | one, ms | speed-up "
             "| max logit difference |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {d} | {c} | {rt} | {t3:.1f} | {t1:.1f} | {t3 / t1:.2f}x | {diff:.2g} |"
              for d, c, rt, t3, t1, diff in rows]
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"# q/k/v as one matmul in packed forwards\n\nCommand: `python bench/qkv_fusion.py "
                    f"{' '.join(sys.argv[1:])}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
