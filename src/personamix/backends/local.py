"""`LocalBackend`: what every backend over transformers models in this process shares (the
facts read off the model, its preallocated KV caches and how to roll them back)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from transformers import PreTrainedModel

from ..engine.session import Backend, Group
from .cache import PreallocatedCache
from .cuda import no_cudnn_attention


def cache_kwarg(model: PreTrainedModel) -> str:
    """The name under which this transformers version takes the KV cache (`cache` from 5.24 on,
    `past_key_values` before)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class LocalBackend(Backend):
    """A backend whose reference is the transformers model `model` (in this process)."""

    def __init__(self, model: PreTrainedModel, names: Sequence[str]):
        text_config = model.config.get_text_config()
        self.names = tuple(names)
        self.vocab_size = int(text_config.vocab_size)
        self.max_length = int(getattr(text_config, "max_position_embeddings", 2048))
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache_kw = cache_kwarg(model)
        no_cudnn_attention(self.device)   # on a GPU: decoding's ever-new shapes cost cuDNN a graph each (cuda.py)

    def new_cache(self, group: Group, names: Sequence[str]) -> PreallocatedCache:
        return PreallocatedCache()

    def crop(self, cache: PreallocatedCache, n_remove: int) -> None:
        cache.crop(-n_remove)   # transformers 5: a negative argument removes that many positions from the end
