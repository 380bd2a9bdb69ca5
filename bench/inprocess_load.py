"""The load test's 16 clients without HTTP: concurrent SCR generations (`--method`: other
samplers, each level once per method in turn) in threads of one process, over the batched
backend, with the load test's prompts, personas and settings (32 new tokens, temperature 0.7,
top-p 0.9, own seeds, prefix cache on). What the server's forwards and the generations' turns
between them cost, without the event loop, the SSE streams and the load generator on the same
cores (docs/batching.md, "The packed forward's Python").

Prints per level: tokens/s, forwards, ms per forward, row-tokens per forward, the shares of the
level in forwards and in the gather wait, the process's context switches and minor page faults per
forward, the cores it kept busy, and the turns' lengths (median / p90 / p99, their sum).
`--model-forward` runs packed forwards through the model's own forward instead of decoder.py
(the A/B of that change in one tree). `--pools zeroed unfilled` runs every level once per KV pool
fill in turn (cache.KVPool.fill: zeroed, or left uninitialised as the backend does where the CPU
attention kernel runs), the A/B of that change alternating in one process; `--lora torch kernel`
likewise switches the LoRA deltas between PyTorch's matmuls and the CPU kernel (cpu_lora.py), and
`--pointwise torch kernel` the decoder's norms, rotary embeddings and SiLU between PyTorch's ops
and the CPU kernels (cpu_pointwise.py), and `--ahead on off` SCR's next draft step between being
drawn in its scoring forward and in its generation's turn (BatchingBackend.draws_ahead).

    python bench/inprocess_load.py [--clients 1 16] [--requests 2] [--method scr token] [--model-forward]
                                   [--pools zeroed unfilled] [--lora torch kernel] [--pointwise torch kernel]
                                   [--ahead on off]
"""
from __future__ import annotations

import argparse
import itertools
import os
import resource
import statistics
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from loadtest import PERSONAS, PROMPTS  # the load test's prompts and personas (this folder)

from personamix import Generator
from personamix.backends import cpu_lora
from personamix.backends.cpu_pointwise import KernelOps, pointwise_problem
from personamix.backends.decoder import TorchOps
from personamix.backends.turns import Turns
from personamix.cli.common import quiet
from personamix.engine.params import SamplingParams


class TimedTurns(Turns):
    """Turns that record how long each was held (from its take to its holder's give)."""

    def __init__(self):
        super().__init__()
        self.held: list[float] = []

    def give(self) -> None:
        with self._cond:
            if self._holder == threading.get_ident():
                self.held.append(time.perf_counter() - self._since)
        super().give()


METHOD = "scr"   # --method


def request(gen: Generator, i: int, seed: int) -> int:
    params = SamplingParams(max_new_tokens=32, persona=PERSONAS[i % len(PERSONAS)], method=METHOD, seed=seed,
                            temperature=0.7, top_p=0.9)
    stream = gen.stream([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], params)
    for _ in stream:
        pass
    return len(stream.token_ids)


def run_clients(gen: Generator, clients: int, per_client: int, first: int) -> tuple[int, float]:
    """`clients` threads sending `per_client` requests each, one after another (request i of the
    level: c + r * clients, numbered in the run from `first`): the tokens generated, the seconds taken."""
    tokens: list[int] = []

    def client(c: int) -> None:
        for r in range(per_client):
            i = c + r * clients
            tokens.append(request(gen, i, first + i))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens), time.perf_counter() - start


