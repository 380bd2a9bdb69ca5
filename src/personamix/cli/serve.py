"""`personamix serve`: the OpenAI-compatible server with the playground at / (serving/)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import PersonamixError
from .common import add_engine_flags, add_model_flags, load_generator


def register(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible server with a playground page at /")
    add_model_flags(s)
    add_engine_flags(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-pending", type=int, default=16, help="requests in flight before 429 (default: 16)")
    s.add_argument("--prefix-cache-mb", type=float, default=256,
                   help="keep the keys/values of prompt prefixes (a shared system prompt) across requests, up "
                        "to this many MB; 0: off (batched backend only; default: 256)")
    s.add_argument("--gather-wait", type=float, default=None,
                   help="batched backend: how long a forward may wait for the requests the previous forward "
                        "served to queue their next step, in forwards' durations; 0: start at once "
                        "(default: 1.0; docs/batching.md)")
    s.add_argument("--kv-keep-idle", type=float, default=None, metavar="SECONDS",
                   help="batched backend: how long the KV pool keeps its memory once no request is in flight, "
                        "so the next burst does not fault it in again; 0: release it at once "
                        "(default: 10; docs/batching.md)")
    s.add_argument("--no-cuda-graphs", action="store_true",
                   help="batched backend on a GPU: run every forward eagerly instead of replaying decoding "
                        "steps from CUDA graphs (backends/cuda_graphs.py)")
    s.set_defaults(func=run)


def run(a: argparse.Namespace) -> None:
    from ..serving import serve

    if a.max_pending < 1:
        raise PersonamixError(f"--max-pending must be >= 1, got {a.max_pending}")
    if not a.prefix_cache_mb >= 0:
        raise PersonamixError(f"--prefix-cache-mb must be >= 0, got {a.prefix_cache_mb}")
    batched = {"--gather-wait": a.gather_wait, "--kv-keep-idle": a.kv_keep_idle}   # the batched backend's settings
    for flag, value in batched.items():
        if value is not None and not 0 <= value < float("inf"):
            raise PersonamixError(f"{flag} must be a finite number >= 0, got {value}")
    gen = load_generator(a)
    gen.backend.cache_prefixes(a.prefix_cache_mb)      # where the backend can (the batched one)
    for flag, value in batched.items():
        if value is not None and not gen.backend.shares_forwards:
            raise PersonamixError(f"{flag} needs the batched backend; this one is {gen.backend.kind!r}")
    if a.gather_wait is not None:
        gen.backend.gather_wait = a.gather_wait
    if a.kv_keep_idle is not None:
        gen.backend.pool.keep_idle_s = a.kv_keep_idle
    if a.no_cuda_graphs and gen.backend.shares_forwards:
        gen.backend.stop_cuda_graphs()
    if a.engine:
        model_id, where = gen.backend.client.info.base, f"the engine at {a.engine}"
    else:
        model_id, where = (Path(a.model).name if Path(a.model).exists() else a.model), "this process"
    print(f"personamix: serving {model_id} ({where}) with adapters {', '.join(gen.adapter_names) or '(none)'} "
          f"on http://{a.host}:{a.port}/ (playground) and /v1", file=sys.stderr)
    serve(gen, model_id, a.host, a.port, a.max_pending)
