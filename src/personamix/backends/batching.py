"""Cross-request batching: concurrent generations share one model forward per step.

Every generation runs its sampler in its own thread and calls `forward` as usual. A call that
arrives while a forward is running waits; the next forward runs every call that accumulated
meanwhile (continuous batching with no scheduler thread). Before it starts, the thread that
runs it waits, for at most `gather_wait` times a forward's duration, until the generations
served by the previous forward have queued their next call: without that wait, concurrent
generations split into two cohorts that take turns (one in its forward while the other runs
its samplers), and every forward carries half of them (docs/batching.md, "Gathering"). A
generation that is alone, or whose thread has queued its call, is never waited for.

All rows are packed into one sequence without padding (a one-token draft beside a k-token
chunk to score, or a prompt); every linear layer (the bulk of the cost) runs once over it,
LoRA deltas included (the multi-LoRA packed mode), through the decoder's layers as one plain
function (decoder.py) where the model is of Llama's shape.

Keys and values of every generation in flight live in ONE pool per layer (cache.KVPool,
[slots, kv_heads, capacity, head_dim]; a generation's group owns a slot per row), so attention
runs for all short calls (decoding steps and chunks, up to SHORT new tokens) at once per
layer over the pool's slots in use (on CPU two batched matmuls, elsewhere one SDPA call), each
row masked to its own length (causal within its new tokens); long calls (prompts) attend call by call on
views of their slots. What the mask and the index maps of a forward need is built once per
forward, not per layer. A call that finds no company takes the same packed path where short
calls attend in the CPU kernel (its plain decoder, kernels and columns-only output layer make a
lone step ~1.2x faster than the model's own forward there, docs/batching.md "A call alone");
elsewhere (GPU, PyTorch's attention) it runs through the multi-LoRA backend's forward (its cache
an ordinary transformers cache over its slots), exactly as on `fast`.

Around the forward: generation threads do their own tensor work on one core and the thread that
runs a forward runs it on all of them, one OpenMP team at a time (omp.py); on CPU the generation
threads run their work between forwards one at a time (turns.py), not interleaved op by op; optionally
(`cache_prefixes`, on in `personamix serve`) prompt prefixes' keys/values are kept across
generations and restored into a prompt's slots before its forward (prefix_cache.py).

A row's logits equal what the call would get alone up to float rounding (matmuls over more rows,
and attention over a padded region, may round differently), so a seeded request is independent
of its neighbours except where two tokens tie to within that rounding.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ..engine.draws import Draw, Drawn, draw_next
from ..engine.scoring import Score, Scored, score_chunks
from ..engine.session import Backend, Group
from ..errors import PersonamixError, first_line
from . import cpu_attention, omp
from .cache import KVPool, SlabCache
from .cpu_attention import AttentionRows, attention_problem, rows_of
from .cpu_pointwise import KernelOps, pointwise_problem
from .cuda_graphs import StaticSteps
from .decoder import PackedDecoder, TorchOps, packed_decoder
from .multilora import MultiLoraBackend
from .prefix_cache import PrefixCache
from .turns import Turns

ATTENTION = "personamix_calls"
#: calls with at most this many new tokens attend together in one call per layer; longer ones
#: (prompts) alone, so a prompt does not pad every decoding step to its length
SHORT = 8
#: how short calls attend on CPU: "kernel" (cpu_attention.py: one AVX2 kernel call per layer, each
#: row over its own slot and length, where attention_problem allows; "grouped" elsewhere), "grouped"
#: (two batched matmuls over padded queries and a mask, _Batch._grouped_attention: faster than
#: SDPA's flash kernel at every mix and context tried) or "sdpa" (what GPUs run). Measured by
#: bench/attention_mix.py (docs/bench/attention_mix.md). Environment: PERSONAMIX_CPU_ATTENTION
CPU_ATTENTION = os.environ.get("PERSONAMIX_CPU_ATTENTION", "kernel")
if CPU_ATTENTION not in ("kernel", "grouped", "sdpa"):
    raise PersonamixError(f"PERSONAMIX_CPU_ATTENTION={CPU_ATTENTION!r}: expected kernel, grouped or sdpa")
#: BatchingBackend's default gather_wait (see there); measured in docs/batching.md ("Gathering")
GATHER_WAIT = 1.0
#: BatchingBackend's default keep_idle_s: how long an idle KV pool keeps its tensors (cache.KVPool);
#: measured in docs/batching.md ("Keeping the pool between bursts")
KEEP_IDLE_S = 10.0
#: a generation's turn between forwards (turns.py) lasts at most this many forwards' durations
TURN_LIMIT = 0.5


class BatchingUnsupported(PersonamixError):
    """This model's forward cannot be batched across calls (see check_batchable)."""