def level(gen: Generator, clients: int, per_client: int, first: int, pool: str) -> str:
    b = gen.backend
    turns = b.turns if isinstance(b.turns, TimedTurns) else None
    held0 = len(turns.held) if turns else 0
    f0, busy0, wait0, rows0 = b.forwards, b.busy_s, b.waited_s, b.row_tokens
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    tokens, wall = run_clients(gen, clients, per_client, first)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    n = max(b.forwards - f0, 1)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    line = (f"| {clients} | {pool} | {tokens / wall:.1f} | {b.forwards - f0} "
            f"| {1000 * (b.busy_s - busy0) / n:.1f} "
            f"| {(b.row_tokens - rows0) / n:.1f} | {(b.busy_s - busy0) / wall:.0%} / {(b.waited_s - wait0) / wall:.0%} "
            f"| {(r1.ru_nvcsw - r0.ru_nvcsw) / n:.0f} / {(r1.ru_nivcsw - r0.ru_nivcsw) / n:.0f} "
            f"| {(r1.ru_minflt - r0.ru_minflt) / n:.0f} | {cpu / wall:.2f} |")
    held = sorted(turns.held[held0:]) if turns else []
    if held:
        q = lambda p: 1000 * held[min(len(held) - 1, int(p * len(held)))]
        line += f" {1000 * statistics.median(held):.2f} / {q(0.9):.2f} / {q(0.99):.2f} ms, {sum(held):.2f} s |"
    else:
        line += " - |"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--method", nargs="+", default=["scr"], choices=["scr", "token", "token-rs", "spec", "base"],
                    help="every client's sampling method (the load test's: scr); several: each level once per "
                         "method, in turn")
    ap.add_argument("--model-forward", action="store_true",
                    help="packed forwards through the model's own forward, not decoder.py")
    ap.add_argument("--pools", nargs="+", choices=["default", "zeroed", "unfilled"], default=["default"],
                    help="run each level once per KV pool fill, in turn (default: the backend's own)")
    ap.add_argument("--lora", nargs="+", choices=["default", "torch", "kernel"], default=["default"],
                    help="run each level once per LoRA delta path, in turn (default: the backend's own)")
    ap.add_argument("--pointwise", nargs="+", choices=["default", "torch", "kernel"], default=["default"],
                    help="run each level once per path of the decoder's pointwise steps, in turn")
    ap.add_argument("--ahead", nargs="+", choices=["on", "off"], default=["on"],
                    help="run each level with SCR's next draft step drawn in its scoring forward (on, the "
                         "default) or in its turn (off), in turn (BatchingBackend.draws_ahead)")
    a = ap.parse_args()
    global METHOD
    quiet()
    gen = Generator.from_pretrained(adapters="mbti", backend="batched")
    b = gen.backend
    b.cache_prefixes(256)
    if a.model_forward:
        b.decoder = None
    if b.turns is not None:
        b.turns = TimedTurns()
    warm = threading.Thread(target=lambda: [request(gen, i, i) for i in range(len(PROMPTS))])
    warm.start()
    warm.join()                                  # every prompt cached, as in the load test's warm-up
    print(f"batched backend, packed forwards through {'decoder.py' if b.decoder else 'the model'}; "
          f"{a.requests} requests per client, {os.cpu_count()} CPU cores")
    if "kernel" in a.lora and not b.lora.rows.kernel:
        raise SystemExit("--lora kernel: this backend's LoRA deltas do not run on the CPU kernel "
                         f"({cpu_lora.lora_problem(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))})")
    own_ops = b.decoder.ops if b.decoder is not None else None
    if a.pointwise != ["default"] and own_ops is not KernelOps:
        why = "no plain decoder" if b.decoder is None else pointwise_problem(b.decoder)
        raise SystemExit(f"--pointwise: this backend's decoder does not run the CPU kernels ({why})")
    print("| clients | method | pool, LoRA, pointwise, draws ahead | tok/s | forwards | ms per forward "
          "| row-tokens per forward "
          "| in forwards / waiting "
          "| context switches per forward (vol. / invol.) | minor faults per forward | cores busy "
          "| turns: median / p90 / p99, sum |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    first, own, own_lora = 1000, b.pool.fill, b.lora.rows.kernel
    for clients, METHOD, pool, lora, pointwise, ahead in itertools.product(a.clients, a.method, a.pools, a.lora,
                                                                           a.pointwise, a.ahead):
        b.pool.fill = {"default": own, "zeroed": 0.0, "unfilled": None}[pool]   # (idle) drops its tensors
        b.lora.rows.kernel = own_lora if lora == "default" else lora == "kernel"
        if b.decoder is not None:
            b.decoder.ops = {"default": own_ops, "torch": TorchOps, "kernel": KernelOps}[pointwise]
        b.draws_ahead = ahead == "on"
        print(level(gen, clients, a.requests, first, f"{METHOD} | {pool}, {lora}, {pointwise}, {ahead}"), flush=True)
        first += clients * a.requests


if __name__ == "__main__":
    main()
