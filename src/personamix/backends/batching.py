"""Cross-request batching: concurrent generations share one model forward per step.

Every generation runs its sampler in its own thread and calls `forward` as usual. A call that
arrives while a forward is running waits; the next forward runs every call that accumulated
meanwhile (continuous batching with no scheduler and no tuning knob: the batch is whatever
is waiting, so a lone request is never delayed). Rows of different calls keep their own KV
caches, of different lengths, and different numbers of new tokens (a one-token draft beside a
k-token chunk to score, or a prompt); all rows are packed into one sequence without padding,
every linear layer (the bulk of the cost) runs once over it, LoRA deltas included (the multi-LoRA
packed mode), and attention runs call by call on views of each call's own cache (a custom
attention function; no copies). A call that finds no company runs alone through the fast
backend's plain forward, so a single generation costs exactly what it costs on `fast`.

A row's logits equal what the call would get alone up to float rounding (matmuls over more
rows may round differently), so a seeded request is independent of its neighbours except
where two tokens tie to within that rounding.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ..engine.session import Backend, Group
from ..errors import PersonamixError, first_line
from .cache import PreallocatedCache
from .multilora import MultiLoraBackend

ATTENTION = "personamix_calls"


class BatchingUnsupported(PersonamixError):
    """This model's forward cannot be batched across calls (see check_batchable)."""


@dataclass(eq=False)
class Call:
    """One call of one generation: the rows of one group over the same new tokens."""

    tokens: torch.Tensor          # [T] new tokens, fed after what `cache` holds
    cache: object                 # the call's PreallocatedCache
    n_logits: int
    adapters: list[int]           # one per row: adapter index, -1 = reference (no delta)
    group: Group = "ref"
    names: tuple[str, ...] = ()
    logits: torch.Tensor | None = None
    error: BaseException | None = None
    mask: torch.Tensor | None = None   # [T, cached + T] causal mask (None when T == 1)

    @property
    def finished(self) -> bool:
        return self.logits is not None or self.error is not None


