"""The fast batched multi-LoRA path against PEFT (the reference implementation)."""
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from personamix import Generator, PersonamixError
from personamix.backends import cpu_lora
from personamix.backends.avx2 import PanelLinear
from personamix.backends.multilora import UnsupportedAdapter
from personamix.backends.onednn import PackedLinear
from personamix.engine.session import Session
from personamix.testing import save_tiny

SEQ = [0, 3, 1, 4, 2, 2, 0, 1]


def save_adapter(base, out, seed, **lora_kwargs):
    model = LlamaForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return str(out)


CONFIGS = {
    "r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r16_mlp_alpha3": dict(r=16, lora_alpha=3, target_modules=["o_proj", "up_proj", "down_proj"]),
    "r8_all_rslora": dict(r=8, lora_alpha=16, use_rslora=True,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]),
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    base = save_tiny(root / "base", vocab=5, layers=2)
    adapters = {name: save_adapter(base, root / name, i, **cfg) for i, (name, cfg) in enumerate(CONFIGS.items())}
    return str(base), adapters


def peft_logits(base, path, seq):
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), path).eval()
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0]


@pytest.mark.parametrize("lora", ["kernel", "torch"])
@pytest.mark.parametrize("backend", ["fast", "batched"])
def test_fast_path_equals_peft_for_mixed_ranks_targets_and_scalings(mixed, backend, lora, monkeypatch):
    """Ranks 4, 8 and 16 (the CPU kernel pads them to 16 and fuses q/k/v to 48), with the deltas
    on the CPU kernel (cpu_lora.py) or PyTorch's matmuls (PERSONAMIX_CPU_LORA=torch)."""
    base, adapters = mixed
    monkeypatch.setattr(cpu_lora, "CPU_LORA", lora)
    gen = Generator.from_pretrained(base, adapters=adapters, backend=backend, device="cpu")
    assert gen.backend.kind == backend
    rows = (gen.backend.lora if backend == "batched" else gen.backend).rows
    if lora == "torch" or os.environ.get("PERSONAMIX_REQUIRE_AVX2_KERNEL"):
        assert rows.kernel == (lora == "kernel")
    got = Session(gen.backend).logits("all", SEQ, len(SEQ))
    with torch.no_grad():
        ref = LlamaForCausalLM.from_pretrained(base).eval()(torch.tensor([SEQ])).logits[0]
    want = torch.stack([ref] + [peft_logits(base, p, SEQ) for p in adapters.values()])
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(want[1], want[0], atol=1e-2)      # the adapters really change the model


@pytest.mark.parametrize("backend", ["fast", "batched"])
def test_subsets_and_order_of_adapters(mixed, backend):
    base, adapters = mixed
    gen = Generator.from_pretrained(base, adapters=adapters, backend=backend, device="cpu")
    names = list(adapters)[::-1][:2]
    got = Session(gen.backend, names).logits("prefs", SEQ, 4)
    want = torch.stack([peft_logits(base, adapters[n], SEQ)[-4:] for n in names])
    assert torch.allclose(got, want, atol=1e-5)
    ref_only = Session(gen.backend, names).logits("ref", SEQ, 2)
    with torch.no_grad():
        plain = LlamaForCausalLM.from_pretrained(base).eval()(torch.tensor([SEQ])).logits[0, -2:]
    assert torch.allclose(ref_only[0], plain, atol=1e-5)


@pytest.mark.parametrize("backend", ["fast", "batched"])
def test_rollback_on_fast_path(mixed, backend):
    base, adapters = mixed
    gen = Generator.from_pretrained(base, adapters=adapters, backend=backend, device="cpu")
    s = Session(gen.backend)
    s.logits("all", SEQ[:5])
    s.logits("all", SEQ[:5] + [4, 4], 2)       # a rejected draft
    rolled = s.logits("all", SEQ, 3)
    assert torch.allclose(rolled, Session(gen.backend).logits("all", SEQ, 3), atol=1e-5)


@pytest.mark.parametrize("onednn", [False, True])
def test_adapters_cost_their_own_size_not_a_model_copy(mixed, onednn):
    base, adapters = mixed
    gen = Generator.from_pretrained(base, adapters=adapters, backend="fast", device="cpu", onednn=onednn)
    model = gen.backend.model
    plain = LlamaForCausalLM.from_pretrained(base)
    n_weights = sum(p.numel() for p in model.parameters())
    packed = [m for m in model.modules() if isinstance(m, (PackedLinear, PanelLinear))]
    assert (len(packed) > 0) == onednn
    n_weights += sum(m.in_features * m.out_features for m in packed)
    for m in packed:   # the stored copy: oneDNN's, or our kernels' panels (zero columns up to a multiple of 16 or 32)
        stored = m.packed.numel() if isinstance(m, PackedLinear) else m.panels.numel()
        pad = 16 if isinstance(m, PackedLinear) else m.PANEL
        assert m.in_features * m.out_features <= stored < m.in_features * (m.out_features + pad)
    tied_copy = plain.lm_head.weight.numel() if onednn and plain.config.tie_word_embeddings else 0
    assert n_weights == sum(p.numel() for p in plain.parameters()) + tied_copy   # packing: one copy of a tied lm_head
    extra = sum(b.numel() for b in model.buffers() if b.dim() == 3)            # stacked A and B
    lora = sum(t.numel() for p in adapters.values() for t in load_file(f"{p}/adapter_model.safetensors").values())
    assert extra <= 3 * 16 / 4 * lora     # zero padding to the largest rank (16) is the only overhead


def test_unsupported_adapter_is_refused_or_falls_back(mixed, tmp_path):
    base, _ = mixed
    dora = save_adapter(base, tmp_path / "dora", 0, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(UnsupportedAdapter, match="use_dora"):
        Generator.from_pretrained(base, adapters={"D": dora}, backend="fast", device="cpu")
    with pytest.warns(UserWarning, match="falling back to PEFT"):
        gen = Generator.from_pretrained(base, adapters={"D": dora}, device="cpu")
    assert type(gen.backend).__name__ == "SeparateModelsBackend"    # PEFT cannot batch DoRA: merged copy
    want = peft_logits(base, dora, SEQ)[-1]
    assert torch.allclose(Session(gen.backend).logits("prefs", SEQ)[0, -1], want, atol=1e-5)


def test_bad_backend_name(mixed):
    base, adapters = mixed
    with pytest.raises(PersonamixError, match="backend must be"):
        Generator.from_pretrained(base, adapters=adapters, backend="turbo", device="cpu")
