"""`personamix serve`: the OpenAI-compatible server with the playground at / (serving/)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import PersonamixError
from .common import adapters_from, add_model_flags


def register(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible server with a playground page at /")
    add_model_flags(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-pending", type=int, default=16, help="requests in flight before 429 (default: 16)")
    s.set_defaults(func=run)


def run(a: argparse.Namespace) -> None:
    from ..generator import Generator
    from ..serving import serve

    if a.max_pending < 1:
        raise PersonamixError(f"--max-pending must be >= 1, got {a.max_pending}")
    gen = Generator.from_pretrained(a.model, adapters=adapters_from(a), backend=a.backend, device=a.device,
                                    onednn=not a.no_onednn)
    print(f"personamix: serving {a.model} with adapters {', '.join(gen.adapter_names) or '(none)'} "
          f"on http://{a.host}:{a.port}/ (playground) and /v1", file=sys.stderr)
    serve(gen, Path(a.model).name if Path(a.model).exists() else a.model, a.host, a.port, a.max_pending)