@dataclass(eq=False)
class Call:
    """One call of one generation: the rows of one group over the same new tokens."""

    tokens: torch.Tensor          # [T] new tokens, fed after what `cache` holds
    cache: SlabCache              # the call's slots in the pool
    n_logits: int
    adapters: list[int]           # one per row: adapter index, -1 = reference (no delta)
    group: Group = "ref"
    names: tuple[str, ...] = ()
    logits: torch.Tensor | None = None
    error: BaseException | None = None
    prompt: list[int] | None = None  # a call over an empty cache: its tokens, for the prefix cache
    thread: int | None = None        # the thread that queued it (forward_together)
    columns: torch.Tensor | None = None  # logits at these vocabulary ids only (Backend.restricts_columns)
    draw: Draw | None = None         # the next token is drawn in the forward (Backend.forward_draw)
    drawn: Drawn | None = None
    score: Score | None = None       # SCR's chunk is scored in the forward (forward_score)
    scored: Scored | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or (self.logits is not None and (self.draw is None or self.drawn is not None)
                                          and (self.score is None or self.scored is not None))


class _Batch:
    """The calls of one forward, packed into ONE sequence: call c's row r occupies positions
    offsets[c] + r*T_c ... + T_c - 1 (no padding). Handed to the model as its cache (`update`
    writes every call's new keys/values into the pool in one indexed copy per layer) and to
    the attention function (`attend`). Index maps and the mask are built once, in __init__."""

    def __init__(self, calls: list[Call], pool: KVPool, device: torch.device, kernel: bool = False):
        self.calls, self.pool, self.device = calls, pool, device
        self.booked = pool.booked                 # slots in use: read once per forward, not per layer
        pasts = [c.cache.get_seq_length() for c in calls]
        lens = [c.tokens.shape[0] for c in calls]         # new tokens per call (len() of a tensor is slow)
        self.pasts, self.lens = pasts, lens
        self.layers = 0                                    # layers written so far (update)
        offsets, slot, pos, packed, o = [], [], [], [], 0
        for c, past, t in zip(calls, pasts, lens):
            rows = len(c.adapters)
            offsets.append(o)
            for r in range(rows):
                slot += [c.cache.start + r] * t
                pos += range(past, past + t)
            packed += range(o, o + rows * t)
            o += rows * t
        self.offsets = offsets
        self.slot = torch.tensor(slot, device=device)            # [S] the pool slot of each packed position
        self.pos = torch.tensor(pos, device=device)              # [S] its position in the sequence
        self.length = max(p + t for p, t in zip(pasts, lens))
        self.short = [i for i, t in enumerate(lens) if t <= SHORT]
        self.long = [i for i, t in enumerate(lens) if t > SHORT]
        self.kernel_rows: AttentionRows | None = None      # the short rows' maps for cpu_attention
        if self.short and kernel:
            self.kernel_rows = rows_of((calls[i].cache.start + r, pasts[i], lens[i])
                                       for i in self.short for r in range(len(calls[i].adapters)))
            if self.long:
                self.src = torch.tensor([self.offsets[i] + j for i in self.short
                                         for j in range(len(calls[i].adapters) * lens[i])], device=device)
        elif self.short:
            self._short_maps(calls, pasts, lens)

    def _short_maps(self, calls: list[Call], pasts: list[int], lens: list[int]) -> None:
        """For the short calls: the pool slots their attention reads (the region from their first
        to their last slot, a view, or, when their rows fill less than half of it, just their own
        slots, gathered), where their queries go in a padded [slots, heads, T, D] query, and the
        mask over those slots (own length, causal)."""
        cs = [calls[i] for i in self.short]
        lo = min(c.cache.start for c in cs)
        hi = max(c.cache.start + c.cache.rows for c in cs)
        rows = sum(c.cache.rows for c in cs)
        # other generations' slots between theirs (those busy in their samplers, freed ones) would
        # otherwise cost attention work: at 16 clients the calls' own rows were 30% of the region
        # (docs/batching.md); a gather copies their keys/values, which costs more than it saves
        # once they fill most of the region
        self.region = slice(lo, hi) if 2 * rows > hi - lo else None
        order = {}                                             # pool slot -> index into the slots read
        if self.region is None:
            for c in cs:
                for r in range(c.cache.rows):
                    order[c.cache.start + r] = len(order)
            self.gather = torch.tensor(list(order), device=self.device)
        n = hi - lo if self.region is not None else len(order)
        self.t_max = max(lens[i] for i in self.short)
        self.l_max = max(pasts[i] + lens[i] for i in self.short)
        dst_slot, dst_t, src = [], [], []
        limit = [[1] * self.t_max for _ in range(n)]          # keys each query may see (>= 1)
        for i in self.short:
            c, past, o, t = calls[i], pasts[i], self.offsets[i], lens[i]
            for r in range(len(c.adapters)):
                s = c.cache.start + r - lo if self.region is not None else order[c.cache.start + r]
                dst_slot += [s] * t
                dst_t += range(t)
                src += range(o + r * t, o + (r + 1) * t)
                limit[s][:t] = range(past + 1, past + t + 1)            # bottom-right causal
        limit = torch.tensor(limit)                                     # [n, t_max], built in Python: one op
        self.n_slots = n
        self.dst_slot = torch.tensor(dst_slot, device=self.device)
        self.dst_t = torch.tensor(dst_t, device=self.device)
        self.src = torch.tensor(src, device=self.device)
        keys = torch.arange(self.l_max)
        self.mask = (keys.view(1, 1, 1, -1) < limit.view(n, 1, self.t_max, 1)).to(self.device)
        self.bias = None     # the mask as an additive bias for _grouped_attention, built at its first layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Write the new keys/values [1, kv_heads, S, D] of every call into the pool."""
        pool = self.pool
        k, v = key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)        # [S, kv_heads, D]
        pool.ensure(layer_idx, self.booked, self.length, key_states)
        pool.k[layer_idx][self.slot, :, self.pos] = k
        pool.v[layer_idx][self.slot, :, self.pos] = v
        self.layers = max(self.layers, layer_idx + 1)
        return key_states, value_states   # unused: attention reads the pool

    def commit(self) -> None:
        """After the forward: every call's cache holds its new tokens in every layer written (set
        once here, not per layer: at 64 calls that loop was ~2,000 Python steps per forward)."""
        for c, past, t in zip(self.calls, self.pasts, self.lens):
            c.cache.set_length(self.layers, past + t)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0   # positions are passed explicitly

    def attend(self, module, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention output [1, S, H, D] for the packed query [1, H, S, D]."""
        i = module.layer_idx
        kp, vp = self.pool.k[i], self.pool.v[i]
        gqa = kp.shape[1] != query.shape[1]
        if self.kernel_rows is not None:   # every short row over its own slot and length, in one kernel call
            mine = query[0] if not self.long else query[0, :, self.src]                        # [H, S', D]
            o = cpu_attention.attend(mine, kp, vp, self.kernel_rows, scaling)                  # [S', H, D]
            if not self.long:
                return o.unsqueeze(0)
            out = torch.empty_like(query)
            out[0, :, self.src] = o.transpose(0, 1)
        elif self.short:   # every short call in one call: their slots, padded queries, own-length masks
            # without long calls the short ones' positions are all of them, in order (src = 0..S-1)
            mine = query[0].transpose(0, 1) if not self.long else query[0, :, self.src].transpose(0, 1)   # [S', H, D]
            q = query.new_zeros(self.n_slots, query.shape[1], self.t_max, query.shape[3])
            q[self.dst_slot, :, self.dst_t] = mine
            if self.region is not None:
                k, v = kp[self.region, :, :self.l_max], vp[self.region, :, :self.l_max]
            else:
                k = kp[:, :, :self.l_max].index_select(0, self.gather)
                v = vp[:, :, :self.l_max].index_select(0, self.gather)
            if q.device.type == "cpu" and CPU_ATTENTION != "sdpa":
                o = self._grouped_attention(q, k, v, scaling)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scaling, enable_gqa=gqa)
            if not self.long:
                return o[self.dst_slot, :, self.dst_t].unsqueeze(0)                  # [1, S, H, D], in order
            out = torch.empty_like(query)
            out[0, :, self.src] = o[self.dst_slot, :, self.dst_t].transpose(0, 1)
        else:
            out = torch.empty_like(query)
        for j in self.long:
            c, past, off, t = self.calls[j], self.pasts[j], self.offsets[j], self.lens[j]
            rows = len(c.adapters)
            q = query[0, :, off: off + rows * t].unflatten(1, (rows, t)).transpose(0, 1)   # [rows, H, T, D]
            mask = torch.ones(t, past + t, dtype=torch.bool, device=query.device).tril(past)
            slots = slice(c.cache.start, c.cache.start + rows)
            o = F.scaled_dot_product_attention(q, kp[slots, :, :past + t], vp[slots, :, :past + t], attn_mask=mask,
                                               scale=scaling, enable_gqa=gqa)
            out[0, :, off: off + rows * t] = o.transpose(0, 1).flatten(1, 2)
        return out.transpose(1, 2)

    def _grouped_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
        """softmax(q k^T * scaling + mask) v for q [n, H, T, D] over k, v [n, KV, L, D] (H = g * KV
        query heads, head h reading KV head h // g), as two batched matmuls: the g query heads of a
        KV head are stacked along the query axis ([n, KV, g*T, D]), so K/V are read as they lie.
        On CPU this is 2-3x faster than SDPA's flash kernel for 4-token chunks and ~15% for single
        tokens (docs/batching.md)."""
        n, h, t, d = q.shape
        kv = k.shape[1]
        if self.bias is None:      # the mask as an additive bias, once per forward: [n, 1, g*T, L]
            self.bias = torch.zeros(self.mask.shape, dtype=torch.float32, device=q.device)
            self.bias.masked_fill_(~self.mask, float("-inf"))
            self.bias = self.bias.repeat(1, 1, h // kv, 1)
        scores = torch.matmul(q.reshape(n, kv, h // kv * t, d), k.transpose(-1, -2))   # [n, KV, g*T, L]
        scores = scores.float().mul_(scaling).add_(self.bias)                           # softmax in fp32
        return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v).view(n, h, t, d)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, batch=None, **kwargs):
    if batch is None:   # a plain forward (one call alone): the model's usual SDPA attention
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    return batch.attend(module, query, module.scaling if scaling is None else scaling), None


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)   # plain forwards get SDPA's masks
_PACKED = torch.ones(1, 1, 1, 1, dtype=torch.bool)       # a 4D "mask" the model passes through untouched:
                                                         # packed calls mask themselves (_Batch.attend)


def head_dim(model: PreTrainedModel) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def uses_attention_kernel(model: PreTrainedModel) -> bool:
    """Whether packed forwards of `model` run their short calls' attention in cpu_attention's
    kernel (CPU_ATTENTION "kernel", and nothing in attention_problem): then attention reads only
    positions its rows wrote, and the pool need not be zeroed (KVPool.fill)."""
    dev = next(model.parameters()).device
    return (dev.type == "cpu" and CPU_ATTENTION == "kernel"
            and attention_problem(model.dtype, dev, head_dim(model)) is None)


def forward_calls(model: PreTrainedModel, calls: list[Call], pool: KVPool,
                  decoder: PackedDecoder | None = None) -> None:
    """One forward of the model over the rows of all `calls`, packed into one sequence (each
    row at its own positions); sets each call's logits [rows, n_logits, V] (V: its `columns` only,
    when it has them) and appends its new
    keys/values to its slots in `pool`. The model's attention implementation must be ATTENTION
    and the LoRA row state (if any) set by the caller (see token_adapters). `decoder`: the
    decoder's forward as a plain function (decoder.py; None: the model's own)."""
    dev = next(model.parameters()).device
    kernel = uses_attention_kernel(model)
    if pool.fill is None and not kernel:
        raise PersonamixError(f"a KV pool left uninitialised (fill=None) is read by the CPU attention kernel only; "
                              f"this forward's short calls attend by {CPU_ATTENTION!r} on {dev.type}, which reads "
                              "positions no row wrote")
    batch = _Batch(calls, pool, dev, kernel=kernel)
    ids, keep, o = [], [], 0
    for c, t in zip(calls, batch.lens):
        rows = len(c.adapters)
        ids.append(c.tokens.repeat(rows))
        keep += [o + r * t + j for r in range(rows) for j in range(t - c.n_logits, t)]
        o += rows * t
    if decoder is not None:
        hidden = decoder(torch.cat(ids), batch.pos, batch)                                     # [S, d]
    else:
        hidden = model.get_decoder()(input_ids=torch.cat(ids).view(1, -1), position_ids=batch.pos.view(1, -1),
                                     attention_mask=_PACKED, cache=batch, batch=batch,
                                     use_cache=True).last_hidden_state[0]                      # [S, d]
    batch.commit()
    hidden = hidden.index_select(0, torch.tensor(keep, device=dev))                       # [K, d]
    head = model.get_output_embeddings()
    weight = output_weight(model) if any(c.columns is not None for c in calls) else None
    spans, start = [], 0                     # each call's rows in `hidden`
    for c in calls:
        spans.append((start, len(c.adapters) * c.n_logits))
        start += spans[-1][1]
    whole = [i for i, c in enumerate(calls) if weight is None or c.columns is None]
    if whole:   # the output layer over the vocabulary once, for every call that wants (or gets) it all
        rows = [r for i in whole for r in range(spans[i][0], sum(spans[i]))]
        logits, start = head(hidden if len(rows) == len(hidden) else hidden[rows]), 0
        for i in whole:
            c, n = calls[i], spans[i][1]
            c.logits = logits[start: start + n].view(len(c.adapters), c.n_logits, -1)
            start += n
    for i, c in enumerate(calls):
        if c.columns is None:
            continue
        if weight is None:   # no plain weight to take rows of: the whole logits, indexed
            c.logits = c.logits.index_select(-1, c.columns)
        else:                # the output layer over the call's columns only: [rows * n, d] x [U, d]^T
            w, b = weight
            s, n = spans[i]
            c.logits = F.linear(hidden[s: s + n], w.index_select(0, c.columns),
                                None if b is None else b.index_select(0, c.columns)).view(
                len(c.adapters), c.n_logits, -1)


def output_weight(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The output layer's plain weight [V, d] and bias, or None where only a packed copy exists
    (onednn.PackedLinear keeps the reordered weight alone; a model whose output layer is tied to its
    input embeddings still has that one)."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight, bias
    emb = model.get_input_embeddings().weight
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False) and \
            emb.shape == (getattr(head, "out_features", None), getattr(head, "in_features", None)):
        return emb, bias
    return None


def _joined(blocks: list[torch.Tensor], n: int) -> torch.Tensor:
    """A row's cached blocks [layers, kv_heads, length_i, D] end to end, its first n positions."""
    x = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)
    return x[:, :, :n]


