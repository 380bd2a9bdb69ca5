"""Batched multi-LoRA: score the reference and N LoRA adapters in one forward of the base model.

Every targeted nn.Linear W is wrapped so that, for a batch whose rows belong to different
adapters, row b computes (LoRA, Hu et al. 2021, eq. 3)

    y_b = W x_b + s_a B_a A_a x_b        a = the adapter of row b, s_a = alpha/r (rsLoRA: alpha/sqrt(r))

The base matmul is shared by all rows; the low-rank deltas are two batched matmuls over the
adapters' stacked A [N, in, r] and B [N, r, out] (the idea of punica's BGMV / S-LoRA). The
reference row gets no delta at all, so "ref" forwards cost a plain forward. Adapters with
different ranks are zero-padded to the largest rank and an adapter that does not target a
module has zero A/B there, both exact. On x86 CPUs with AVX2 the deltas of all rows run in one
kernel call per layer instead (cpu_lora.py: each adapter's positions read in place, unpadded;
whole forwards of a busy server 1.04-1.12x, docs/bench/lora_mix.md).

Which adapter each row of a forward uses is set on one shared `AdapterRows` object (a call's
rows, or the packed positions of many calls for cross-request batching, batching.py).

Supported: standard PEFT LoRA directories (any rank, alpha, target modules, rsLoRA). Not
supported (UnsupportedAdapter; build_backend then falls back to the PEFT path): DoRA,
rank/alpha patterns, modules_to_save, LoRA biases, non-Linear targets.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from ..engine.session import Group
from ..errors import PersonamixError, first_line
from . import omp
from .cache import PreallocatedCache
from .cpu_lora import LoraWeights, Segments, add_deltas, lora_problem
from .local import LocalBackend
from .packing import linear_kernel, pack_linears


class UnsupportedAdapter(PersonamixError):
    """The adapter uses a LoRA feature the fast path does not implement. `peft_batchable`:
    whether PEFT's adapter_names= batches can run it (they cannot run DoRA)."""

    def __init__(self, message: str, peft_batchable: bool = True):
        super().__init__(message)
        self.peft_batchable = peft_batchable


