"""personamix: multi-personality generation at decoding time (MPG: SCR, Token-RS and exact samplers)."""

from .errors import PersonamixError
from .generator import GenerationResult, Generator, TextStream
from .samplers import METHODS, SamplerConfig
from .stats import Stats
from .targets import Target

__all__ = ["Generator", "GenerationResult", "TextStream", "PersonamixError", "METHODS",
           "SamplerConfig", "Stats", "Target"]
__version__ = "0.1.0"
