"""The next-token draws of B generations: one by one (each generation's sampler on its own, as
before engine/draws.py) against `draw_next` over all B at once (what the batched backend does
after a forward). Three kinds: the reference's (SCR's and spec's drafts, `base`), the `token`
method's step, p* (eq. 5) of the reference and N preference models (`mixed` draws), and
token-rs's first block of proposals (`propose`). Counted:
tensor operations (on a GPU each a kernel launch or more, issued under the GIL) and read-backs to
the host (each a wait for the stream), per forward of B generations; timed: milliseconds on this
CPU (one thread, as a generation thread), or on a GPU with `--device cuda` (each call synchronised).

    python bench/draws.py [--rows 1 4 16 64] [--top-p 0.9] [--temperature 0.7] [--repeats 20]
                          [--kinds reference token token-rs] [--device cpu] [--out docs/bench/draws.md]

Logits: the default model's with the shipped MBTI adapters E, N, T, J (equal weights, linear), at
the last 64 positions of a chat prompt (real next-token distributions, peaked and flat), draw b
at position b mod 64.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from personamix import Generator
from personamix.engine.draws import CPU_ROWS_PER_PASS, RS_BLOCK, Draw, draw_next
from personamix.engine.samplers.common import rejection_sample_token, sample_token
from personamix.engine.session import Session
from personamix.engine.stats import Stats
from personamix.engine.targets import Target, log_probs_on_support, token_target
from personamix.testing import SamplerWork

NAMES = ("E", "N", "T", "J")

PROMPT = ("<|im_start|>user\nHow would you spend a free Saturday, and what would you do if the plan "
          "changed at the last minute?<|im_end|>\n<|im_start|>assistant\nI would start the day with a long "
          "walk, then call a friend and see where the afternoon takes us. If the plan changed at the last minute, "
          "I would take a breath, look at what is still possible, and make the most of it with")


def model_logits(device: torch.device) -> torch.Tensor:
    """[64, 1 + N, V]: the reference's and the preference models' logits at 64 positions."""
    gen = Generator.from_pretrained(adapters="mbti", backend="fast", device=device)
    ids = gen.tokenizer(PROMPT).input_ids
    with torch.inference_mode(), Session(gen.backend, NAMES) as session:
        return session.logits("all", ids, 64).float().transpose(0, 1).contiguous()


def one_by_one(logits: torch.Tensor, draws: list[Draw]) -> list[int]:
    """Each generation's former step: the samplers' one-draw path (drafts: log_probs_on_support,
    sample_token; `token`: the same over N+1 rows, then token_target; token-rs: its first block,
    rejection_sample_token with max_retries = the block)."""
    out = []
    for b, d in enumerate(draws):
        lq, ids = log_probs_on_support(logits[b], d.target)                            # [R, U]
        if d.propose:
            t, _, ok = rejection_sample_token(lq, d.target, d.rng, d.propose, Stats("token-rs"), ids)
            out.append(t if ok else -1)                  # -1: none of the block accepted, as draw_next says
            continue
        if d.mixed:
            lq = token_target(lq, d.target)[0][None]
        out.append(sample_token(lq[0], d.rng, d.greedy, ids))
    return out


def together(logits: torch.Tensor, draws: list[Draw]) -> list[int]:
    return [d.token for d in draw_next(logits, draws)]


def one_pass(logits: torch.Tensor, draws: list[Draw]) -> list[int]:
    """Every row in one pass, as on a GPU (on CPU: in passes of CPU_ROWS_PER_PASS)."""
    return [d.token for d in draw_next(logits, draws, rows_per_pass=len(draws))]


def requests(rows: int, target: Target, seed: int, device: torch.device, propose: int = 0) -> list[Draw]:
    return [Draw(target, torch.Generator(device=device).manual_seed(seed + b), mixed=bool(target.names),
                 propose=propose) for b in range(rows)]


def measure(f, logits: torch.Tensor, target: Target, repeats: int,
            propose: int = 0) -> tuple[float, float, float, list[int]]:
    """(ops, read-backs, ms) for one call over all rows, and the tokens of the first call (every
    call ends in a read-back of its tokens, so the time is the device's too)."""
    rows, dev = logits.shape[0], logits.device
    f(logits, requests(rows, target, 1, dev, propose))         # warm-up (and what is cached once, e.g. _columns)
    with SamplerWork() as work:
        tokens = f(logits, requests(rows, target, 0, dev, propose))
    start = time.perf_counter()
    for r in range(repeats):
        f(logits, requests(rows, target, r, dev, propose))
    return work.ops, work.reads, (time.perf_counter() - start) / repeats * 1e3, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--kinds", nargs="+", choices=("reference", "token", "token-rs"),
                    default=["reference", "token", "token-rs"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    base = model_logits(device)
    lines = [f"Default model's logits at the last {base.shape[0]} positions of a chat prompt; temperature "
             f"{a.temperature}, top-p {a.top_p}; device {device}"
             f"{' (one thread)' if device.type == 'cpu' else ''}, torch {torch.__version__}, {platform.machine()}, "
             f"{os.cpu_count()} cores. draw_next in one pass is what a GPU runs; on CPU it runs in passes of "
             f"{CPU_ROWS_PER_PASS} draws.", "",
             "| draws | generations B | one by one: ops | read-backs | ms | draw_next, one pass: ops | read-backs "
             f"| ms | draw_next, its passes on {device.type}: ms | ops ratio (one pass) | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in a.kinds:
        mixed, propose = kind != "reference", RS_BLOCK if kind == "token-rs" else 0
        target = Target(NAMES if mixed else (), (0.25,) * 4 if mixed else (), temperature=a.temperature, top_p=a.top_p)
        what = {"reference": "reference", "token": f"`token` step, p* of 1 + {len(NAMES)} rows",
                "token-rs": f"token-rs, first block of {RS_BLOCK}"}[kind]
        for rows in a.rows:
            logits = base[torch.arange(rows) % base.shape[0], :None if mixed else 1]   # [B, 1 + N or 1, V]
            o1, r1, t1, k1 = measure(one_by_one, logits, target, a.repeats, propose)
            o2, r2, t2, k2 = measure(one_pass, logits, target, a.repeats, propose)
            _, _, t3, k3 = measure(together, logits, target, a.repeats, propose)
            lines.append(f"| {what} | {rows} | {o1} | {r1} | {t1:.2f} | {o2} | {r2} | {t2:.2f} | {t3:.2f} | "
                         f"{o1 / o2:.1f}x | {'yes' if k1 == k2 == k3 else 'NO'} |")
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            f.write("# Next-token draws: one by one vs all generations at once\n\n"
                    f"Command: `python bench/draws.py {' '.join(sys.argv[1:])}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
