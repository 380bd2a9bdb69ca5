"""Samplers: each is `sample(session, prompt, target, params, rng, stats)`, a generator that
yields the tokens it commits at every step (one or more). `params` is the generation's
SamplingParams (engine/params.py); the target's math is in engine/targets.py."""

from ..params import METHOD_NAMES, SamplingParams
from . import base, scr, spec, token, token_rs

METHODS = {
    "scr": scr.sample,
    "spec": spec.sample,
    "token": token.sample,
    "token-rs": token_rs.sample,
    "base": base.sample,
}
assert tuple(METHODS) == METHOD_NAMES

#: The settings of the chunked samplers used to be their own dataclass; they are fields of
#: SamplingParams now (same names, same defaults).
SamplerConfig = SamplingParams

__all__ = ["METHODS", "SamplerConfig"]
