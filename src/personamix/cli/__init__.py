"""The command line: `personamix generate | demo | train | train-shipped | attribute-data | serve | eval | bench`,
one module per subcommand (each has `register(subparsers)` and a `run(args)`)."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import PersonamixError
from . import attribute_data, bench, demo, evaluate, generate, serve, train
from .common import quiet

SUBCOMMANDS = (generate, demo, train, attribute_data, serve, evaluate, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="personamix", description="Multi-personality generation at decoding time")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PersonamixError as e:
        print(f"personamix: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
