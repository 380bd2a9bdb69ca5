"""A Llama-family decoder's forward over packed rows as one plain function (gpt-fast's style).

The batched backend's packed forward (batching.forward_calls) used to go through the model's own
`decoder(input_ids=..., cache=batch)`: per layer a dozen nn.Module calls, transformers' keyword
plumbing, its deprecation and kernel wrappers and its attention-interface lookup, ~8,000 Python
function calls per forward of the 30-layer default model, which run on one core while the other
waits at OpenMP's barrier (docs/batching.md, "The packed forward's Python"). `PackedDecoder` runs
the same computation as a loop over the layers' weights:

    h = embed(ids)                                                     # [S, d]
    for each layer:
        x = rms_norm(h);  q, k, v = proj(x)                            # [1, H|KV, S, D]
        q, k = rope(q, k, cos, sin)          (rotate-half form, as transformers' Llama)
        o = attend(q) after writing k, v     (batching._Batch: the pool, one call per layer)
        h = h + o_proj(o);  h = h + down(act(gate(rms_norm(h))) * up(rms_norm(h)))
    h = rms_norm(h)

with the ops of transformers' Llama code in the same order (`TorchOps`), so its outputs equal the
model's own forward bit for bit; on CPU the steps between the matmuls run in AVX2 kernels instead
(cpu_pointwise.KernelOps, the same math to float rounding). The batched backend checks the result
against the model's own forward on a probe at load time (`BatchingBackend._packed_decoder`;
`packed_decoder` checks the layers' shape). The linear layers are the
model's own modules (oneDNN-packed, multi-LoRA, fused q/k/v), called through `forward`.

Models it takes: decoders whose layers hold exactly input_layernorm, self_attn (q/k/v/o
projections, or the fused qkv_proj), post_attention_layernorm and mlp (gate/up/down_proj and
act_fn), with RMS norms (`weight`, `variance_epsilon`) and a `rotary_emb` module (Llama, Mistral
without a sliding window, Qwen2, SmolLM). Anything else (Qwen3's q/k norms, Gemma's scaled
embeddings and offset norms, ...) keeps the model's own forward.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .qkv import QKVPart, SharedQKV

Fn = Callable[[torch.Tensor], torch.Tensor]

_LAYER = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
_ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP = {"gate_proj", "up_proj", "down_proj", "act_fn"}


@dataclass
class _Layer:
    """One decoder layer's pieces, as plain callables."""

    index: int
    attn: nn.Module                      # the attention module (its layer_idx, scaling: for `attend`)
    norm1_w: torch.Tensor
    norm1_eps: float
    qkv: Callable[[torch.Tensor], Any]   # x -> [..., out_q + out_k + out_v] (one fused projection) or (q, k, v)
    fused: bool
    heads: tuple[int, int]               # fused: query and key/value heads (its columns: q's, k's, v's)
    o: Fn
    norm2_w: torch.Tensor
    norm2_eps: float
    gate: Fn
    up: Fn
    down: Fn
    act: Fn
    head_dim: int


def _children(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_children()}


