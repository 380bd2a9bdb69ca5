"""KV caches for transformers models: preallocated storage, appended in place, rolled back by a
length change (a rejected draft costs nothing to undo). PreallocatedCache keeps its own storage;
SlabCache keeps it in a KVPool shared by every generation in flight (the batched backend)."""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable

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




class KVPool:
    """The keys and values of every generation in flight, one tensor per layer and kind,
    [slots, kv_heads, capacity, head_dim]: a cache (one group of one generation, SlabCache)
    owns a contiguous range of slots, one per row, and a length. Attention over many calls can
    then read one region of one tensor (batching.py) instead of one tensor per call; rolling
    back is a length change; a cache that is garbage-collected gives its slots back.

    Tensors are made on first use and grow (doubling; what was written is copied) when a forward
    needs more slots or positions; `reserve` only books slot numbers, so it is safe from any
    thread, while `ensure` (which may reallocate) runs only inside a forward, which the owner
    serialises.

    `fill`: what positions no row has written hold. 0.0 where attention reads such positions
    under a mask (a region of slots, padded steps: uninitialised memory can hold NaN, which a mask
    does not cancel, NaN * 0 = NaN); None (left uninitialised: no zeroing, and only the pages
    written are ever touched) where every read stays within what its row wrote (the CPU attention
    kernel, cpu_attention.py). Tests fill NaN to prove a path reads only what was written. Changing
    it drops the tensors (made again, filled so, by the next forward); nothing may be booked then.

    `keep_idle_s`: how long a pool with nothing booked keeps its tensors before dropping them (0:
    at once). Memory the pool has written to stays mapped while it is kept, so the generations of
    the next burst write their keys and values into pages that are already there; a pool made
    afresh pays a page fault for every 4 KB it writes (on the CPU each forward writes ~3 MB at 64
    rows: ~700 faults, ~2.3 us each in a VM; docs/batching.md, "Keeping the pool between bursts").
    Dropping after a quiet spell, not at once, is how allocators return memory too (jemalloc's
    dirty_decay_ms, 10 s). `on_drop` is called (outside the lock) after the tensors are dropped,
    e.g. to trim the C heap.
    """

    def __init__(self, slots: int = 16, capacity: int = 256, fill: float | None = 0.0, keep_idle_s: float = 0.0,
                 on_drop: Callable[[], None] | None = None):
        if not 0 <= keep_idle_s < float("inf"):
            raise ValueError(f"keep_idle_s must be a finite number >= 0, got {keep_idle_s}")
        self.k: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []
        self.slots, self.capacity = slots, capacity     # the tensors' size (once made)
        self._fill = fill
        self.keep_idle_s, self.on_drop = keep_idle_s, on_drop
        self._high = 0                                  # positions [high, capacity) hold `fill` in every slot
        self._initial = (slots, capacity)
        self._used: list[bool] = []                     # booked slot numbers (may exceed `slots`)
        self._lock = threading.Lock()
        self._collected: deque[tuple[int, int]] = deque()   # slots of caches the garbage collector freed
        self._bookings = 0                              # reservations so far: a drop planned before the last is void
        self._timer: threading.Timer | None = None      # the planned drop of an idle pool

    @property
    def fill(self) -> float | None:
        return self._fill

    @fill.setter
    def fill(self, value: float | None) -> None:
        if value is self._fill or value == self._fill:   # unchanged: the tensors stay
            return
        if not self.drop():
            raise RuntimeError("KVPool.fill changed while slots are booked")
        self._fill = value

    def reserve(self, rows: int) -> int:
        """The first slot of a free run of `rows` slots, booked."""
        with self._lock:
            self._drain()
            self._bookings += 1
            if self._timer is not None:   # busy again: the idle pool's drop is off
                self._timer.cancel()
                self._timer = None
            run = 0
            for i, used in enumerate(self._used):
                run = 0 if used else run + 1
                if run == rows:
                    start = i - rows + 1
                    break
            else:
                start = len(self._used) - run
                self._used.extend([False] * (start + rows - len(self._used)))
            for i in range(start, start + rows):
                self._used[i] = True
            return start

    def release(self, start: int, rows: int) -> None:
        """Give the slots back; when none is booked any more, the tensors are dropped (made again,
        at the initial size, by the next forward) after `keep_idle_s`, so an idle backend holds no
        keys and values for long. No forward can be using them then: a forward's calls keep their
        slots booked."""
        with self._lock:
            self._collected.append((start, rows))
            had = self._drain()
        self._dropped(had)

    def release_later(self, start: int, rows: int) -> None:
        """`release` for a cache the garbage collector found: it may run in any thread at any
        allocation, also one inside this pool's lock (a lock it cannot take again), so the slots
        are only noted here and go back at the pool's next use."""
        self._collected.append((start, rows))     # deque.append: atomic, no lock

    def _drain(self) -> bool:
        """(Under the lock) free the slots noted by release / release_later; when that leaves none
        booked, drop the tensors (keep_idle_s 0; returns whether it held any) or plan their drop."""
        while self._collected:
            start, rows = self._collected.popleft()
            for i in range(start, start + rows):
                self._used[i] = False
        if not self._used or any(self._used):
            return False
        self._used.clear()
        if self.keep_idle_s <= 0:
            return self._drop()
        if self._timer is None:
            self._timer = threading.Timer(self.keep_idle_s, self._drop_if_idle, args=(self._bookings,))
            self._timer.daemon = True
            self._timer.start()
        return False

    def _drop(self) -> bool:
        """(Under the lock, nothing booked) drop the tensors; whether it held any."""
        had = bool(self.k)
        self.k, self.v = [], []
        self.slots, self.capacity = self._initial
        self._high = 0
        return had

    def _dropped(self, had: bool) -> None:
        """(Outside the lock) after a drop: `on_drop`, where tensors went."""
        if had and self.on_drop is not None:
            self.on_drop()

    def _drop_if_idle(self, bookings: int) -> None:
        """The planned drop: void if a slot was booked since it was planned."""
        with self._lock:
            if self._bookings != bookings:
                return
            self._timer = None
            had = self._drop()
        self._dropped(had)

    def drop(self) -> bool:
        """Drop the tensors now if nothing is booked (else keep them); whether the pool now holds none."""
        with self._lock:
            had = self._drain()
            if any(self._used):
                return False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            had = self._drop() or had
        self._dropped(had)
        return True

    @property
    def booked(self) -> int:
        """One past the highest booked slot."""
        with self._lock:
            self._drain()
            return max((i + 1 for i, u in enumerate(self._used) if u), default=0)

    def ensure(self, layer: int, slots: int, length: int, like: torch.Tensor) -> None:
        """Make layer `layer`'s tensors (shaped after `like` [rows, kv_heads, T, head_dim]) and grow
        every layer's to at least `slots` slots and `length` positions."""
        while len(self.k) <= layer:
            self.k.append(None)
            self.v.append(None)
        if slots > self.slots or length > self.capacity:
            new_slots = max(self.slots, 1 << max(slots - 1, 0).bit_length())
            new_cap = max(self.capacity, length, 2 * self.capacity if length > self.capacity else 0)
            for i in range(len(self.k)):
                if self.k[i] is not None:
                    self.k[i], self.v[i] = (self._grown(t, new_slots, new_cap) for t in (self.k[i], self.v[i]))
            self.slots, self.capacity = new_slots, new_cap
        if self.k[layer] is None:
            shape = (self.slots, like.shape[1], self.capacity, like.shape[3])
            self.k[layer], self.v[layer] = self._new(like, shape), self._new(like, shape)
        self._high = max(self._high, length)

    def _new(self, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return like.new_empty(shape) if self._fill is None else like.new_full(shape, self._fill)

    def _grown(self, t: torch.Tensor, slots: int, capacity: int) -> torch.Tensor:
        """t in a larger tensor: only the positions written so far are copied (in a fresh pool of
        a long-lived server, a fraction of the old tensor)."""
        out = self._new(t, (slots, t.shape[1], capacity, t.shape[3]))
        out[: t.shape[0], :, : self._high] = t[:, :, : self._high]
        return out


class SlabLayer(DynamicLayer):
    """One layer of a SlabCache: its keys and values live in the pool, in the cache's slots."""

    def __init__(self, cache: SlabCache, index: int):
        super().__init__()
        self.cache, self.index, self.length = cache, index, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        c, pool = self.cache, self.cache.pool
        end = self.length + key_states.shape[-2]
        pool.ensure(self.index, pool.booked, end, key_states)
        rows = slice(c.start, c.start + c.rows)
        pool.k[self.index][rows, :, self.length:end] = key_states
        pool.v[self.index][rows, :, self.length:end] = value_states
        self.length = end
        return self.views()

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled part of this layer, [rows, kv_heads, length, head_dim] (views into the pool)."""
        c, pool = self.cache, self.cache.pool
        rows = slice(c.start, c.start + c.rows)
        return pool.k[self.index][rows, :, : self.length], pool.v[self.index][rows, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)

    def reset(self) -> None:
        self.length = 0
        super().reset()


class SlabCache(DynamicCache):
    """A cache of `rows` rows whose keys and values live in a KVPool's slots (see KVPool); to
    the model it is an ordinary transformers cache (each layer returns views of its slots)."""

    def __init__(self, pool: KVPool, rows: int):
        super().__init__()
        self.pool, self.rows = pool, rows
        self.start = pool.reserve(rows)
        self.layer_class_to_replicate = lambda: SlabLayer(self, len(self.layers))
        # the slots go back when the generation ends (release) or, at the latest, when the cache is
        # collected (its layers point back at it, so that can wait for the cycle collector)
        self._finalizer = weakref.finalize(self, pool.release_later, self.start, rows)

    def release(self) -> None:
        """Give the slots back now (once; later calls and the collector then do nothing)."""
        if self._finalizer.detach() is not None:
            self.pool.release(self.start, self.rows)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length if layer_idx < len(self.layers) else 0

    def layer(self, index: int) -> SlabLayer:
        while len(self.layers) <= index:
            self.layers.append(self.layer_class_to_replicate())
        return self.layers[index]

    def set_length(self, layers: int, length: int) -> None:
        """The first `layers` layers hold `length` positions (written into the pool by the caller)."""
        if layers > 0:
            self.layer(layers - 1)
        for layer in self.layers[:layers]:
            layer.length = length


__all__ = ["PreallocatedLayer", "PreallocatedCache", "KVPool", "SlabLayer", "SlabCache"]
