"""Samplers: each is `sample(session, prompt, target, cfg, rng, stats)`, a generator that
yields the tokens it commits at every step (one or more)."""

from . import base, scr, spec, token, token_rs
from .common import SamplerConfig

METHODS = {
    "base": base.sample,
    "token": token.sample,
    "token-rs": token_rs.sample,
    "scr": scr.sample,
    "spec": spec.sample,
}

__all__ = ["METHODS", "SamplerConfig"]