@dataclass(eq=False)
class _Batch:
    """The calls of one forward, packed into ONE sequence: call c's row r occupies positions
    offsets[c] + r*T_c ... + T_c - 1 (no padding). Handed to the model as its cache (`update`
    writes each call's new keys/values into that call's own cache) and to the attention
    function (`attend`)."""

    calls: list[Call]
    offsets: list[int] = field(default_factory=list)
    kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def _split(self, x: torch.Tensor, c: Call, o: int) -> torch.Tensor:
        """[1, heads, S, D] -> the call's [rows, heads, T, D] (a view)."""
        rows, t = len(c.adapters), len(c.tokens)
        return x[0, :, o: o + rows * t].unflatten(1, (rows, t)).transpose(0, 1)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.kv[layer_idx] = [c.cache.update(self._split(key_states, c, o), self._split(value_states, c, o), layer_idx)
                              for c, o in zip(self.calls, self.offsets)]
        return key_states, value_states   # unused: attention reads self.kv

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0   # positions are passed explicitly

    def attend(self, module, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention output [1, S, H, D] for the packed query [1, H, S, D]."""
        out = torch.empty_like(query)
        for c, o, (k, v) in zip(self.calls, self.offsets, self.kv[module.layer_idx]):
            q = self._split(query, c, o)
            self._split(out, c, o).copy_(F.scaled_dot_product_attention(
                q, k, v, attn_mask=c.mask, scale=scaling, enable_gqa=k.shape[1] != q.shape[1]))
        return out.transpose(1, 2)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, batch=None, **kwargs):
    if batch is None:   # a plain forward (one call alone): the model's usual SDPA attention
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    return batch.attend(module, query, module.scaling if scaling is None else scaling), None


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)   # plain forwards get SDPA's masks
_PACKED = torch.ones(1, 1, 1, 1, dtype=torch.bool)       # a 4D "mask" the model passes through untouched:
                                                         # packed calls mask themselves (_Batch.attend)


def forward_calls(model: PreTrainedModel, calls: list[Call]) -> None:
    """One forward of the model over the rows of all `calls`, packed into one sequence (each
    row at its own positions); sets each call's logits [rows, n_logits, V] and appends its new
    keys/values to its cache. The model's attention implementation must be ATTENTION and the
    LoRA row state (if any) set by the caller (see token_adapters)."""
    dev = next(model.parameters()).device
    batch = _Batch(calls)
    ids, pos, keep, o = [], [], [], 0
    for c in calls:
        past = c.cache.get_seq_length()
        rows, t = len(c.adapters), len(c.tokens)
        if t > 1:   # bottom-right causal: new token i sees the past and new tokens 0..i
            c.mask = torch.ones(t, past + t, dtype=torch.bool, device=dev).tril(past)
        ids.append(c.tokens.repeat(rows))
        pos.append((past + torch.arange(t, device=dev)).repeat(rows))
        keep.append((o + torch.arange(rows, device=dev).view(-1, 1) * t
                     + torch.arange(t - c.n_logits, t, device=dev)).view(-1))
        batch.offsets.append(o)
        o += rows * t
    hidden = model.get_decoder()(input_ids=torch.cat(ids).view(1, -1), position_ids=torch.cat(pos).view(1, -1),
                                 attention_mask=_PACKED, cache=batch, batch=batch,
                                 use_cache=True).last_hidden_state[0]                          # [S, d]
    logits = model.get_output_embeddings()(hidden.index_select(0, torch.cat(keep)))
    start = 0
    for c in calls:
        n = len(c.adapters) * c.n_logits
        c.logits = logits[start: start + n].view(len(c.adapters), c.n_logits, -1)
        start += n


def token_adapters(calls: list[Call]) -> list[int]:
    """The adapter of every position of the packed sequence (-1: reference)."""
    return [a for c in calls for a in c.adapters for _ in range(len(c.tokens))]


@torch.inference_mode()
def check_batchable(model: PreTrainedModel) -> None:
    """Raise BatchingUnsupported unless `forward_calls` reproduces this model's own forward:
    two calls of different lengths, then a multi-token call over a cached prefix, compared with
    one plain forward. Leaves the model as it was."""
    cfg = model.config.get_text_config()
    for attr in ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, attr, None):
            raise BatchingUnsupported(f"cross-request batching does not support {attr} ({type(model).__name__})")
    dev = next(model.parameters()).device
    ids = torch.arange(12, device=dev) * 7 % int(cfg.vocab_size)
    expected = model(input_ids=ids.view(1, -1)).logits[0]                           # [12, V]
    previous = model.config._attn_implementation
    problem = None
    try:
        model.set_attn_implementation(ATTENTION)
        plain = model(input_ids=ids.view(1, -1)).logits[0]
        a, b = Call(ids[:8], PreallocatedCache(), 1, [-1]), Call(ids[:5], PreallocatedCache(), 2, [-1])
        forward_calls(model, [a, b])
        c = Call(ids[8:], a.cache, 4, [-1])
        forward_calls(model, [c, Call(ids[5:6], b.cache, 1, [-1])])
        got = torch.cat([a.logits[0], b.logits[0], c.logits[0], plain])
        want = torch.cat([expected[7:8], expected[3:5], expected[8:12], expected])
        tol = 1e-4 if expected.dtype == torch.float32 else 5e-2
        if not torch.allclose(got.float(), want.float(), atol=tol, rtol=tol):
            problem = f"logits differ by {(got.float() - want.float()).abs().max().item():.2g}"
    except Exception as e:   # any failure means: not batchable
        problem = f"{type(e).__name__}: {first_line(e)}"
    finally:
        model.set_attn_implementation(previous)
    if problem:
        raise BatchingUnsupported(f"cross-request batching does not reproduce {type(model).__name__}'s "
                                  f"forward ({problem})")


class BatchingBackend(Backend):
    """backend="batched": the multi-LoRA backend, with concurrent `forward` calls (one per
    generation thread) run as ONE forward of the base model (see the module docstring). Takes
    over the model's attention implementation: use the model through this backend only.
    `forwards` / `calls` count model forwards and the calls they served (calls / forwards = mean
    batch size)."""

    kind = "batched"
    fuses_groups = True
    shares_forwards = True

    def __init__(self, model: PreTrainedModel, adapters: dict[str, str], onednn: bool = True):
        check_batchable(model)   # before attaching anything: a refusal leaves the model untouched
        self.lora = MultiLoraBackend(model, adapters, onednn)
        self.model = model
        self.names, self.vocab_size = self.lora.names, self.lora.vocab_size
        self.max_length, self.device = self.lora.max_length, self.lora.device
        self.packed_linears = self.lora.packed_linears
        model.set_attn_implementation(ATTENTION)
        self._queue: list[Call] = []           # calls waiting for the next forward
        self._running = False                  # a thread is running a forward (or `paused` holds them)
        self._turn = threading.Condition()     # guards both; notified when a forward ends
        self.forwards = self.calls = 0

    def new_cache(self, group: Group, names: Sequence[str]) -> PreallocatedCache:
        return self.lora.new_cache(group, names)

    def crop(self, cache: PreallocatedCache, n_remove: int) -> None:
        self.lora.crop(cache, n_remove)

    def forward(self, group: Group, tokens: torch.Tensor, cache, n_logits: int,
                names: Sequence[str]) -> tuple[torch.Tensor, int]:
        logits, passes = self.forward_together([(group, tokens, cache, n_logits)], names)
        return logits[0], passes

    def forward_together(self, requests: Sequence[tuple[Group, torch.Tensor, object, int]],
                         names: Sequence[str]) -> tuple[list[torch.Tensor], int]:
        """Several calls of one generation (different groups, e.g. SCR's chunk scoring and its
        next draft step) in the same forward, shared with other generations' waiting calls."""
        calls = [self.call(*r, names) for r in requests]
        with self._turn:
            self._queue.extend(calls)          # all at once: they always land in the same forward
            while self._running and not calls[0].finished:
                self._turn.wait()
            lead = not calls[0].finished       # the model is free: run every call that waits, ours included
            if lead:
                self._running = True
                batch, self._queue = self._queue, []
        if lead:
            try:
                self.run(batch)
            finally:
                with self._turn:
                    self._running = False
                    self._turn.notify_all()
        for c in calls:
            if c.error is not None:
                raise c.error
        return [c.logits for c in calls], 1

    def call(self, group: Group, tokens: torch.Tensor, cache, n_logits: int, names: Sequence[str]) -> Call:
        """A Call for `run` (what forward_together queues)."""
        if group != "ref" and not names:
            raise PersonamixError("no preference models take part")
        if not 1 <= n_logits <= len(tokens):
            raise ValueError(f"n_logits={n_logits} for {len(tokens)} new tokens")
        return Call(tokens, cache, n_logits, self.lora.row_adapters(group, names), group, tuple(names))

    @torch.inference_mode()
    def run(self, calls: list[Call]) -> None:
        """One forward over `calls` (of any generations): sets each call's logits, or its error.
        The caller makes sure no other forward runs meanwhile (forward_together does)."""
        try:
            if len(calls) == 1:   # alone: exactly the fast backend's forward
                c = calls[0]
                c.logits = self.lora.forward_call(c.group, c.tokens, c.cache, c.n_logits, c.names)
            else:
                with self.lora.packed_rows(token_adapters(calls)):
                    forward_calls(self.model, calls)
            self.forwards += 1
            self.calls += len(calls)
        except BaseException as e:   # every call of the batch learns of it (their caches are now unusable)
            for c in calls:
                c.error = e

    @property
    def waiting(self) -> int:
        """Calls queued for the next forward."""
        with self._turn:
            return len(self._queue)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No forward starts inside the block: calls queue up and run together after it (for tests
        and benchmarks that want full batches)."""
        with self._turn:
            while self._running:
                self._turn.wait()
            self._running = True
        try:
            yield
        finally:
            with self._turn:
                self._running = False
                self._turn.notify_all()


__all__ = ["BatchingBackend", "BatchingUnsupported", "Call", "check_batchable", "forward_calls", "ATTENTION"]