@dataclass
class AdapterRows:
    """Which adapter each row of the current forward uses, read by every MultiLoraLinear.
    Set for the duration of one forward with `call` or `packed` (the owner serialises forwards).

    index: the adapters in use (None: no row has a delta, a plain forward).
    Call mode: batch rows start.. use adapters index[0], index[1], ... (one row each).
    Packed mode: index[u] applies to the flattened positions gather[u*G : (u+1)*G], each
    adapter's positions padded to G with `valid` [U*G, 1] = 0 on the padding. When at least half
    of the adapters take part, index is all of them (unused ones all padding), so the layers use
    the stacked A/B without gathering them (two fewer index ops per adapted linear and forward).
    With `kernel` (set by `attach` where cpu_lora's kernel can run every layer), packed mode sets
    `segments` (each adapter's positions, unpadded) instead of gather / valid, and call mode
    builds them at the forward's first layer; `fixed` mode's padded buffers keep PyTorch's path.
    """

    index: torch.Tensor | None = None
    start: int = 0
    all_in_order: bool = False         # index == 0..N-1: use the stacked A/B as they are
    key: tuple[int, ...] = ()          # index as a tuple (the per-layer cache of gathered A/B)
    gather: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    kernel: bool = False
    segments: Segments | None = None

    @contextmanager
    def call(self, start: int, adapters: Sequence[int], n_adapters: int, device) -> Iterator[None]:
        """Rows start, start+1, ... use `adapters` (indices into the stacked adapters) during the block."""
        self.start, self.key = start, tuple(adapters)
        self.all_in_order = list(adapters) == list(range(n_adapters))
        self.index = torch.tensor(list(adapters), device=device) if adapters else None
        try:
            yield
        finally:
            self.clear()

    def call_segments(self, length: int) -> Segments:
        """Call mode's segments for rows of `length` positions each (built at the forward's first layer)."""
        if self.segments is None:
            self.segments = Segments.of([(a, list(range((self.start + i) * length, (self.start + i + 1) * length)))
                                         for i, a in enumerate(self.key)])
        return self.segments

    @contextmanager
    def packed(self, adapters: Sequence[int], n_adapters: int, device, dtype) -> Iterator[None]:
        """Packed-sequence position i uses adapter adapters[i] (-1: none) during the block."""
        used = sorted({a for a in adapters if a >= 0})
        if used:
            if 2 * len(used) >= n_adapters:   # pad to every adapter: the stacked A/B are then used as
                used = list(range(n_adapters))  # they lie, not gathered in every layer, for <= U*G padding rows
            members = {a: [] for a in used}
            for i, a in enumerate(adapters):
                if a >= 0:
                    members[a].append(i)
            self.start, self.key = 0, tuple(used)
            self.all_in_order = used == list(range(n_adapters))
            self.index = torch.tensor(used, device=device)
        if used and self.kernel:
            self.segments = Segments.of(list(members.items()))
        elif used:
            g = max(len(m) for m in members.values())
            self.gather = torch.tensor([i for a in used for i in members[a] + [0] * (g - len(members[a]))],
                                       device=device)
            self.valid = torch.tensor([float(j < len(members[a])) for a in used for j in range(g)],
                                      dtype=dtype, device=device).view(-1, 1)
        try:
            yield
        finally:
            self.clear()

    @contextmanager
    def fixed(self, index: torch.Tensor | None, gather: torch.Tensor, valid: torch.Tensor) -> Iterator[None]:
        """Packed mode over tensors made by the caller: `index` is every adapter in order (None: no
        adapters), each padded to the same number of positions in `gather` / `valid` (a CUDA
        graph's buffers, cuda_graphs.py)."""
        if index is not None:
            self.start, self.key, self.all_in_order = 0, tuple(range(len(index))), True
            self.index, self.gather, self.valid = index, gather, valid
        try:
            yield
        finally:
            self.clear()

    def clear(self) -> None:
        self.index = self.gather = self.valid = self.segments = None


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, rows: AdapterRows, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.base = base
        self.rows = rows
        self.kernel = None
        if rows.kernel:   # the CPU kernel's layout; A/B views of it (the same memory where no padding is needed)
            problem = lora_problem(a, b)
            if problem:
                raise PersonamixError(f"a layer of {tuple(a.shape)} x {tuple(b.shape)} cannot run on the LoRA "
                                      f"kernel its row state uses: {problem}")
            self.kernel = LoraWeights.of(a, b)
            a, b = self.kernel.a[:, :, :a.shape[2]], self.kernel.b[:, :b.shape[1]]
        self.register_buffer("lora_a", a, persistent=False)   # [N, in, r]
        self.register_buffer("lora_b", b, persistent=False)   # [N, r, out], scale folded in
        self._subsets: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}   # gathered A/B per subset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.rows
        if rows.index is None:
            return y
        if rows.kernel and rows.gather is None:   # every position's delta in one kernel call (cpu_lora.py);
            add_deltas(x, y, self.kernel, rows.segments or rows.call_segments(x.shape[-2]))   # `fixed`: below
            return y
        if rows.all_in_order:
            a, b = self.lora_a, self.lora_b
        elif rows.gather is not None:   # packed calls: the set of adapters changes from forward to forward
            a, b = self.lora_a[rows.index], self.lora_b[rows.index]
        else:   # one call's subset / reordering of the adapters: gather once per subset, not every forward
            ab = self._subsets.get(rows.key)
            if ab is None:
                if len(self._subsets) >= 8:
                    self._subsets.clear()
                ab = self._subsets[rows.key] = (self.lora_a[rows.index], self.lora_b[rows.index])
            a, b = ab
        if rows.gather is not None:
            xs = x.reshape(-1, x.shape[-1]).index_select(0, rows.gather).view(len(a), -1, x.shape[-1])   # [U, G, in]
            xa = torch.bmm(xs, a).mul_(rows.valid.view(len(a), -1, 1))   # [U, G, r], padding rows 0 (cheaper than on d)
            d = torch.bmm(xa, b).view(-1, y.shape[-1])                     # [U*G, out]
            y.view(-1, y.shape[-1]).index_add_(0, rows.gather, d)
            return y
        y[rows.start:].baddbmm_(torch.bmm(x[rows.start:], a), b)   # y += (x A) B, the add fused into the matmul
        return y