def _rms_norm_parts(norm: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of an RMS norm with nothing else in it; None otherwise."""
    params = dict(norm.named_parameters(recurse=False))
    eps = getattr(norm, "variance_epsilon", None)
    if set(params) != {"weight"} or _children(norm) or not isinstance(eps, float):
        return None
    return params["weight"], eps


def _qkv(attn: nn.Module, head_dim: int) -> tuple[Callable[[torch.Tensor], Any], bool, tuple[int, int]]:
    """(x -> [q k v] from the fused projection, True, (query heads, key/value heads)) where there is
    one (qkv.py), else (x -> (q, k, v), False, (0, 0))."""
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    if all(isinstance(p, QKVPart) for p in (q, k, v)) and q.shared is k.shared is v.shared:
        shared: SharedQKV = q.shared
        return shared.inner.forward, True, (shared.sizes[0] // head_dim, shared.sizes[1] // head_dim)
    fq, fk, fv = q.forward, k.forward, v.forward
    return (lambda x: (fq(x), fk(x), fv(x))), False, (0, 0)


def _layer(index: int, layer: nn.Module) -> _Layer | None:
    if _children(layer) != _LAYER:
        return None
    attn, mlp = layer.self_attn, layer.mlp
    if not _ATTENTION <= _children(attn) <= _ATTENTION | {"qkv_proj"} or _children(mlp) != _MLP:
        return None
    n1, n2 = _rms_norm_parts(layer.input_layernorm), _rms_norm_parts(layer.post_attention_layernorm)
    head_dim = getattr(attn, "head_dim", None)
    if (n1 is None or n2 is None or not isinstance(head_dim, int) or getattr(attn, "layer_idx", None) != index
            or not isinstance(getattr(attn, "scaling", None), float)):
        return None
    return _Layer(index, attn, n1[0], n1[1], *_qkv(attn, head_dim), attn.o_proj.forward, n2[0], n2[1],
                  mlp.gate_proj.forward, mlp.up_proj.forward, mlp.down_proj.forward, mlp.act_fn, head_dim)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' LlamaRMSNorm, op for op: x / sqrt(mean(x^2) + eps) in fp32, times the weight
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    # transformers' x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1] (RoFormer,
    # Su et al. 2021, eq. 34 in the rotate-half layout), as x * cos + [x2, x1] * [-sin1, sin2]:
    # (-a) * b and a * (-b) are the same float, so the result is bit for bit the same, in 4 ops, not 7
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class TorchOps:
    """The pointwise steps between a layer's matmuls, as transformers' Llama computes them (op for
    op: the model's own forward bit for bit). cpu_pointwise.KernelOps swaps in for it on CPU."""

    name = "torch"

    @staticmethod
    def add_norm(h: torch.Tensor, a: torch.Tensor | None, w: torch.Tensor, eps: float) -> torch.Tensor:
        """h += a (in place; a None: nothing added), then RMSNorm(h) * w."""
        if a is not None:
            h.add_(a)
        return _rms_norm(h, w, eps)

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """Rotary embeddings of x [1, S, heads, D] (cos, sin_signed [1, S, 1, D], see `_rope`)."""
        return _rope(x, cos, sin_signed)

    @staticmethod
    def act_mul(act: Fn, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """act(g) * u (the gated MLP's product; may reuse g's memory)."""
        return act(g).mul_(u)


class PackedDecoder:
    """decoder(ids [S], pos [S], batch) -> hidden states [S, d] after the final norm, equal to
    `model.get_decoder()(input_ids=ids[None], position_ids=pos[None], cache=batch, batch=batch)`
    for the models `packed_decoder` accepts: bit for bit with `ops` = TorchOps, to float rounding
    with cpu_pointwise.KernelOps. `batch` (batching._Batch) writes each layer's keys and values
    (`update`) and computes its attention (`attend`)."""

    def __init__(self, decoder: nn.Module, layers: list[_Layer], norm: tuple[torch.Tensor, float]):
        self.embed = decoder.embed_tokens.forward
        self.rotary = decoder.rotary_emb
        self.layers = layers
        self.norm_w, self.norm_eps = norm
        # (weight, eps) of the norm after each layer's MLP: the next layer's input norm, or the final one
        self.next_norms = [(x.norm1_w, x.norm1_eps) for x in layers[1:]] + [norm]
        self.ops: type[TorchOps] = TorchOps     # the pointwise steps (swap-in: its subclass cpu_pointwise.KernelOps)

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, batch) -> torch.Tensor:
        h = self.embed(ids.view(1, -1))                                        # [1, S, d]
        cos, sin = self.rotary(h, pos.view(1, -1))                             # [1, S, D]
        half = cos.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)           # [-sin1, sin2] (_rope)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)                          # [1, S, 1, D]
        s, ops, layers = h.shape[1], self.ops, self.layers
        x = ops.add_norm(h, None, layers[0].norm1_w, layers[0].norm1_eps)
        for layer, next_norm in zip(layers, self.next_norms):
            d = layer.head_dim
            if layer.fused:                    # rope over q's and k's heads at once
                qkv = layer.qkv(x).view(1, s, -1, d)                           # [1, S, H + 2 KV, D]
                heads, kv = layer.heads
                qk = ops.rope(qkv[:, :, :heads + kv], cos, sin)                # [1, S, H + KV, D]
                q, k, v = qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, heads + kv:]
            else:
                q, k, v = (t.view(1, s, -1, d) for t in layer.qkv(x))
                q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [1, heads, S, D]
            batch.update(k, v, layer.index)
            o = batch.attend(layer.attn, q, layer.attn.scaling)                # [1, S, H, D]
            # h is this function's own tensor: the residual adds go into it in place
            x = ops.add_norm(h, layer.o(o.reshape(1, s, -1)), layer.norm2_w, layer.norm2_eps)
            mlp = layer.down(ops.act_mul(layer.act, layer.gate(x), layer.up(x)))
            x = ops.add_norm(h, mlp, *next_norm)
        return x[0]


def packed_decoder(model: nn.Module) -> PackedDecoder | None:
    """A PackedDecoder over `model`'s decoder, or None where its layers are not of the Llama
    shape this module reproduces (the caller then keeps the model's own forward)."""
    decoder = model.get_decoder()
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not all(hasattr(decoder, n) for n in needed) or not isinstance(decoder.embed_tokens, nn.Embedding):
        return None
    layers = [_layer(i, layer) for i, layer in enumerate(decoder.layers)]
    norm = _rms_norm_parts(decoder.norm)
    if not layers or any(x is None for x in layers) or norm is None:
        return None
    return PackedDecoder(decoder, layers, norm)


__all__ = ["PackedDecoder", "TorchOps", "packed_decoder"]
