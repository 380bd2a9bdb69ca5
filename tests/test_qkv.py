"""q/k/v projections as one matmul (backends/qkv.py) against the three layers they replace."""
import copy

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from personamix.backends.multilora import MultiLoraLinear, attach
from personamix.backends.packing import pack_linears
from personamix.backends.qkv import QKVPart, SharedQKV, fuse_qkv
from personamix.testing import save_lora, save_tiny, tiny_model

SEQ = [0, 3, 1, 4, 2, 2, 0, 1]


@pytest.mark.parametrize("onednn", [False, True])
def test_a_fused_model_gives_the_unfused_logits_and_keeps_no_activations(onednn):
    model = tiny_model(layers=2, seed=1).eval()
    for layer in model.model.layers:             # one layer with biases, one part without
        layer.self_attn.q_proj.bias = nn.Parameter(torch.randn(layer.self_attn.q_proj.out_features))
    with torch.no_grad():
        want = model(torch.tensor([SEQ])).logits
    fused = copy.deepcopy(model)
    assert fuse_qkv(fused) == 2
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.q_proj, QKVPart) and isinstance(attn.qkv_proj, SharedQKV)
    if onednn:
        assert pack_linears(fused) > 0
    with torch.inference_mode():
        got = fused(torch.tensor([SEQ])).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert all(layer.self_attn.qkv_proj._x is None for layer in fused.model.layers)   # nothing held after


def test_a_part_called_on_its_own_input_gets_that_inputs_projection():
    model = tiny_model(layers=1, seed=2).eval()
    attn = model.model.layers[0].self_attn
    plain = [copy.deepcopy(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")]
    fuse_qkv(model)
    x, y = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    with torch.no_grad():
        q = attn.q_proj(x)
        k = attn.k_proj(y)                      # another input: recomputed, not x's columns
        v = attn.v_proj(y)
        q2 = attn.q_proj(x)                     # q of x again after x's parts were replaced
        for got, layer, inp in ((q, plain[0], x), (k, plain[1], y), (v, plain[2], y), (q2, plain[0], x)):
            assert torch.allclose(got, layer(inp), atol=1e-6)


def test_fused_lora_deltas_equal_the_three_wrapped_layers(tmp_path):
    """Adapters on q and v but not k: the joined A / block-diagonal B give each part its own delta
    (k none), in one call's rows and in packed rows."""
    base = save_tiny(tmp_path / "base", vocab=5, layers=1)
    paths = {n: save_lora(base, tmp_path / n, seed=i, targets=("q_proj", "v_proj")) for i, n in enumerate("AB")}
    model = LlamaForCausalLM.from_pretrained(base).eval()
    rows = attach(model, paths)
    attn = model.model.layers[0].self_attn
    wrapped = [getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")]
    x = torch.randn(3, 4, 16)
    with torch.inference_mode():
        assert not isinstance(wrapped[1], MultiLoraLinear)   # no adapter targets k_proj
        with rows.call(1, [1, 0], 2, "cpu"):                 # rows 1, 2 use adapters B, A; row 0 none
            want_call = [m(x) for m in wrapped]
        assert not torch.allclose(want_call[0][1:], wrapped[0].base(x)[1:], atol=1e-3)   # q's rows have deltas
        with rows.packed([-1, 0, 1, 1] * 3, 2, "cpu", torch.float32):
            want_packed = [m(x.view(1, 12, 16)) for m in wrapped]
        assert fuse_qkv(model, rows) == 1
        parts = [getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")]
        with rows.call(1, [1, 0], 2, "cpu"):
            got_call = [m(x) for m in parts]
        with rows.packed([-1, 0, 1, 1] * 3, 2, "cpu", torch.float32):
            got_packed = [m(x.view(1, 12, 16)) for m in parts]
    for got, want in zip(got_call + got_packed, want_call + want_packed):
        assert torch.allclose(got, want, atol=1e-6)
