"""A sampler's own time per call, outside the model: what every generation thread of the batched
backend does between its forwards (drafting's sampling, the target's math, SCR's cascade, the
session's bookkeeping), which a busy server's forward waits for (docs/batching.md, "Gathering").

Seeded generations on the default model with the shipped MBTI adapters, one after another, on
ONE thread (a generation thread's tensor work runs on one core: backends/omp.py); the time in
the backend's forwards is measured and taken out, except the draws and chunk scores the
batched backend makes in them for the samplers (engine/draws.py, engine/scoring.py), which are
the samplers' work. The digest of the generated tokens lets two trees be compared
(`PYTHONPATH=<tree>/src`): equal digests, equal tokens.

Then one more, untimed pass counts what the sampler asks of PyTorch between forwards: tensor
operations (on a GPU each is a kernel launch or more, from the generation's thread under the
GIL) and read-backs of a value to the host (`.item()`, `int(t)`, `.tolist()`, and nonzero / unique,
whose output size is read back: on a GPU each waits for the stream to drain). Neither depends on
the device, so a CPU run says what a GPU step pays.

    python bench/sampler_overhead.py [--methods scr token token-rs spec] [--requests 8] [--tokens 32]
                                     [--top-p 0.9] [--out docs/bench/sampler_overhead.md]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from personamix import Generator
from personamix.cli.common import quiet

try:
    from personamix.testing import SamplerWork
except ImportError:     # a tree from before it (PYTHONPATH=<tree>/src): the counter of this checkout
    import importlib.util
    from pathlib import Path

    _spec = importlib.util.spec_from_file_location(
        "_this_checkouts_testing", Path(__file__).resolve().parents[1] / "src" / "personamix" / "testing.py")
    _testing = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_testing)
    SamplerWork = _testing.SamplerWork

PROMPTS = ["How would you spend a free Saturday?", "What do you do when a plan changes at the last minute?",
           "Describe your ideal workplace.", "How do you make a hard decision?"]
PERSONAS = ["ENTJ", "ISFP", "INFJ", "ESTP"]


def measure(gen: Generator, method: str, requests: int, tokens: int, top_p: float) -> dict:
    backend, in_model, forwards = gen.backend, [0.0], [0]
    run = backend.run
    sync = torch.cuda.synchronize if backend.device.type == "cuda" else (lambda: None)

    def timed_run(calls):
        start = time.perf_counter()
        run(calls)
        sync()                                  # on a GPU the forward's kernels count as the model's
        in_model[0] += time.perf_counter() - start
        forwards[0] += 1

    # the sampler's draws and chunk scores, made inside `run` (engine/draws.py, engine/scoring.py);
    # a tree from before has only the draws, or neither
    samplers_work = {name: getattr(backend, name) for name in ("draw_calls", "score_calls") if hasattr(backend, name)}

    def untimed(f):
        def made_in_run(calls):
            start = time.perf_counter()
            f(calls)
            in_model[0] -= time.perf_counter() - start
        return made_in_run

    backend.run = timed_run
    for name, f in samplers_work.items():
        setattr(backend, name, untimed(f))
    try:
        def go(n: int) -> list[list[int]]:
            return [gen.generate(PROMPTS[j % 4], method=method, persona=PERSONAS[j % 4], seed=j,
                                 max_new_tokens=tokens, temperature=0.7, top_p=top_p).token_ids for j in range(n)]
        go(2)                                   # warm-up
        in_model[0], forwards[0] = 0.0, 0
        start = time.perf_counter()
        out = go(requests)
        wall = time.perf_counter() - start
        timed_model, timed_forwards = in_model[0], forwards[0]
        with SamplerWork(backend) as work:      # untimed: the counting's own Python would count as the sampler's
            go(2)
        ops, reads, counted_forwards = work.ops, work.reads, work.forwards
        in_model[0], forwards[0] = timed_model, timed_forwards
    finally:
        backend.run = run
        for name in samplers_work:
            delattr(backend, name)
    n_tokens = sum(len(t) for t in out)
    outside = wall - in_model[0]
    return {"method": method, "tokens": n_tokens, "calls": forwards[0], "wall": wall, "model": in_model[0],
            "per_call": 1e3 * outside / forwards[0], "per_token": 1e3 * outside / n_tokens,
            "ops": ops / counted_forwards, "reads": reads / counted_forwards,
            "digest": hashlib.sha256(str(out).encode()).hexdigest()[:12]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["scr", "token", "token-rs", "spec"])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--device", default=None, help="default: a GPU if there is one, else cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    quiet()
    gen = Generator.from_pretrained(adapters="mbti", backend="batched", device=a.device)
    torch.set_num_threads(1)
    rows = [measure(gen, m, a.requests, a.tokens, a.top_p) for m in a.methods]
    lines = [f"Default model, shipped MBTI adapters, batched backend, {a.requests} seeded requests of {a.tokens} "
             f"tokens per method (temperature 0.7, top-p {a.top_p}), device {gen.backend.device}, one CPU thread, "
             f"torch {torch.__version__}, "
             f"{platform.machine()}, {os.cpu_count()} cores.", "",
             "| method | tokens | forwards | s in the model | outside the model, ms per forward | ms per token "
             "| tensor ops per forward | read-backs per forward | digest of the tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['tokens']} | {r['calls']} | {r['model']:.2f} | {r['per_call']:.2f} | "
              f"{r['per_token']:.2f} | {r['ops']:.1f} | {r['reads']:.2f} | {r['digest']} |" for r in rows]
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            command = f"python bench/sampler_overhead.py {' '.join(sys.argv[1:])}"
            f.write(f"# A sampler's own time per call, outside the model\n\nCommand: `{command}`\n\n"
                    + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
