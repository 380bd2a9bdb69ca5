"""KV caches for transformers models: preallocated storage, appended in place, rolled back by a
length change (a rejected draft costs nothing to undo)."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer with preallocated storage: appending writes in place (no torch.cat
    copy of the whole cache per step), the keys/values handed to attention are views of the
    filled part, and a rollback is a length change. Capacity doubles when full."""

    def __init__(self, capacity: int = 256):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._k = key_states.new_empty(*key_states.shape[:2], self.capacity, key_states.shape[3])
        self._v = value_states.new_empty(*value_states.shape[:2], self.capacity, value_states.shape[3])
        self.length = 0
        self._view()
        self.is_initialized = True

    def _view(self) -> None:
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self.capacity = max(end, 2 * self.capacity)
            k, v = self._k, self._v
            self._k = k.new_empty(*k.shape[:2], self.capacity, k.shape[3])
            self._v = v.new_empty(*v.shape[:2], self.capacity, v.shape[3])
            self._k[:, :, : self.length] = k[:, :, : self.length]
            self._v[:, :, : self.length] = v[:, :, : self.length]
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self._view()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)
            self._view()

    def reset(self) -> None:
        self.length = 0
        super().reset()


class PreallocatedCache(DynamicCache):
    """A DynamicCache whose layers are PreallocatedLayer (see there)."""

    def __init__(self):
        super().__init__()
        self.layer_class_to_replicate = PreallocatedLayer


__all__ = ["PreallocatedLayer", "PreallocatedCache"]
