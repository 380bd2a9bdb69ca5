"""How samplers reach models: a tiny interface over row groups with KV caches.

Rows are numbered like the paper's models: row 0 is the reference pi_ref, rows 1..N the
preference models. A sampler works on *groups* of rows that advance together:

    "ref"    row 0 alone       (drafting, the `base` method)
    "prefs"  rows 1..N         (scoring a drafted chunk)
    "all"    rows 0..N         (token-level methods: every row in one forward)

A `Session` holds one KV cache per group for one generation. `logits(group, seq, n)` returns
the logits after the last n tokens of `seq`, feeding only what the cache lacks and rolling
back what it holds beyond the shared prefix (a rejected draft). Nothing else touches a
model, so a remote backend only has to implement `Backend` (new_cache, forward, crop).
"""

from __future__ import annotations

import inspect
import threading
from typing import Literal, Protocol, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from .errors import PersonamixError
from .onednn import pack_linears

Group = Literal["ref", "prefs", "all"]
GROUPS: tuple[str, ...] = ("ref", "prefs", "all")
BASE_ROW = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


class Backend(Protocol):
    names: tuple[str, ...]       # preference-model names, row i+1 = names[i]
    vocab_size: int
    max_length: int              # context length in tokens
    device: torch.device

    def new_cache(self, group: Group, names: Sequence[str]) -> object: ...

    def forward(self, group: Group, tokens: torch.Tensor, cache: object, n_logits: int,
                names: Sequence[str]) -> tuple[torch.Tensor, int]:
        """Logits [rows, n_logits, V] after the last n_logits of `tokens` (fed after what `cache`
        holds), and the number of model forward passes used. `names`: the preference models
        taking part (rows 1.. of the group, in that order)."""

    def crop(self, cache: object, n_remove: int) -> None: ...

    # optional: forward_together(calls: [(group, tokens, cache, n_logits)], names) -> ([logits], passes)
    # runs the calls of several groups in one forward (BatchingLoraBackend); Session.fuses checks for it


class Session:
    """KV caches of one generation, one per group, created on first use.

    `logits(group, seq, n)` is the only call samplers need: it returns the logits that follow
    each of the last n tokens of `seq`, reusing the group's cache for the longest prefix it
    shares with `seq` and rolling the rest back (`truncate`). So a rejected draft is undone by
    simply asking about the sequence without it; the prefix is never recomputed.
    """

    MEMO = 8   # logits kept per group for the latest positions (a draft's tail, reused after a rollback)

    def __init__(self, backend: Backend, names: Sequence[str] | None = None):
        self.backend = backend
        self.names = tuple(backend.names if names is None else names)
        unknown = [n for n in self.names if n not in backend.names]
        if unknown:
            raise PersonamixError(f"unknown preference model(s) {', '.join(unknown)}")
        self.forward_passes = 0
        self._caches: dict[str, object] = {}
        self._tokens: dict[str, list[int]] = {}
        # group -> {p: logits [rows, V] after the first p cached tokens}; valid while those stay cached
        self._memo: dict[str, dict[int, torch.Tensor]] = {}

    def cached(self, group: Group) -> list[int]:
        """The tokens whose keys/values the group's cache holds."""
        return self._tokens.get(group, [])

    def logits(self, group: Group, seq: Sequence[int], n_logits: int = 1) -> torch.Tensor:
        """Logits [rows, n_logits, V]: row r, column j predicts the token after seq[len(seq) - n_logits + j]."""
        return self.logits_together([(group, seq, n_logits)])[0]

    @property
    def fuses(self) -> bool:
        """Whether `logits_together` runs the requests of several groups in ONE forward."""
        return hasattr(self.backend, "forward_together")

    def logits_together(self, requests: Sequence[tuple[Group, Sequence[int], int]]) -> list[torch.Tensor]:
        """`logits` for several (group, seq, n_logits) of different groups; one forward for all
        when the backend can (`fuses`), else one per group."""
        if len({g for g, _, _ in requests}) != len(requests):
            raise ValueError("one request per group")
        out: list[torch.Tensor | None] = [None] * len(requests)
        todo = []        # (index, group, seq, new tokens, n_logits)
        for i, (group, seq, n_logits) in enumerate(requests):
            out[i] = self._from_cache(group, seq, n_logits)
            if out[i] is None:
                keep = len(self.cached(group))
                todo.append((i, group, seq, torch.tensor(seq[keep:], dtype=torch.long, device=self.backend.device),
                             n_logits))
        if not todo:
            return out
        for _, group, _, _, _ in todo:
            if group not in self._caches:
                self._caches[group] = self.backend.new_cache(group, self.names)
        if self.fuses and len(todo) > 1:
            logits, passes = self.backend.forward_together(
                [(g, new, self._caches[g], n) for _, g, _, new, n in todo], self.names)
        else:
            results = [self.backend.forward(g, new, self._caches[g], n, self.names) for _, g, _, new, n in todo]
            logits, passes = [r[0] for r in results], sum(r[1] for r in results)
        self.forward_passes += passes
        for (i, group, seq, _, n_logits), lg in zip(todo, logits):
            self._tokens[group] = list(seq)
            memo = self._memo.setdefault(group, {})
            for j, p in enumerate(range(len(seq) - n_logits + 1, len(seq) + 1)):
                memo[p] = lg[:, j]
            for p in sorted(memo)[:-self.MEMO]:
                del memo[p]
            out[i] = lg
        return out

    def _from_cache(self, group: Group, seq: Sequence[int], n_logits: int) -> torch.Tensor | None:
        """The logits if the memo has them (after rolling the cache back to `seq`); else None,
        with the cache rolled back to the longest prefix it shares with `seq` that leaves at
        least n_logits tokens to feed."""
        if group not in GROUPS:
            raise ValueError(f"unknown group {group!r}")
        if not 1 <= n_logits <= len(seq):
            raise ValueError(f"n_logits={n_logits} for a sequence of {len(seq)} tokens")
        if len(seq) > self.backend.max_length:
            raise PersonamixError(f"sequence of {len(seq)} tokens exceeds the model's context of "
                                  f"{self.backend.max_length} tokens")
        cached = self.cached(group)
        keep = min(len(cached), len(seq))
        if cached[:keep] != list(seq[:keep]):      # C-speed check first; then find the first mismatch
            keep = next(i for i, (a, b) in enumerate(zip(cached, seq)) if a != b)
        memo = self._memo.setdefault(group, {})
        wanted = range(len(seq) - n_logits + 1, len(seq) + 1)
        if keep == len(seq) and all(p in memo for p in wanted):
            self.truncate(group, keep)               # e.g. rolled back into a draft: logits already known
            return torch.stack([memo[p] for p in wanted], dim=1)
        self.truncate(group, min(keep, len(seq) - n_logits))
        return None

    def truncate(self, group: Group, length: int) -> None:
        """Roll the group's cache back to its first `length` tokens."""
        cached = self.cached(group)
        if not 0 <= length <= len(cached):
            raise ValueError(f"cannot truncate group {group!r} of length {len(cached)} to {length}")
        if length < len(cached):
            self.backend.crop(self._caches[group], len(cached) - length)
            self._tokens[group] = cached[:length]
            memo = self._memo.get(group, {})
            for p in [p for p in memo if p > length]:
                del memo[p]


