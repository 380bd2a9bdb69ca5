"""The reference's next-token draws of B generations: one by one (each generation's sampler on its
own, as before engine/draws.py) against `draw_next` over all B rows at once (what the batched
backend now does after a forward). Counted: tensor operations (on a GPU each a kernel launch or
more, issued under the GIL) and read-backs to the host (each a wait for the stream), per forward
of B drafting generations; timed: milliseconds on this CPU (one thread, as a generation thread),
or on a GPU with `--device cuda` (each call synchronised).

    python bench/draws.py [--rows 1 4 16 64] [--top-p 0.9] [--temperature 0.7] [--repeats 20]
                          [--device cpu] [--out docs/bench/draws.md]

Logits: the default model's, at the last 64 positions of a chat prompt (real next-token
distributions, peaked and flat), row b at position b mod 64.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from personamix.engine.draws import CPU_ROWS_PER_PASS, Draw, draw_next
from personamix.engine.samplers.common import sample_token
from personamix.engine.targets import Target, log_probs_on_support
from personamix.loading import DEFAULT_MODEL, load_reference
from personamix.testing import SamplerWork

PROMPT = ("<|im_start|>user\nHow would you spend a free Saturday, and what would you do if the plan "
          "changed at the last minute?<|im_end|>\n<|im_start|>assistant\nI would start the day with a long "
          "walk, then call a friend and see where the afternoon takes us. If the plan changed at the last minute, "
          "I would take a breath, look at what is still possible, and make the most of it with")


def model_logits(device: torch.device) -> torch.Tensor:
    model, tok = load_reference(DEFAULT_MODEL, device)
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(device)
    with torch.inference_mode():
        return model(ids).logits[0, -64:].float()                                   # [64, V]


def one_by_one(logits: torch.Tensor, draws: list[Draw]) -> list[int]:
    out = []
    for b, d in enumerate(draws):
        lq, ids = log_probs_on_support(logits[b:b + 1], d.target)
        out.append(sample_token(lq[0], d.rng, d.greedy, ids))
    return out


def together(logits: torch.Tensor, draws: list[Draw]) -> list[int]:
    return [d.token for d in draw_next(logits, draws)]


def one_pass(logits: torch.Tensor, draws: list[Draw]) -> list[int]:
    """Every row in one pass, as on a GPU (on CPU: in passes of CPU_ROWS_PER_PASS)."""
    return [d.token for d in draw_next(logits, draws, rows_per_pass=len(draws))]


def requests(rows: int, target: Target, seed: int, device: torch.device) -> list[Draw]:
    return [Draw(target, torch.Generator(device=device).manual_seed(seed + b)) for b in range(rows)]


def measure(f, logits: torch.Tensor, target: Target, repeats: int) -> tuple[float, float, float, list[int]]:
    """(ops, read-backs, ms) for one call over all rows, and the tokens of the first call (every
    call ends in a read-back of its tokens, so the time is the device's too)."""
    rows, dev = logits.shape[0], logits.device
    f(logits, requests(rows, target, 1, dev))                  # warm-up (and what is cached once, e.g. _columns)
    with SamplerWork() as work:
        tokens = f(logits, requests(rows, target, 0, dev))
    start = time.perf_counter()
    for r in range(repeats):
        f(logits, requests(rows, target, r, dev))
    return work.ops, work.reads, (time.perf_counter() - start) / repeats * 1e3, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    base = model_logits(device)
    target = Target((), (), temperature=a.temperature, top_p=a.top_p)
    lines = [f"Default model's logits at the last {base.shape[0]} positions of a chat prompt; temperature "
             f"{a.temperature}, top-p {a.top_p}; device {device}"
             f"{' (one thread)' if device.type == 'cpu' else ''}, torch {torch.__version__}, {platform.machine()}, "
             f"{os.cpu_count()} cores. draw_next in one pass is what a GPU runs; on CPU it runs in passes of "
             f"{CPU_ROWS_PER_PASS} rows.", "",
             "| rows B | one by one: ops | read-backs | ms | draw_next, one pass: ops | read-backs | ms "
             f"| draw_next, its passes on {device.type}: ms | ops ratio (one pass) | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rows in a.rows:
        logits = base[torch.arange(rows) % base.shape[0]]
        o1, r1, t1, k1 = measure(one_by_one, logits, target, a.repeats)
        o2, r2, t2, k2 = measure(one_pass, logits, target, a.repeats)
        _, _, t3, k3 = measure(together, logits, target, a.repeats)
        lines.append(f"| {rows} | {o1} | {r1} | {t1:.2f} | {o2} | {r2} | {t2:.2f} | {t3:.2f} | {o1 / o2:.1f}x | "
                     f"{'yes' if k1 == k2 == k3 else 'NO'} |")
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            f.write("# The reference's draws: one by one vs all rows at once\n\n"
                    f"Command: `python bench/draws.py {' '.join(sys.argv[1:])}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