def _check_config(name: str, cfg) -> None:
    problems = []
    if getattr(cfg, "peft_type", None) is None or str(cfg.peft_type).split(".")[-1] != "LORA":
        problems.append(f"peft_type {cfg.peft_type}")
    for field in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if getattr(cfg, field, False):
            problems.append(field)
    for field in ("rank_pattern", "alpha_pattern"):
        if getattr(cfg, field, None):
            problems.append(field)
    if getattr(cfg, "modules_to_save", None):
        problems.append("modules_to_save")
    if getattr(cfg, "bias", "none") != "none":
        problems.append(f"bias={cfg.bias}")
    if getattr(cfg, "target_parameters", None):
        problems.append("target_parameters")
    if problems:
        raise UnsupportedAdapter(f"adapter {name!r} uses {', '.join(problems)}, which the fast multi-LoRA path "
                                 "does not support", peft_batchable=not getattr(cfg, "use_dora", False))


def load_lora(name: str, path: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """{module name: (A [r, in], B [out, r])} and the scale s of one PEFT LoRA adapter."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    try:
        cfg = PeftConfig.from_pretrained(path)
        weights = load_peft_weights(path, device="cpu")
    except Exception as e:
        raise PersonamixError(f"cannot load adapter {name!r} from {path!r}: {first_line(e)}") from None
    _check_config(name, cfg)
    scale = cfg.lora_alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, w in weights.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if key.endswith(marker):
                module = key[: -len(marker)].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[part] = w
                break
        else:
            raise UnsupportedAdapter(f"adapter {name!r} holds {key!r}, which the fast multi-LoRA path does not support")
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise PersonamixError(f"adapter {name!r}: module {module} lacks lora_A or lora_B")
        out[module] = (ab["lora_A"], ab["lora_B"])
    return out, scale


def attach(model: PreTrainedModel, adapters: dict[str, str]) -> AdapterRows:
    """Wrap every Linear that any adapter targets (in place); returns the shared row state."""
    loaded = {name: load_lora(name, path) for name, path in adapters.items()}
    modules = dict(model.named_modules())
    targets = sorted({m for weights, _ in loaded.values() for m in weights})
    rank = max((a.shape[0] for weights, _ in loaded.values() for a, _ in weights.values()), default=1)
    rows = AdapterRows()
    p = next(model.parameters())
    n = len(adapters)
    wrapped = []
    for module in targets:
        base = modules.get(module)
        if not isinstance(base, nn.Linear):
            kind = "missing" if base is None else type(base).__name__
            raise UnsupportedAdapter(f"adapter target {module} is {kind} in the reference, not a Linear layer "
                                     "(adapter trained on another base, or a non-Linear target)")
        a_all = torch.zeros(n, base.in_features, rank, dtype=p.dtype, device=p.device)
        b_all = torch.zeros(n, rank, base.out_features, dtype=p.dtype, device=p.device)
        for i, (name, (weights, scale)) in enumerate(loaded.items()):
            if module not in weights:
                continue
            a, b = weights[module]
            r = a.shape[0]
            if a.shape != (r, base.in_features) or b.shape != (base.out_features, r):
                raise PersonamixError(f"adapter {name!r} does not fit the reference model (trained on another "
                                      f"base?): {module} has A {tuple(a.shape)}, B {tuple(b.shape)} but the layer "
                                      f"is {base.in_features} -> {base.out_features}")
            a_all[i, :, :r] = a.T.to(p)
            b_all[i, :r, :] = (b.T * scale).to(p)
        wrapped.append((module, base, a_all, b_all))
    rows.kernel = all(lora_problem(a, b) is None for _, _, a, b in wrapped)
    wrapped = [(module, MultiLoraLinear(base, rows, a, b)) for module, base, a, b in wrapped]
    for module, layer in wrapped:   # only once every adapter has been checked: a failure leaves the model as it was
        parent_name, _, child = module.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer)
    return rows


class MultiLoraBackend(LocalBackend):
    """backend="fast": reference + N LoRA adapters on one base model, all rows of a group in ONE
    forward, the adapters applied by batched matmuls (MultiLoraLinear) instead of PEFT's
    per-adapter loop; each attention layer's q/k/v projections, deltas included, as one matmul
    (qkv.py). On CPU the model's linear layers run with oneDNN-prepacked weights (onednn.py;
    `onednn=False` keeps PyTorch's kernels). Owns `model` from then on."""

    kind = "fast"

    def __init__(self, model: PreTrainedModel, adapters: dict[str, str], onednn: bool = True):
        super().__init__(model, list(adapters))
        self.model = model.eval()
        from .qkv import fuse_qkv  # here, not at the top: qkv.py builds on this module's layers

        self.rows = attach(model, adapters) if adapters else AdapterRows()
        self.fused_layers = fuse_qkv(model, self.rows)
        self.packed_linears = pack_linears(model) if onednn else 0
        self.linear_kernel = linear_kernel(model)
        self._index = {name: i for i, name in enumerate(self.names)}
        self._lock = threading.Lock()   # the row state is shared by the wrapped layers
        self.threads = torch.get_num_threads()   # cores for a forward, whichever thread runs it (omp.py)
        omp.release_team()                       # the team that loaded the model: one team at a time

    def adapter_index(self, names: Sequence[str]) -> list[int]:
        """The stacked-adapter indices of `names` (the rows' order in `call` / `packed`)."""
        return [self._index[n] for n in names]

    def row_adapters(self, group: Group, names: Sequence[str]) -> list[int]:
        """The adapter of each row of a group (-1: the reference, no delta)."""
        return ([-1] if group in ("ref", "all") else []) + ([] if group == "ref" else self.adapter_index(names))

    @torch.inference_mode()
    def forward(self, group: Group, tokens: torch.Tensor, cache: PreallocatedCache, n_logits: int,
                names: Sequence[str]) -> tuple[torch.Tensor, int]:
        omp.use_one_thread()             # generations in threads take turns: one OpenMP team at a time
        with self._lock, omp.team(self.threads):
            return self.forward_call(group, tokens, cache, n_logits, names), 1

    def forward_call(self, group: Group, tokens: torch.Tensor, cache: PreallocatedCache, n_logits: int,
                     names: Sequence[str]) -> torch.Tensor:
        """One call's logits [rows, n_logits, V] (the rows of one group over the same tokens).
        Not serialised: the caller makes sure no other forward runs meanwhile (`forward` does)."""
        if group != "ref" and not names:
            raise PersonamixError("no preference models take part")
        n_rows = 1 if group == "ref" else len(names) + (group == "all")
        ids = tokens.view(1, -1).expand(n_rows, -1)
        adapters = [] if group == "ref" else self.adapter_index(names)
        with self.rows.call(int(group == "all"), adapters, len(self.names), self.device):
            return self.model(input_ids=ids, use_cache=True, logits_to_keep=n_logits,
                              **{self.cache_kw: cache}).logits

    def packed_rows(self, adapters: Sequence[int]):
        """Context manager: position i of a packed sequence uses adapter adapters[i] (-1: none)."""
        return self.rows.packed(adapters, len(self.names), self.device, self.dtype)


__all__ = ["MultiLoraBackend", "MultiLoraLinear", "AdapterRows", "UnsupportedAdapter", "load_lora", "attach"]
