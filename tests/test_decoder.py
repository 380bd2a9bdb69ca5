"""The packed forward's decoder as a plain function (decoder.py): the model's own forward, bit
for bit with PyTorch's pointwise ops (TorchOps; the AVX2 ones: test_cpu_pointwise.py), for the
models it takes; the model's own forward for every other one."""
import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from personamix.backends.batching import ATTENTION, SHORT, BatchingBackend, Call, forward_calls, token_adapters
from personamix.backends.cache import KVPool, SlabCache
from personamix.backends.decoder import TorchOps, packed_decoder
from personamix.testing import save_lora, save_tiny, tiny_model

SEQ = [0, 3, 1, 4, 2, 2, 0, 1, 3, 4, 4, 1, 0, 2, 3, 1, 0, 4, 2, 1]
SMALL = dict(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=4)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder")
    base = save_tiny(root / "base", vocab=5, layers=2, hidden=32)
    return str(base), {name: save_lora(base, root / name, seed=i) for i, name in enumerate("ENT")}


def varied_norms(model):
    """The model with every norm's weight its own (they start as ones: a norm read from the wrong
    layer would compute the same)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def packed_logits(model_or_backend, decoder, plans) -> list[torch.Tensor]:
    """Each plan (the adapter of each of its rows, prefix length, new tokens) as a call over a fresh
    cache, all in ONE packed forward, then as a call over that cached prefix, again all in one;
    the logits of both forwards. A backend sets its LoRA rows; a bare model has none."""
    backend = model_or_backend if isinstance(model_or_backend, BatchingBackend) else None
    model = backend.model if backend else model_or_backend
    pool, out = KVPool(slots=4, capacity=4), []
    calls = [Call(torch.tensor(SEQ[:prefix]), SlabCache(pool, len(rows)), 2, rows) for rows, prefix, _ in plans]
    for step in (0, 1):
        if step:
            calls = [Call(torch.tensor(SEQ[prefix:prefix + new]), c.cache, new, c.adapters)
                     for c, (_, prefix, new) in zip(calls, plans)]
        if backend:
            with backend.lora.packed_rows(token_adapters(calls)):
                forward_calls(model, calls, pool, decoder)
        else:
            forward_calls(model, calls, pool, decoder)
        out += [c.logits for c in calls]
    return out


def test_fused_lora_decoder_is_the_models_forward_bit_for_bit(adapters):
    """Through the batched backend (fused q/k/v with LoRA deltas, oneDNN-packed layers): calls of
    the reference and of adapter subsets, one-token, chunk and prompt-long, over cached prefixes:
    the same logits, to the last bit, as the model's own forward."""
    base, paths = adapters
    backend = BatchingBackend(varied_norms(LlamaForCausalLM.from_pretrained(base).eval()), paths)
    assert backend.decoder is not None                        # the batched backend uses it
    backend.decoder.ops = TorchOps     # transformers' ops (on CPU the backend runs AVX2 kernels: test_cpu_pointwise)
    plans = [([-1], 3, 1), ([-1, 0, 1, 2], 5, 4), ([2, 0], 2, SHORT + 3), ([1], 7, 2)]
    with torch.inference_mode():
        got, want = packed_logits(backend, backend.decoder, plans), packed_logits(backend, None, plans)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_plain_decoder_is_the_models_forward_bit_for_bit(family):
    """On a model as transformers built it (q/k/v apart, plain nn.Linear; Qwen2's with biases)."""
    torch.manual_seed(0)
    model = tiny_model(vocab=5, hidden=16, layers=2) if family == "llama" else \
        Qwen2ForCausalLM(Qwen2Config(**SMALL)).eval()
    model = varied_norms(model)
    model.set_attn_implementation(ATTENTION)
    decoder = packed_decoder(model)
    assert decoder is not None and not decoder.layers[0].fused
    plans = [([-1], 3, 1), ([-1], 5, 4), ([-1], 2, SHORT + 3)]
    with torch.inference_mode():
        got, want = packed_logits(model, decoder, plans), packed_logits(model, None, plans)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_models_of_another_shape_keep_their_own_forward():
    """Qwen3 normalises queries and keys per head; Gemma scales its embeddings and offsets its
    norms: not the Llama layer this decoder reproduces."""
    assert packed_decoder(Qwen3ForCausalLM(Qwen3Config(**SMALL))) is None
    assert packed_decoder(GemmaForCausalLM(GemmaConfig(**SMALL))) is None


class OffsetNorm(LlamaRMSNorm):
    """An RMS norm of Llama's shape that scales by (1 + weight), as Gemma's does."""

    def forward(self, x):
        return (1 + self.weight) * super().forward(x) / self.weight


def test_a_decoder_that_would_compute_otherwise_is_not_used(adapters):
    """A model whose layers look like Llama's but compute something else: the load-time probe
    finds that, and the backend keeps the model's own forward (right logits, only slower)."""
    base, paths = adapters
    model = LlamaForCausalLM.from_pretrained(base).eval()
    layer = model.model.layers[1]
    norm = OffsetNorm(layer.input_layernorm.weight.shape[0], eps=layer.input_layernorm.variance_epsilon)
    norm.load_state_dict(layer.input_layernorm.state_dict())
    layer.input_layernorm = norm
    assert packed_decoder(model) is not None                  # its shape passes ...
    backend = BatchingBackend(model, paths)
    assert backend.decoder is None                            # ... its numbers do not
