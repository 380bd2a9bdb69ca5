"""CUDA graphs for the batched backend's decoding steps (batching.py).

On a GPU a small model's decoding step is host work: a packed forward of 64 generations' steps
launches ~2,700 kernels whose GPU time is a fifth of the forward's 40 ms (H200, bf16,
docs/bench/gpu.md). A CUDA graph records the launches once and replays them in one call: one
generation's step took 6.5 ms instead of 19.3, and one client got 50.2 tok/s instead of 21.8
(the packed 16- and 64-call steps under graphs are not measured yet; docs/bench/gpu.md).

A graph fixes every tensor's shape and address, so a step is padded to a `Shape` of buckets
(powers of two): the packed positions S, the pool slots attention reads P, the new tokens per
row T (<= batching.SHORT), the key length L. Per shape, `StaticStep` owns the inputs the graph
reads (one int64 buffer, filled from the host with ONE copy before each replay) and the logits
it writes. Inside, it is the packed forward of batching.py with every index map a tensor:

* positions: packed position i holds a token of row slot[i] at sequence position pos[i];
  padding positions write their keys/values into a scratch slot no cache owns (`SCRATCH`);
* attention: every slot in [0, P) attends with its padded queries [P, H, T, D] over its keys
  [0, L), masked to its own length (bottom-right causal within its new tokens), in one SDPA
  call per layer; slots with no query this step see one key and are thrown away;
* LoRA: every adapter's delta runs over S gathered positions (`valid` zero on the padding),
  the packed mode of multilora.AdapterRows with G = S;
* logits: the first K of S kept positions; copied out of the graph's buffer before the next step.

The math is the packed forward's; logits equal it up to float rounding (other matmul shapes,
attention over more padding). Graphs belong to the pool's tensors: when the pool grows (a new
allocation), every graph is dropped and shapes are captured again on first use, into a new
memory pool. Steps with a prompt (a call of more than SHORT tokens), or more than MAX_POSITIONS
positions, run eagerly; so does every step after a capture fails (said once, in a warning and in
`failed`).

Without CUDA (`capture=False`) a StaticStep runs the same padded forward eagerly: how the tests
check it against the packed forward on CPU.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..errors import first_line
from .cache import KVPool
from .multilora import AdapterRows

#: steps with more packed positions than this run eagerly (one graph per bucket up to it)
MAX_POSITIONS = 4096
#: graphs kept at most; past it all are dropped (captured again on use)
MAX_GRAPHS = 96
#: the pool slot padding positions write to (StaticSteps reserves it first, so it is slot 0)
SCRATCH = 0


def bucket(n: int, least: int = 1) -> int:
    """The smallest power of two >= max(n, least)."""
    return 1 << (max(n, least) - 1).bit_length()


@dataclass(frozen=True)
class Shape:
    positions: int    # S: packed positions (sum over calls of rows x new tokens)
    slots: int        # P: pool slots [0, P) that attention reads
    tokens: int       # T: new tokens per row, padded
    keys: int         # L: key positions [0, L) read per slot


class StaticStep:
    """One padded packed forward of a fixed Shape: its input buffer, its (captured) graph and
    its logits. Acts as the model's cache (`update`) and attention (`attend`), as batching._Batch."""

    def __init__(self, shape: Shape, model: PreTrainedModel, pool: KVPool, rows: AdapterRows, n_adapters: int):
        self.shape, self.model, self.pool, self.rows, self.n_adapters = shape, model, pool, rows, n_adapters
        p = next(model.parameters())
        s, n = shape.positions, n_adapters
        # [pos S | slot S | t S | keep S | gather nS | valid nS | limit P*T]: one host-to-device copy per step
        self.ints = torch.zeros(4 * s + 2 * n * s + shape.slots * shape.tokens, dtype=torch.long, device=p.device)
        self.pos, self.slot, self.t, self.keep, self.gather, self.valid, self.limit = self.ints.split(
            [s, s, s, s, n * s, n * s, shape.slots * shape.tokens])
        self.ids = torch.zeros(s, dtype=torch.long, device=p.device)
        self.key_pos = torch.arange(shape.keys, device=p.device)
        self.adapters = torch.arange(n, device=p.device)
        self.packed_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=p.device)   # ignored: attend masks
        self.dtype = p.dtype
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None      # [S, V]: rows 0..K-1 are the step's
        self.mask: torch.Tensor | None = None

    # -- filled from the host, before a replay -----------------------------------------------
    def fill(self, calls: Sequence, pasts: Sequence[int], lens: Sequence[int]) -> int:
        """Write the calls' index maps and tokens into the buffers; returns K, the logits rows."""
        s, t_max = self.shape.positions, self.shape.tokens
        pos, slot, tok, keep = [], [], [], []
        limit = [1] * (self.shape.slots * t_max)
        members: list[list[int]] = [[] for _ in range(self.n_adapters)]
        o = 0
        for c, past, t in zip(calls, pasts, lens):
            for r, a in enumerate(c.adapters):
                sl = c.cache.start + r
                pos += range(past, past + t)
                slot += [sl] * t
                tok += range(t)
                limit[sl * t_max: sl * t_max + t] = range(past + 1, past + t + 1)   # bottom-right causal
                if a >= 0:
                    members[a] += range(o, o + t)
                keep += range(o + t - c.n_logits, o + t)
                o += t
        k = len(keep)
        pad = s - o
        gather, valid = [], []
        for m in members:
            gather += m + [0] * (s - len(m))
            valid += [1] * len(m) + [0] * (s - len(m))
        self.ints.copy_(torch.tensor(pos + [0] * pad + slot + [SCRATCH] * pad + tok + [0] * pad
                                     + keep + [0] * (s - k) + gather + valid + limit))
        self.ids[:o].copy_(torch.cat([c.tokens.repeat(len(c.adapters)) for c in calls]))
        return k

    # -- the forward (what the graph records) ------------------------------------------------
    def forward(self) -> torch.Tensor:
        """Logits [S, V] of the kept positions, from the buffers as they are."""
        sh = self.shape
        self.mask = self.key_pos.view(1, 1, 1, -1) < self.limit.view(sh.slots, 1, sh.tokens, 1)   # [P, 1, T, L]
        valid = self.valid.to(self.dtype).view(-1, 1)
        with self.rows.fixed(self.adapters if self.n_adapters else None, self.gather, valid):
            hidden = self.model.get_decoder()(input_ids=self.ids.view(1, -1), position_ids=self.pos.view(1, -1),
                                              attention_mask=self.packed_mask, cache=self, batch=self,
                                              use_cache=True).last_hidden_state[0]               # [S, d]
        return self.model.get_output_embeddings()(hidden.index_select(0, self.keep))           # [S, V]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Write the new keys/values [1, kv_heads, S, D] into the pool (padding into SCRATCH)."""
        self.pool.k[layer_idx][self.slot, :, self.pos] = key_states[0].transpose(0, 1)
        self.pool.v[layer_idx][self.slot, :, self.pos] = value_states[0].transpose(0, 1)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0   # positions are passed explicitly

    def attend(self, module, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention output [1, S, H, D] for the packed query [1, H, S, D]."""
        sh, i = self.shape, module.layer_idx
        k = self.pool.k[i][: sh.slots, :, : sh.keys]
        v = self.pool.v[i][: sh.slots, :, : sh.keys]
        q = query.new_zeros(sh.slots, query.shape[1], sh.tokens, query.shape[3])             # [P, H, T, D]
        q[self.slot, :, self.t] = query[0].transpose(0, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scaling,
                                           enable_gqa=k.shape[1] != q.shape[1])
        return o[self.slot, :, self.t].unsqueeze(0)

    # -- capture and replay --------------------------------------------------------------------
    def capture(self, mempool) -> None:
        """Record `forward` into a CUDA graph (after one eager run on a side stream, which sets up
        the libraries' lazy state; it writes the same keys/values the replay will)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: generation threads keep running their samplers (syncs included) meanwhile
        with torch.cuda.graph(graph, pool=mempool, capture_error_mode="thread_local"):
            self.logits = self.forward()
        self.graph = graph

    def run(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self.forward()


class StaticSteps:
    """The batched backend's decoding steps as CUDA graph replays, one graph per Shape (see the
    module docstring). `run` takes a forward's calls; False: not covered, run them eagerly."""

    def __init__(self, model: PreTrainedModel, pool: KVPool, rows: AdapterRows, n_adapters: int, capture: bool,
                 short: int):
        self.model, self.pool, self.rows, self.n_adapters = model, pool, rows, n_adapters
        self.capture, self.short = capture, short
        self.layers = model.config.get_text_config().num_hidden_layers
        if pool.fill is None:
            raise ValueError("StaticSteps: padded steps read positions no row wrote; the pool must be filled "
                             "(KVPool.fill)")
        scratch = pool.reserve(1)                  # never released: the pool keeps its tensors from then on
        if scratch != SCRATCH:
            raise RuntimeError(f"StaticSteps needs the pool's first slot, got {scratch}")
        self.steps: dict[Shape, StaticStep] = {}
        self._pool_tensors: tuple | None = None
        self._mempool = None                       # the memory pool the graphs share (_drop makes a new one)
        self._drop()
        self.replays = self.captures = 0
        self.failed: str | None = None             # why capturing failed (then every step runs eagerly)
        self.last: Shape | None = None             # the shape of the last step

    def _drop(self) -> None:
        """Forget every graph, and capture the next ones into a new memory pool: a pool whose graphs
        are all gone cannot be captured into again (PyTorch's allocator asserts use_count > 0; seen
        on the H200, docs/bench/gpu.md; vLLM's issue 28426 is the same)."""
        self.steps.clear()
        if self.capture:
            self._mempool = torch.cuda.graph_pool_handle()

    def close(self) -> None:
        """Drop every graph and give the scratch slot back (the pool can then drop its tensors when idle)."""
        self.steps.clear()
        self.pool.release(SCRATCH, 1)

    def run(self, calls: Sequence) -> bool:
        """One forward over `calls` from a (captured) static step: sets each call's logits and
        advances its cache. False, doing nothing, when the step is not covered."""
        pool = self.pool
        if self.failed:
            return False
        lens = [c.tokens.shape[0] for c in calls]
        if max(lens) > self.short or len(pool.k) < self.layers or any(k is None for k in pool.k):
            return False
        positions = sum(len(c.adapters) * t for c, t in zip(calls, lens))
        if positions > MAX_POSITIONS:
            return False
        pasts = [c.cache.get_seq_length() for c in calls]
        length, booked = max(p + t for p, t in zip(pasts, lens)), pool.booked
        pool.ensure(0, booked, length, pool.k[0])   # grow first (all layers at once): graphs fix their tensors
        tensors = (pool.k[0].data_ptr(), pool.slots, pool.capacity)
        if tensors != self._pool_tensors or len(self.steps) >= MAX_GRAPHS:
            self._drop()                                           # captured over tensors that are gone
            self._pool_tensors = tensors
        shape = Shape(bucket(positions, 16), min(bucket(booked), pool.slots), bucket(max(lens)),
                      min(bucket(length, 64), pool.capacity))
        step = self.steps.get(shape)
        self.last = shape
        new = step is None
        if new:
            step = self.steps[shape] = StaticStep(shape, self.model, pool, self.rows, self.n_adapters)
        k = step.fill(calls, pasts, lens)
        if new and self.capture:
            try:
                step.capture(self._mempool)
            except Exception as e:   # this torch / model cannot be captured: eager from now on, said once
                self.failed = f"{type(e).__name__}: {first_line(e)}"
                self._drop()
                warnings.warn(f"CUDA graph capture failed ({self.failed}); decoding steps run eagerly", stacklevel=2)
                return False
            self.captures += 1
        logits = step.run()[:k].clone()                           # the graph's buffer is the next step's
        self.replays += 1
        start = 0
        for c, past, t in zip(calls, pasts, lens):
            n = len(c.adapters) * c.n_logits
            c.logits = logits[start: start + n].view(len(c.adapters), c.n_logits, -1)
            c.cache.set_length(self.layers, past + t)
            start += n
        return True


__all__ = ["StaticSteps", "StaticStep", "Shape", "bucket", "MAX_POSITIONS", "SCRATCH"]