def token_adapters(calls: list[Call]) -> list[int]:
    """The adapter of every position of the packed sequence (-1: reference)."""
    return [a for c in calls for a in c.adapters for _ in range(c.tokens.shape[0])]


@torch.inference_mode()
def probe_calls(model: PreTrainedModel, ids: torch.Tensor, rows: list[int], decoder: PackedDecoder | None = None,
                packed_rows=None) -> list[Call]:
    """The load-time probes' two packed forwards over a fresh pool: a long call (`rows`: the adapter
    of each row) beside a short one of the reference, then both again over what they cached (two
    short calls); the four calls, their logits set. `packed_rows`: the LoRA row state's context
    (MultiLoraBackend.packed_rows), None for a model without adapters."""
    pool = KVPool(slots=len(rows) + 1, capacity=4)                                   # grows on the way
    a, b = Call(ids[:SHORT + 1], SlabCache(pool, len(rows)), 1, rows), Call(ids[:5], SlabCache(pool, 1), 2, [-1])
    c, d = Call(ids[SHORT + 1:], a.cache, 3, rows), Call(ids[5:6], b.cache, 1, [-1])
    for calls in ([a, b], [c, d]):
        with packed_rows(token_adapters(calls)) if packed_rows else nullcontext():
            forward_calls(model, calls, pool, decoder)
    return [a, b, c, d]


