"""Two questions about the batched backend on a GPU, asked with the default model's architecture
(SmolLM2-135M's config, randomly initialised: the same shapes and kernels, no weights needed)
and the shipped E/N/T/J adapters, in bf16:

  rss    Does the host memory grow with the shapes a server's packed forwards take? Runs
         --forwards packed forwards of a server-like mix (2-40 generations per forward, one-token
         draft calls and 4-token chunks, contexts of 30-700 tokens, so attention's shapes keep
         changing), printing RSS and ms per forward every 50. The backends turn PyTorch's cuDNN
         attention off on CUDA (backends/cuda.py); --cudnn turns it back on after loading, as
         it was before that change: run both and compare.
  graph  How much of one generation's decoding step is the host's: the step through the
         backend (5 rows, one token), the plain model forward without LoRA, and the plain
         forward replayed from a CUDA graph over a static cache (kernel launches and Python
         work gone), with the kernel launches per forward.

    python bench/gpu_probe.py --config CONFIG.json rss [--cudnn] [--forwards 300]
    python bench/gpu_probe.py --config CONFIG.json graph
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from personamix.backends.batching import BatchingBackend

ADAPTERS = Path(__file__).resolve().parents[1] / "src/personamix/adapters/mbti"
NAMES = ["E", "N", "T", "J"]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def model_from(config: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(config)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rss(a) -> None:
    b = BatchingBackend(model_from(a.config, a.device), {n: str(ADAPTERS / n) for n in NAMES})
    torch.backends.cuda.enable_cudnn_sdp(a.cudnn)     # the backend turned it off on CUDA; --cudnn: back on
    rng = random.Random(0)

    def new_session():
        group = rng.choice(["ref", "prefs", "all"])
        cache = b.new_cache(group, NAMES)
        ids = torch.tensor([rng.randrange(100, 30000) for _ in range(rng.randrange(30, 300))], device=b.device)
        b.run([b.call(group, ids, cache, 1, NAMES)])
        return [cache, group]

    sessions = [new_session() for _ in range(48)]        # [cache, group] of 48 generations in flight
    times, start_rss = [], None
    for f in range(1, a.forwards + 1):
        chosen = rng.sample(range(len(sessions)), rng.randrange(2, 41))
        calls = []
        for i in chosen:
            cache, group = sessions[i]
            t = 1 if group == "ref" else 4
            calls.append(b.call(group, torch.tensor([rng.randrange(100, 30000) for _ in range(t)], device=b.device),
                                cache, t, NAMES))
        sync(a.device)
        t0 = time.perf_counter()
        b.run(calls)
        sync(a.device)
        times.append(time.perf_counter() - t0)
        for i in chosen:                               # a generation that reached 700 tokens ends; a new one starts
            if sessions[i][0].get_seq_length() > 700:
                b.free_cache(sessions[i][0])
                sessions[i] = new_session()
        if f == 50:
            start_rss = rss_mb()
        if f % 50 == 0:
            print(f"forward {f}: RSS {rss_mb():.0f} MB, {1000 * statistics.median(times[-50:]):.1f} ms per forward "
                  f"(median of the last 50)", flush=True)
    print(f"{'cuDNN attention on' if a.cudnn else 'cuDNN attention off'}: RSS {start_rss:.0f} -> {rss_mb():.0f} "
          f"MB from forward 50 to {a.forwards}; median {1000 * statistics.median(times):.1f} ms per forward")


def graph(a) -> None:
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    model = model_from(a.config, a.device)
    dev, rows, ctx = a.device, 5, 100
    b = BatchingBackend(model, {n: str(ADAPTERS / n) for n in NAMES})

    def timed(fn, n=30) -> float:
        for _ in range(3):
            fn()
        sync(dev)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            sync(dev)
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    cache = b.new_cache("all", NAMES)
    b.run([b.call("all", torch.arange(100, 100 + ctx, device=dev), cache, 1, NAMES)])

    def backend_step():
        b.run([b.call("all", torch.tensor([7], device=dev), cache, 1, NAMES)])
        b.crop(cache, 1)

    backend_ms = 1000 * timed(backend_step)
    static = StaticCache(config=model.config, max_cache_len=ctx + 128)   # steps advance it (no rollback)
    ids = torch.full((rows, ctx), 100, device=dev)
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=static, cache_position=torch.arange(ctx, device=dev))
    step_ids = torch.full((rows, 1), 7, device=dev)
    pos = torch.tensor([ctx], device=dev)

    def plain_step():
        with torch.inference_mode():
            return model(input_ids=step_ids, past_key_values=static, cache_position=pos, logits_to_keep=1).logits

    lines = [f"backend step (5 rows, LoRA deltas, one token at a {ctx}-token context): {backend_ms:.2f} ms",
             f"plain model forward, eager (5 rows, no LoRA, static cache): {1000 * timed(plain_step):.2f} ms"]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    for name, fn in (("backend step", backend_step), ("plain forward", plain_step)):
        with profile(activities=acts) as prof:
            fn()
            sync(dev)
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        lines.append(f"kernels per {name}: {len(kernels)}, their GPU time "
                     f"{sum(e.device_time for e in kernels) / 1000:.2f} ms")
    if dev == "cuda":
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    plain_step()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = plain_step()
            lines.append(f"plain model forward, CUDA graph replay: {1000 * timed(g.replay):.2f} ms")
            g.replay()
            sync(dev)
            ref = plain_step()
            lines.append(f"graph logits vs eager: max |diff| {(out.float() - ref.float()).abs().max().item():.3g}")
        except Exception as e:   # report, do not hide: capture can fail on a data-dependent branch
            lines.append(f"CUDA graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the model's config.json (its folder)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("rss")
    r.add_argument("--cudnn", action="store_true", help="turn cuDNN attention back on after loading")
    r.add_argument("--forwards", type=int, default=300)
    sub.add_parser("graph")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    print(f"{a.what} on {a.device}: torch {torch.__version__}", flush=True)
    {"rss": rss, "graph": graph}[a.what](a)


if __name__ == "__main__":
    main()
