"""What the subcommands share: model/adapter flags, the sampling flags (generated from
SamplingParams), and quieting library chatter."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from ..adapters import shipped_adapters
from ..engine.params import FIELDS, SamplingParams, describe
from ..errors import PersonamixError
from ..loading import DEFAULT_MODEL


def parse_adapters(items: list[str]) -> dict[str, str]:
    """["E=path", ...] -> {"E": "path", ...}."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise PersonamixError(f"--adapter expects NAME=PATH, got {item!r}")
        if name in out:
            raise PersonamixError(f"adapter {name!r} given twice")
        out[name] = path
    return out


def parse_weights(text: str | None) -> dict[str, float] | None:
    """"E=0.7,N=-0.3" -> {"E": 0.7, "N": -0.3}."""
    if text is None:
        return None
    out = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = float(value)
        except ValueError:
            raise PersonamixError(f"--weights expects NAME=NUMBER[,NAME=NUMBER...], got {text!r}") from None
    return out


def add_model_flags(p: argparse.ArgumentParser, adapters_help: str = "") -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, hub id or local directory (default: %(default)s)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a preference model: PEFT LoRA adapter dir / hub id, or a full model (repeatable)")
    p.add_argument("--adapters", default=None, metavar="SET",
                   help=adapters_help or "shipped adapter set(s) for the default model: mbti, roleplay or "
                                         "mbti,roleplay (default model without --adapter: mbti)")
    p.add_argument("--backend", default="auto", help="auto | batched | fast | lora | separate "
                                                     "(see backends.build_backend)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when visible)")
    p.add_argument("--no-onednn", action="store_true", help="CPU: PyTorch's linear kernels, unpacked (README)")


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference engine (instead of loading the models in this process)")
    g.add_argument("--engine", metavar="URL", default=None,
                   help="a vLLM OpenAI-compatible server (http://host:port/v1) serving the reference as its base "
                        "model and the preference models as LoRA adapters; personamix samples over HTTP")
    g.add_argument("--engine-adapters", metavar="NAMES", default=None,
                   help="comma-separated adapter names as the engine serves them (default: all it serves)")
    g.add_argument("--tokenizer", default=None,
                   help="a local copy of the engine model's tokenizer (alias, directory or hub id; default: the "
                        "engine's model directory if it is on this machine, else the engine's /tokenize)")
    g.add_argument("--engine-timeout", type=float, default=60.0,
                   help="seconds per engine call; a failed call is retried twice with backoff (default: 60)")


def load_generator(a: argparse.Namespace, want_default_adapters: bool = True):
    """The Generator the flags describe: models loaded here, or an engine's (--engine)."""
    from ..generator import Generator

    if getattr(a, "engine", None):
        if a.adapter or a.adapters:
            raise PersonamixError("with --engine the engine serves the adapters: name them with --engine-adapters "
                                  "(not --adapter / --adapters)")
        names = [x.strip() for x in (a.engine_adapters or "").split(",") if x.strip()] or None
        return Generator.from_engine(a.engine, names, tokenizer=a.tokenizer, timeout=a.engine_timeout)
    return Generator.from_pretrained(a.model, adapters=adapters_from(a, want_default_adapters), backend=a.backend,
                                     device=a.device, onednn=not a.no_onednn)


def adapters_from(a: argparse.Namespace, want_default: bool = True) -> dict[str, str]:
    """--adapter entries over --adapters sets; the shipped MBTI poles for the default model."""
    adapters = parse_adapters(a.adapter)
    if a.adapters:
        adapters = {**shipped_adapters(a.adapters, a.model), **adapters}
    elif not adapters and a.model == DEFAULT_MODEL and want_default:
        adapters = shipped_adapters("mbti", a.model)
    return adapters


def add_sampling_flags(p: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None) -> None:
    """One flag per SamplingParams field (--max-new-tokens, --top-k, ...), with its help text.
    Flags default to None ("not given"), so SamplingParams' own defaults apply."""
    defaults = dict(defaults or {})
    group = p.add_argument_group("sampling settings (SamplingParams)")
    for name in FIELDS:
        d = describe(name)
        flag = "--" + name.replace("_", "-")
        default = defaults.get(name, d["default"])
        shown = f"{d['help']} (default: {default})" if default is not None else d["help"]
        if d["type"] == "bool":
            group.add_argument(flag, action="store_true", default=None, help=d["help"])
        else:
            kind = {"int": int, "float": float, "str": str, "weights": str}[d["type"]]
            metavar = ("|".join(d["choices"]) if "choices" in d else
                       {"int": "N", "float": "X", "str": "TEXT", "weights": "NAME=W,..."}[d["type"]])
            group.add_argument(flag, type=kind, default=None, help=shown.replace("%", "%%"), metavar=metavar)
    p.set_defaults(_sampling_defaults=defaults)


def params_from(a: argparse.Namespace) -> SamplingParams:
    """The SamplingParams the sampling flags give (flags not given keep the defaults)."""
    settings = dict(a._sampling_defaults)
    for name in FIELDS:
        value = getattr(a, name, None)
        if value is not None:
            settings[name] = parse_weights(value) if FIELDS[name].metadata["type"] == "weights" else value
    return SamplingParams(**settings)


def stream_to(out, gen, prompt, params: SamplingParams, **kwargs):
    """Stream a generation's text to `out`; the GenerationResult."""
    stream = gen.stream(prompt, params, **kwargs)
    for piece in stream:
        out.write(piece)
        out.flush()
    out.write("\n")
    return stream.result


def quiet() -> None:
    """Library progress bars and deprecation chatter would interleave with streamed text."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def stderr(*args) -> None:
    print(*args, file=sys.stderr)