def check_batchable(model: PreTrainedModel) -> None:
    """Raise BatchingUnsupported unless `forward_calls` reproduces this model's own forward:
    a long and a short call of different lengths, then short calls over their cached prefixes,
    compared with one plain forward. Leaves the model as it was.

    "Reproduces" is judged against the model's own rounding: the logits of the first positions
    computed again over a shorter input (the same math, other matmul shapes) move by `noise`,
    which in bf16 on a 30-layer model is ~0.6 (the default model's logits, std 3.3), while a
    packed forward that put one position wrong moves them by several units (max ~19)."""
    cfg = model.config.get_text_config()
    for attr in ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, attr, None):
            raise BatchingUnsupported(f"cross-request batching does not support {attr} ({type(model).__name__})")
    dev = next(model.parameters()).device
    n = SHORT + 4
    ids = torch.arange(n, device=dev) * 7 % int(cfg.vocab_size)
    expected = model(input_ids=ids.view(1, -1)).logits[0]                           # [n, V]
    alone = model(input_ids=ids[:SHORT + 1].view(1, -1)).logits[0]                  # [SHORT+1, V]
    noise = (alone.float() - expected[:SHORT + 1].float()).abs().max().item()
    previous = model.config._attn_implementation
    problem = None
    try:
        model.set_attn_implementation(ATTENTION)
        plain = model(input_ids=ids.view(1, -1)).logits[0]
        a, b, c, _ = probe_calls(model, ids, [-1])
        got = torch.cat([a.logits[0], b.logits[0], c.logits[0], plain])
        want = torch.cat([expected[SHORT:SHORT + 1], expected[3:5], expected[SHORT + 1:], expected])
        tol = 1e-4 if expected.dtype == torch.float32 else 5e-2
        if not torch.allclose(got.float(), want.float(), atol=tol + 2 * noise, rtol=tol):
            problem = (f"logits differ by {(got.float() - want.float()).abs().max().item():.2g}; this dtype's "
                       f"rounding alone moves them by {noise:.2g}")
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
    batch size); `row_tokens` the tokens they computed, each row counted (`prompt_row_tokens` of
    them in calls over an empty cache, after any cached prefix); `busy_s` / `waited_s` are the
    seconds spent in forwards and waiting for company before them.

    gather_wait: how long the thread about to run a forward may wait for the generations the
    previous forward served to queue again, in multiples of a forward's recent duration (0: start
    at once with whatever is queued). Waiting longer than a forward is never worth it: a
    generation that misses this forward gets the next one.

    take_turns: generation threads run their own work between forwards one at a time (turns.py),
    each for at most TURN_LIMIT forwards' durations; None: on CPU, where it was measured
    (docs/batching.md, "Taking turns"). `turns.taken_over` counts turns that ran past the limit.

    plain_decoder: run packed forwards through the decoder as a plain function over the model's
    layers (decoder.py: the same ops without transformers' per-layer Python, 1.05-1.08x per
    forward on CPU) where the model is of its Llama shape and a load-time probe finds the same
    logits; `decoder` is None where the model's own forward runs instead. On CPU its pointwise
    steps run in AVX2 kernels where those pass the probe too (`decoder.ops`, cpu_pointwise.py).

    keep_idle_s: how long the KV pool keeps its tensors once no generation is in flight, so that
    the next burst writes into memory already mapped instead of faulting in every page anew
    (cache.KVPool; 0: drop them at once). `pool.on_drop` may be set to trim the C heap after.

    cuda_graphs: run decoding steps (every call of a forward at most SHORT new tokens) as CUDA
    graph replays, one graph per padded shape (cuda_graphs.py); None: on a CUDA device. True
    elsewhere runs the same padded steps eagerly (what the tests compare). `graphs` (None when
    off) counts its replays and captures."""

    kind = "batched"
    fuses_groups = True
    shares_forwards = True
    restricts_columns = True

    def __init__(self, model: PreTrainedModel, adapters: dict[str, str], onednn: bool = True,
                 gather_wait: float = GATHER_WAIT, cuda_graphs: bool | None = None,
                 take_turns: bool | None = None, plain_decoder: bool = True, keep_idle_s: float = KEEP_IDLE_S):
        for name, value in (("gather_wait", gather_wait), ("keep_idle_s", keep_idle_s)):
            if not 0 <= value < float("inf"):
                raise PersonamixError(f"{name} must be a finite number >= 0, got {value}")
        check_batchable(model)   # before attaching anything: a refusal leaves the model untouched
        self.lora = MultiLoraBackend(model, adapters, onednn)
        self.model = model
        self.names, self.vocab_size = self.lora.names, self.lora.vocab_size
        self.max_length, self.device, self.dtype = self.lora.max_length, self.lora.device, self.lora.dtype
        self.packed_linears, self.linear_kernel = self.lora.packed_linears, self.lora.linear_kernel
        model.set_attn_implementation(ATTENTION)
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        # every generation's keys and values (cache.KVPool); not zeroed where only what was written is
        # read (not so in CUDA graphs' padded steps)
        self.pool = KVPool(fill=None if uses_attention_kernel(model) and not cuda_graphs else 0.0,
                           keep_idle_s=keep_idle_s)
        self.decoder = self._packed_decoder() if plain_decoder else None
        omp.release_team()                     # the probe's forwards gave this thread a team: one at a time
        self._queue: list[Call] = []           # calls waiting for the next forward
        self._running = False                  # a thread is running a forward (or `paused` holds them)
        lock = threading.RLock()
        self._turn = threading.Condition(lock)  # guards both; notified when a forward ends
        # the thread about to run a forward waits on this one for the others' calls (same lock), so
        # an arrival wakes that thread only, not every thread waiting for its forward
        self._arrivals = threading.Condition(lock)
        self.forwards = self.calls = self.row_tokens = self.prompt_row_tokens = 0
        self.busy_s = self.waited_s = 0.0
        self.prefix_cache: PrefixCache | None = None
        self.gather_wait = gather_wait
        #: draw SCR's next draft step in its chunk's scoring forward (forward_score's `ahead`); False:
        #: in the generation's turn, as without it (the same tokens; benchmarks compare the two)
        self.draws_ahead = True
        self._away: set[int] = set()           # threads served by the last forward that have not queued since
        self._forward_s = 0.0                  # a forward's recent duration (moving average)
        self.turns = Turns() if (self.device.type == "cpu" if take_turns is None else take_turns) else None
        self.graphs = (StaticSteps(model, self.pool, self.lora.rows, len(self.names), self.device.type == "cuda",
                                   SHORT) if cuda_graphs else None)

    @torch.inference_mode()
    def _packed_decoder(self) -> PackedDecoder | None:
        """The model's decoder as a plain function (decoder.py) when it computes what the model's
        own forward does on a probe (calls of the reference and every adapter, over fresh caches
        and over cached prefixes, short and long); None (the model's own forward) otherwise."""
        decoder = packed_decoder(self.model)
        if decoder is None:
            return None
        ids = torch.arange(SHORT + 4, device=self.device) * 7 % self.vocab_size
        rows = self.lora.row_adapters("all", self.names)             # the reference and every adapter

        def logits(dec: PackedDecoder | None) -> torch.Tensor:
            calls = probe_calls(self.model, ids, rows, dec, self.lora.packed_rows)
            return torch.cat([c.logits.flatten() for c in calls]).float()

        want = logits(None)
        tol = 1e-4 if self.dtype == torch.float32 else 5e-2
        # the pointwise steps in AVX2 kernels where they can run (cpu_pointwise.py), else PyTorch's ops
        for ops in ([KernelOps] if pointwise_problem(decoder) is None else []) + [TorchOps]:
            decoder.ops = ops
            if torch.allclose(logits(decoder), want, atol=tol, rtol=tol):
                return decoder
        return None

    def stop_cuda_graphs(self) -> None:
        """Run every forward eagerly from now on (drops the graphs, gives their scratch slot back)."""
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None

    def cache_prefixes(self, max_mb: float) -> bool:
        """Keep the keys/values of prompt prefixes across generations, up to `max_mb` MB (0: off):
        a prompt forward then starts after its longest cached prefix (prefix_cache.py). Off by
        default: a restored prefix equals a recomputed one up to float rounding only, so seeded
        generations would depend on what ran before (`personamix serve` turns it on)."""
        self.prefix_cache = PrefixCache(int(max_mb * 2**20)) if max_mb > 0 else None
        return self.prefix_cache is not None

    @property
    def threads(self) -> int:
        """Cores a forward runs on, whichever thread runs it (omp.py): the fast backend's."""
        return self.lora.threads

    def new_cache(self, group: Group, names: Sequence[str]) -> SlabCache:
        return SlabCache(self.pool, len(self.lora.row_adapters(group, names)))

    def free_cache(self, cache: SlabCache) -> None:
        cache.release()
        if self.turns is not None:
            self.turns.give()
        with self._turn:
            self._back(threading.get_ident())  # its generation is over: no next call to wait for

    def crop(self, cache: SlabCache, n_remove: int) -> None:
        cache.crop(-n_remove)

    def forward(self, group: Group, tokens: torch.Tensor, cache, n_logits: int,
                names: Sequence[str]) -> tuple[torch.Tensor, int]:
        logits, passes = self.forward_together([(group, tokens, cache, n_logits)], names)
        return logits[0], passes

    def forward_together(self, requests: Sequence[tuple], names: Sequence[str]) -> tuple[list[torch.Tensor], int]:
        """Several calls of one generation (different groups, e.g. SCR's chunk scoring and its
        next draft step) in the same forward, shared with other generations' waiting calls. A
        request is (group, tokens, cache, n_logits[, columns]) (`restricts_columns`)."""
        calls = [self.call(*r[:4], names, columns=r[4] if len(r) > 4 else None) for r in requests]
        self._submit(calls)
        return [c.logits for c in calls], 1

    def forward_draw(self, tokens: torch.Tensor, cache, names: Sequence[str],
                     draw: Draw) -> tuple[Drawn, torch.Tensor, int]:
        """The reference's (or, for a mixed draw, p*'s) next token, drawn after the forward together
        with every other call's draw in it (`draw_calls`)."""
        call = self.call("all" if draw.mixed else "ref", tokens, cache, 1, names)
        call.draw = draw
        self._submit([call])
        return call.drawn, call.logits, 1

    def forward_score(self, requests: Sequence[tuple], names: Sequence[str], score: Score,
                      ahead: Draw | None = None) -> tuple[list[torch.Tensor], int, Scored, Drawn | None]:
        """forward_together whose first request is SCR's chunk scoring: its chunk is scored after the
        forward together with every other call's chunk in it (`score_calls`). `ahead` (a Draw with
        `ahead` set): the last request's next token, drawn with the forward's other draws after the
        chunk's uniforms (the order a later draw from the same generator would take). Returns
        (logits, forward passes, the chunk's scores, that draw or None)."""
        calls = [self.call(*r[:4], names, columns=r[4] if len(r) > 4 else None) for r in requests]
        calls[0].score = score
        if ahead is not None and self.draws_ahead:
            if not ahead.ahead or calls[-1].n_logits != 1:
                raise ValueError("a draw ahead is a Draw with `ahead` set, of the last request's one position")
            calls[-1].draw = ahead
        self._submit(calls)
        return [c.logits for c in calls], 1, calls[0].scored, calls[-1].drawn if calls[-1].draw is not None else None

    def _submit(self, calls: list[Call]) -> None:
        """Queue one generation's calls and return when a forward has served them: run it if the
        model is free (with every call waiting), else wait for the one that takes them."""
        me = threading.get_ident()
        for c in calls:
            c.thread = me
        if self.turns is not None:
            self.turns.give()
        omp.use_one_thread()                   # a generation thread's own tensor work: one core (omp.py)
        with self._turn:
            self._queue.extend(calls)          # all at once: they always land in the same forward
            self._back(me)
            while self._running and not calls[0].finished:
                self._turn.wait()
            lead = not calls[0].finished       # the model is free: run every call that waits, ours included
            if lead:
                self._running = True
                self._gather()
                batch, self._queue = self._queue, []
        if lead:
            start = time.perf_counter()
            try:
                with omp.team(self.lora.threads):   # the forward on every core
                    self.run(batch)
            finally:
                took = time.perf_counter() - start
                with self._turn:
                    self.busy_s += took
                    self._forward_s = took if not self._forward_s else 0.8 * self._forward_s + 0.2 * took
                    self._away = {c.thread for c in batch if c.thread is not None}
                    self._running = False
                    self._turn.notify_all()
        for c in calls:
            if c.error is not None:
                raise c.error
        if self.turns is not None:
            self.turns.take(TURN_LIMIT * self._forward_s)   # this generation's work until its next call

    def _gather(self) -> None:
        """Wait (bounded; `_turn` is released while waiting) until every thread the last forward
        served has queued its next call or ended its generation (see the module docstring)."""
        if not self._away or self.gather_wait <= 0:
            return
        start = time.perf_counter()
        deadline = start + self.gather_wait * self._forward_s
        while self._away and (left := deadline - time.perf_counter()) > 0:
            self._arrivals.wait(min(left, 1.0))   # a huge gather_wait must not overflow the lock's timeout
        self.waited_s += time.perf_counter() - start
        self._away.clear()                     # a straggler is not waited for again

    def _back(self, thread: int) -> None:
        """`thread` need not be waited for (it queued a call, or its generation ended); under `_turn`."""
        if thread in self._away:
            self._away.discard(thread)
            self._arrivals.notify()            # the thread about to run a forward may be waiting for it

    def call(self, group: Group, tokens: torch.Tensor, cache, n_logits: int, names: Sequence[str],
             columns: torch.Tensor | None = None) -> Call:
        """A Call for `run` (what forward_together queues); `columns`: its logits at these
        vocabulary ids only."""
        if group != "ref" and not names:
            raise PersonamixError("no preference models take part")
        if not 1 <= n_logits <= len(tokens):
            raise ValueError(f"n_logits={n_logits} for {len(tokens)} new tokens")
        return Call(tokens, cache, n_logits, self.lora.row_adapters(group, names), group, tuple(names),
                    columns=columns)

    @torch.inference_mode()
    def run(self, calls: list[Call]) -> None:
        """One forward over `calls` (of any generations): sets each call's logits, or its error.
        The caller makes sure no other forward runs meanwhile (forward_together does)."""
        prefixes = self.prefix_cache            # read once: cache_prefixes may switch it meanwhile
        try:
            prompts = [c.cache.get_seq_length() == 0 for c in calls]
            if prefixes is not None:
                self._restore_prefixes(calls, prefixes)
            whole = True          # logits over the whole vocabulary, also for calls that asked for columns
            if self.graphs is not None and self.graphs.run(calls):
                pass              # a decoding step, replayed from a CUDA graph
            elif len(calls) == 1 and not uses_attention_kernel(self.model):   # alone: the fast backend's forward
                c = calls[0]
                c.logits = self.lora.forward_call(c.group, c.tokens, c.cache, c.n_logits, c.names)
            else:
                with self.lora.packed_rows(token_adapters(calls)):
                    forward_calls(self.model, calls, self.pool, self.decoder)
                whole = False
            for c in calls if whole else ():
                if c.columns is not None:
                    c.logits = c.logits.index_select(-1, c.columns)
            # chunks first: a generation's draw ahead (forward_score) follows its chunk's uniforms
            self.score_calls([c for c in calls if c.score is not None])
            self.draw_calls([c for c in calls if c.draw is not None])
            self.forwards += 1
            self.calls += len(calls)
            for c, prompt in zip(calls, prompts):
                n = c.tokens.shape[0] * len(c.adapters)     # tokens computed (after a restored prefix) x rows
                self.row_tokens += n
                self.prompt_row_tokens += n if prompt else 0
            if prefixes is not None:
                self._store_prefixes(calls, prefixes)
        except BaseException as e:   # every call of the batch learns of it (their caches are now unusable)
            for c in calls:
                c.error = e

    def draw_calls(self, calls: list[Call]) -> None:
        """Every drawing call's token, from its logits: the reference's draws at once, and the
        mixed draws at once per aggregation and set of weights (draws.draw_next: the same
        operations for all of them as for one, and one read-back for their tokens)."""
        kinds: dict[tuple | None, list[Call]] = {}
        for c in calls:
            kinds.setdefault(c.draw.mix, []).append(c)
        for same in kinds.values():
            rows = [c.logits[:, -1] for c in same]                                  # [R, V] each
            logits = rows[0][None] if len(rows) == 1 else torch.stack(rows)         # [B, R, V]
            for c, drawn in zip(same, draw_next(logits, [c.draw for c in same])):
                c.drawn = drawn

    def score_calls(self, calls: list[Call]) -> None:
        """Every scoring call's chunk scores, from its logits, all at once (scoring.score_chunks:
        one set of operations per kind of chunk, and one read-back)."""
        if calls:
            for c, scored in zip(calls, score_chunks([c.logits for c in calls], [c.score for c in calls])):
                c.scored = scored

    def _restore_prefixes(self, calls: list[Call], cache: PrefixCache) -> None:
        """Calls over an empty cache (prompts) start after the longest prefix cached for all
        their rows: its keys/values are copied into their slots, their lengths set past it."""
        pool = self.pool
        for c in calls:
            if c.cache.get_seq_length() > 0:
                continue
            c.prompt = c.tokens.tolist()
            limit = len(c.prompt) - c.n_logits          # the positions asked for are computed
            if limit < 1:
                continue
            looked = [cache.lookup(kind, c.prompt, limit) for kind in c.adapters]
            n = min(held for _, held in looked)          # cached for every row
            if n == 0:
                continue
            # every layer of every row at once: [layers, rows, kv_heads, n, D], one copy per layer
            # into the call's slots (per layer and row it was ~1,270 tensor operations for a 5-row
            # prompt of the default model, 285 now: on a GPU, launches)
            k, v = (torch.stack([_joined([getattr(e, kv) for e in entries], n) for entries, _ in looked], dim=1)
                    for kv in ("k", "v"))
            slots, rows = pool.booked, slice(c.cache.start, c.cache.start + len(looked))
            for layer in range(k.shape[0]):
                pool.ensure(layer, slots, n, k[layer])
                pool.k[layer][rows, :, :n] = k[layer]
                pool.v[layer][rows, :, :n] = v[layer]
                c.cache.layer(layer).length = n
            c.tokens = c.tokens[n:]
            cache.tokens_saved += n * len(c.adapters)

    def _store_prefixes(self, calls: list[Call], cache: PrefixCache) -> None:
        """Keep every prompt of this forward (its full blocks and its tail), per row kind."""
        pool = self.pool
        for c in calls:
            if c.prompt is None:
                continue
            for r, kind in enumerate(c.adapters):
                slot = c.cache.start + r
                cache.store(kind, c.prompt, [k[slot] for k in pool.k], [v[slot] for v in pool.v])

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