def _cache_kwarg(model: PreTrainedModel) -> str:
    """The name under which this transformers version takes the KV cache (`cache` from 5.24 on,
    `past_key_values` before)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _model_facts(model: PreTrainedModel) -> tuple[int, int, torch.device, str]:
    """(vocab size, context length, device, cache kwarg name) shared by both backends."""
    text_config = model.config.get_text_config()
    return (int(text_config.vocab_size), int(getattr(text_config, "max_position_embeddings", 2048)),
            next(model.parameters()).device, _cache_kwarg(model))


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


def _crop(cache: DynamicCache, n_remove: int) -> None:
    # transformers 5: a negative argument removes that many positions from the end
    cache.crop(-n_remove)


class LoraBackend:
    """Reference + N LoRA adapters on one base model; every group runs as ONE batched forward
    with PEFT's `adapter_names=` (reference row = "__base__")."""

    def __init__(self, model: PreTrainedModel, names: Sequence[str]):
        self.model = model.eval()
        self.names = tuple(names)
        self.vocab_size, self.max_length, self.device, self._cache_kw = _model_facts(model)
        # PEFT passes adapter_names= through hooks registered on the shared modules for the
        # duration of a call, so two concurrent calls would see each other's rows: serialise.
        self._lock = threading.Lock()

    def new_cache(self, group: Group, names: Sequence[str]) -> DynamicCache:
        return PreallocatedCache()

    @torch.inference_mode()
    def forward(self, group: Group, tokens: torch.Tensor, cache: DynamicCache, n_logits: int,
                names: Sequence[str]) -> tuple[torch.Tensor, int]:
        if group == "ref" and not self.names:      # a plain model: no adapter machinery at all
            rows = None
        else:
            rows = {"ref": [BASE_ROW], "prefs": list(names), "all": [BASE_ROW, *names]}[group]
            if not rows:
                raise PersonamixError("no preference models take part")
        kwargs = {self._cache_kw: cache} if rows is None else {self._cache_kw: cache, "adapter_names": rows}
        ids = tokens.view(1, -1).expand(1 if rows is None else len(rows), -1)
        with self._lock:
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=n_logits, **kwargs)
        return out.logits, 1

    def crop(self, cache: DynamicCache, n_remove: int) -> None:
        _crop(cache, n_remove)


class SeparateModelsBackend:
    """Reference and N preference models as separate full models (the paper's setting):
    a group's forward runs each of its models once."""

    def __init__(self, ref: PreTrainedModel, prefs: Sequence[PreTrainedModel], names: Sequence[str],
                 onednn: bool = True):
        if len(prefs) != len(names):
            raise ValueError("one name per preference model")
        self.ref = ref.eval()
        self.prefs = {name: m.eval() for name, m in zip(names, prefs)}
        self.packed_linears = sum(pack_linears(m) for m in (ref, *prefs)) if onednn else 0
        self.names = tuple(names)
        self.vocab_size, self.max_length, self.device, self._cache_kw = _model_facts(ref)

    def _models(self, group: Group, names: Sequence[str]) -> list[PreTrainedModel]:
        prefs = [self.prefs[n] for n in names]
        return {"ref": [self.ref], "prefs": prefs, "all": [self.ref, *prefs]}[group]

    def new_cache(self, group: Group, names: Sequence[str]) -> list[DynamicCache]:
        return [PreallocatedCache() for _ in self._models(group, names)]

    @torch.inference_mode()
    def forward(self, group: Group, tokens: torch.Tensor, cache: list[DynamicCache], n_logits: int,
                names: Sequence[str]) -> tuple[torch.Tensor, int]:
        models = self._models(group, names)
        if not models:
            raise PersonamixError("no preference models take part")
        ids = tokens.view(1, -1)
        logits = [m(input_ids=ids, use_cache=True, logits_to_keep=n_logits, **{self._cache_kw: c}).logits
                  for m, c in zip(models, cache)]
        return torch.cat(logits, dim=0), len(models)

    def crop(self, cache: list[DynamicCache], n_remove: int) -> None:
        for c in cache:
            _crop(c, n_remove)
