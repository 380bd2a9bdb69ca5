"""oneDNN-prepacked linear layers: same outputs as nn.Linear, the whole model swapped or left
untouched, and the backends giving the same logits with and without packing."""
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from personamix import Generator
from personamix.backends.onednn import PackedLinear, packing_problem
from personamix.backends.packing import pack_linears
from personamix.engine.session import Session
from personamix.testing import save_lora, save_tiny, tiny_model

SEQ = [1, 3, 0, 4, 2, 2, 1, 0]
pytestmark = pytest.mark.skipif(packing_problem(nn.Linear(8, 8)) is not None,
                                reason=f"oneDNN linear not usable here: {packing_problem(nn.Linear(8, 8))}")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24), (1, 40, 24)])
def test_packed_linear_equals_linear(bias, shape):
    torch.manual_seed(0)
    lin = nn.Linear(24, 56, bias=bias)
    x = torch.randn(shape)
    with torch.inference_mode():
        got, want = PackedLinear(lin)(x), lin(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(PackedLinear(lin).packed.to_dense(), lin.weight.detach())


def test_pack_linears_swaps_every_linear_and_keeps_the_logits():
    model, plain = tiny_model(vocab=5, hidden=32, layers=2), tiny_model(vocab=5, hidden=32, layers=2)
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert pack_linears(model, "onednn") == n_linear == 2 * 7 + 1
    assert not any(type(m) is nn.Linear for m in model.modules())
    ids = torch.tensor([SEQ])
    with torch.inference_mode():
        assert torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_tied_embeddings_still_embed():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=7, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.tensor([[1, 5, 2]])
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        pack_linears(model, "onednn")
        got = model(input_ids=ids).logits
    assert isinstance(model.lm_head, PackedLinear) and model.model.embed_tokens.weight.shape == (7, 16)
    assert torch.allclose(got, want, atol=1e-5)


def test_bfloat16_model_is_packed_or_left_alone():
    model, plain = tiny_model(hidden=32).to(torch.bfloat16), tiny_model(hidden=32).to(torch.bfloat16)
    packed = pack_linears(model, "onednn")
    assert packed in (0, 8)   # 0 where this build's oneDNN has no bf16 linear: then the model is untouched
    ids = torch.tensor([SEQ])
    with torch.inference_mode():
        got, want = model(input_ids=ids).logits.float(), plain(input_ids=ids).logits.float()
    assert torch.allclose(got, want, atol=0.1 * want.abs().max().item())


def test_a_failing_op_is_named_and_the_model_left_untouched(monkeypatch):
    def broken(self, x):
        raise RuntimeError("no kernel for this build")
    monkeypatch.setattr(PackedLinear, "forward", broken)   # stands in for a PyTorch build whose op fails
    model = tiny_model()
    with pytest.warns(UserWarning, match="no kernel for this build"):
        assert pack_linears(model, "onednn") == 0
    assert type(model.lm_head) is nn.Linear


def test_unsupported_dtype_leaves_the_model_untouched():
    model = tiny_model().to(torch.float16)
    assert "float16" in packing_problem(model.lm_head)
    assert pack_linears(model, "onednn") == 0
    assert type(model.lm_head) is nn.Linear


@pytest.mark.parametrize("backend", ["batched", "fast", "separate"])
def test_backends_give_the_same_logits_with_and_without_packing(tmp_path, backend):
    base = save_tiny(tmp_path / "base", hidden=32, layers=2)
    adapters = {n: save_lora(base, tmp_path / n, seed) for seed, n in enumerate(["A", "B"])}
    packed = Generator.from_pretrained(str(base), adapters=adapters, backend=backend, device="cpu")
    plain = Generator.from_pretrained(str(base), adapters=adapters, backend=backend, device="cpu", onednn=False)
    assert packed.backend.packed_linears > 0 and plain.backend.packed_linears == 0
    for group in ("ref", "prefs", "all"):
        got, want = Session(packed.backend).logits(group, SEQ, 3), Session(plain.backend).logits(group, SEQ, 3)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), group
    a = packed.generate(SEQ[:3], persona=None, weights={"A": 0.5, "B": 0.5}, method="token", max_new_tokens=6,
                        seed=1, ignore_eos=True)
    b = plain.generate(SEQ[:3], persona=None, weights={"A": 0.5, "B": 0.5}, method="token", max_new_tokens=6,
                       seed=1, ignore_eos=True)
    assert a.token_ids == b.token_ids
