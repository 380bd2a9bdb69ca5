"""`SamplingParams`: every setting of one generation, each with its help text and its check.

This is the one place a setting is defined. `Generator.generate()`'s keyword arguments are its
fields; the CLI's flags (cli/common.py) and the server's request fields (serving/protocol.py)
are generated from the fields' metadata, so a default, a limit or a help text cannot drift
between them.

Each field's metadata:
    help     what it does (CLI --help, the server's OpenAPI schema, the playground)
    label    how error messages name it (default: the field name)
    type     int | float | str | bool | "weights" (a {name: number} mapping)
    choices  the allowed strings, for str settings
    min/max  inclusive bounds; `above` an exclusive lower bound
    optional None is allowed (and means what the help says)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from ..errors import PersonamixError, SettingError
from ..mbti import parse_persona
from .targets import AGGREGATIONS, check_weights

#: Sampler names (the functions are in samplers/__init__.py).
METHOD_NAMES: tuple[str, ...] = ("scr", "spec", "token", "token-rs", "base")
#: Methods whose temperature-0 (greedy) form is the argmax of the token-level target p*.
GREEDY_METHODS: tuple[str, ...] = ("base", "token", "token-rs", "spec")


def setting(default: Any, help: str, type: Any, **check: Any) -> Any:
    """A SamplingParams field: its default, help text, type and bounds (see the module docstring)."""
    return field(default=default, metadata={"help": help, "type": type, **check})


@dataclass(frozen=True)
class SamplingParams:
    """The settings of one generation. Invalid values raise SettingError naming the setting."""

    method: str | None = setting(
        None, "sampler: scr (the paper's chunk-level rejection sampler), spec (speculative, exact), token "
        "(exact, per token), token-rs (the paper's per-token baseline), base (the reference alone); "
        "default: scr, or token at temperature 0", str, choices=METHOD_NAMES, optional=True)
    persona: str | None = setting(
        None, "MBTI letters such as ENTJ: equal weights on the adapters named E, N, T, J", str, optional=True)
    weights: Mapping[str, float] | None = setting(
        None, "explicit weights {adapter: number}, negative allowed, e.g. E=0.7,N=-0.3; "
        "with neither persona nor weights every adapter gets an equal weight", "weights", optional=True)
    aggregation: Literal["linear", "geometric"] = setting(
        "linear", "how the density ratios combine: linear (the paper: log sum_i a_i r_i) or geometric "
        "(product of experts: sum_i a_i log r_i)", str, choices=AGGREGATIONS)
    max_new_tokens: int = setting(64, "new tokens at most", int, min=1)
    seed: int | None = setting(None, "random seed (none: drawn at random and reported)", int, min=0,
                               max=2**63 - 1, optional=True)
    temperature: float = setting(
        1.0, "divides every model's logits before the ratios are formed; 0 = greedy decoding of the target "
        "(its argmax at every step)", float, min=0.0)
    top_k: int = setting(0, "keep the reference's k likeliest tokens; every model is renormalised on them "
                            "(0 = off)", int, min=0)
    top_p: float = setting(1.0, "keep the reference's smallest set of tokens with this much mass (1 = off)",
                           float, above=0.0, max=1.0)
    k: int = setting(4, "chunk size: tokens drafted from the reference per step (scr, spec)", int, min=1, max=64,
                     label="k (chunk size)")
    window: int = setting(20, "scr: how many recent chunk scores the bound is estimated from (W)", int,
                          min=1, max=100_000)
    gamma: float = setting(1.2, "scr: safety margin on the estimated bound, log M = max(window) + log gamma",
                           float, min=1.0, label="gamma (safety margin on the bound)")
    warmup: int = setting(5, "scr: chunks verified token by token with the exact bound before the window "
                             "estimate is used (at least one always is: the window needs a score)", int,
                          min=0, max=100_000)
    bound: Literal["window", "exact"] = setting(
        "window", "scr: window (the paper's estimate) or exact (the oracle per-token bound; exact for p*)",
        str, choices=("window", "exact"))
    max_retries: int = setting(256, "Token-RS proposals per token before the target is sampled directly "
                                    "(bounds every rejection loop)", int, min=1, max=1_000_000)
    ignore_eos: bool = setting(False, "keep generating after an end-of-sequence token", bool)

    def __post_init__(self) -> None:
        for f in fields(self):
            _check(f.name, getattr(self, f.name), f.metadata)
        if self.weights is not None:
            object.__setattr__(self, "weights", {str(n): float(w) for n, w in self.weights.items()})
        if self.method is None:
            object.__setattr__(self, "method", "token" if self.greedy else "scr")
        if self.persona is not None and self.weights is not None:
            raise SettingError("persona", "give either persona or weights, not both")
        if self.method == "base" and (self.persona is not None or self.weights is not None):
            raise SettingError("method", "method 'base' samples the reference alone: it takes no persona or "
                                         "weights")
        if self.persona is not None:
            try:
                parse_persona(self.persona)
            except PersonamixError as e:
                raise SettingError("persona", str(e)) from None
        if self.weights is not None:
            try:
                check_weights(self.weights, self.aggregation)
            except PersonamixError as e:
                raise SettingError("weights", str(e)) from None
        if self.greedy and self.method not in GREEDY_METHODS:
            raise SettingError(
                "temperature", f"temperature 0 (greedy decoding) is not defined for method {self.method!r}: SCR "
                "accepts chunks by a random test against an estimated bound and its chunk-level target has no "
                "computable argmax; use method 'token' or 'spec' (both give the argmax of the token-level "
                "target at every step) or a temperature > 0")

    @property
    def greedy(self) -> bool:
        """Temperature 0: every step takes the target's most likely token."""
        return self.temperature == 0

    def replace(self, **changes: Any) -> SamplingParams:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_kwargs(cls, base: SamplingParams | None = None, **kwargs: Any) -> SamplingParams:
        """`base` (default: the defaults) with `kwargs` changed; an unknown name is a SettingError."""
        unknown = sorted(set(kwargs) - set(FIELDS))
        if unknown:
            raise SettingError(unknown[0], f"unknown setting(s) {', '.join(unknown)}; settings are "
                                           f"{', '.join(FIELDS)}")
        return replace(base, **kwargs) if base is not None else cls(**kwargs)


