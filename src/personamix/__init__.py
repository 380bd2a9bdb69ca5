"""personamix: multi-personality generation at decoding time (MPG: SCR, Token-RS and exact samplers).

Layout (imports point down):
    errors, mbti, loading, adapters/   shared leaves: the error type, MBTI letters, model loading, shipped adapters
    engine/                            targets (the math), SamplingParams, samplers, the Session and backend contract
    backends/                          the contract's implementations (multi-LoRA, batching, PEFT, separate models)
    generator.py                       Generator: a backend + a tokenizer; generate / stream
    training/ evaluation/ serving/ cli/   the applications
"""

from .engine.params import SamplingParams
from .engine.samplers import METHODS, SamplerConfig
from .engine.stats import Stats
from .engine.targets import Target
from .errors import PersonamixError
from .generator import GenerationResult, Generator, TextStream

__all__ = ["Generator", "GenerationResult", "TextStream", "PersonamixError", "METHODS", "SamplingParams",
           "SamplerConfig", "Stats", "Target"]
__version__ = "0.1.0"
