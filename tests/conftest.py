"""Tiny random models for the tests: a real LlamaForCausalLM with a handful of tokens, a real
word-level tokenizer, and real PEFT LoRA adapters saved as adapter directories."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]


def tiny_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    words = WORDS[:vocab]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0])


def tiny_model(vocab: int = 5, hidden: int = 16, layers: int = 1, seed: int = 0,
               max_positions: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=max_positions, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # peaked, varied next-token distributions
        model.lm_head.weight.mul_(10.0)
        model.model.embed_tokens.weight.mul_(20.0)
    return model.eval()


def save_tiny(path, vocab: int = 5, **kw):
    model = tiny_model(vocab, **kw)
    model.save_pretrained(path)
    tiny_tokenizer(vocab).save_pretrained(path)
    return path


def save_lora(base_dir, out_dir, seed: int, r: int = 4, scale: float = 0.5,
              targets=("q_proj", "v_proj", "o_proj", "down_proj")):
    """A random (non-zero) LoRA adapter on the model saved at base_dir."""
    model = LlamaForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(1000 + seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    peft_model.save_pretrained(out_dir)
    return str(out_dir)


CHAT_WORDS = ["<unk>", "<pad>", "</s>", "user", "assistant", "loud", "party", "friends", "quiet", "alone", "book",
         "what", "do", "you", "like", "today", "now"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}assistant {% endif %}")


def save_chat_tiny(path, hidden: int = 16, seed: int = 0, layers: int = 1, max_positions: int = 64,
                   words: list[str] = CHAT_WORDS):
    """A tiny Llama whose word-level tokenizer has a chat template and an end-of-sequence token."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=max_positions,
                      eos_token_id=2, pad_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny reference (vocabulary of 5) with three LoRA adapters E, N, T."""
    root = tmp_path_factory.mktemp("tiny")
    base = save_tiny(root / "base", vocab=5)
    adapters = {name: save_lora(base, root / name, seed=i) for i, name in enumerate("ENT")}
    return base, adapters


@pytest.fixture(scope="session")
def tiny_gen(tiny_dir):
    from personamix import Generator

    base, adapters = tiny_dir
    return Generator.from_pretrained(str(base), adapters=adapters, device="cpu")


@pytest.fixture(scope="session")
def tiny3_gen(tmp_path_factory):
    """A vocabulary of 3 (27 sequences of length 3) with adapters E, N, T."""
    from personamix import Generator

    root = tmp_path_factory.mktemp("tiny3")
    base = save_tiny(root / "base", vocab=3, seed=3)
    adapters = {name: save_lora(base, root / name, seed=10 + i, scale=0.7) for i, name in enumerate("ENT")}
    return Generator.from_pretrained(str(base), adapters=adapters, device="cpu")