FIELDS: dict[str, Any] = {f.name: f for f in fields(SamplingParams)}


def describe(name: str) -> dict[str, Any]:
    """A setting as plain data: default, help, type name and bounds (for the server and the playground)."""
    f = FIELDS[name]
    meta = {k: v for k, v in f.metadata.items() if k != "type"}
    kind = f.metadata["type"]
    return {"name": name, "default": f.default, "type": kind if isinstance(kind, str) else kind.__name__, **meta}


def _check(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Raise SettingError unless `value` has the setting's type and lies within its bounds."""
    if value is None:
        if meta.get("optional"):
            return
        raise SettingError(name, f"{name} must be given (got None)")
    kind = meta["type"]

    def bad(what: str) -> SettingError:
        return SettingError(name, f"{meta.get('label', name)} must be {what}, got {value!r}")

    if kind == "weights":
        if not isinstance(value, Mapping) or not value:
            raise bad("a non-empty mapping {adapter name: weight}")
        for n, w in value.items():
            if not isinstance(n, str) or isinstance(w, bool) or not isinstance(w, (int, float)):
                raise SettingError(name, f"weight for {n!r} must be a number, got {w!r}")
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return
    if kind is str:
        if not isinstance(value, str):
            raise bad("a string")
        if "choices" in meta and value not in meta["choices"]:
            raise SettingError(name, f"unknown {name} {value!r}; choose one of {', '.join(meta['choices'])}")
        return
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad("an integer" + _range(meta))
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise bad("a finite number" + _range(meta))
    if ("min" in meta and value < meta["min"]) or ("max" in meta and value > meta["max"]) \
            or ("above" in meta and value <= meta["above"]):
        raise bad(("an integer" if kind is int else "a number") + _range(meta))


def _range(meta: Mapping[str, Any]) -> str:
    lo = f"> {meta['above']}" if "above" in meta else (f">= {meta['min']}" if "min" in meta else "")
    hi = f"<= {meta['max']:,}" if "max" in meta else ""
    return (" " + " and ".join(x for x in (lo, hi) if x)) if lo or hi else ""


__all__ = ["SamplingParams", "METHOD_NAMES", "GREEDY_METHODS", "FIELDS", "describe"]
