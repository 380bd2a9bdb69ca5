"""Tiny random models for tests, benchmarks and examples: a real LlamaForCausalLM with a handful
of tokens, a real word-level tokenizer (optionally with a chat template), and real PEFT LoRA
adapters saved as adapter directories. Nothing here is trained: use them for mechanics, speed
and exactness checks, not for text."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils._python_dispatch import TorchDispatchMode
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


# ---------------------------------------------------------------------------------------------
# Exactness: a sampler's distribution over whole sequences against the target, by enumeration
# ---------------------------------------------------------------------------------------------

PROMPT = [0, 1, 2, 1]


def sequence_distribution(gen, weights, aggregation, length, reference=False, prompt=PROMPT):
    """Exact P(x_1..x_length) under the token-level target p* (or pi_ref), by enumeration."""
    from .engine.session import Session
    from .engine.targets import Target, log_probs, token_target

    target = Target(names=tuple(weights), weights=tuple(weights.values()), aggregation=aggregation)
    session = Session(gen.backend, target.names)
    out = {}
    for seq in itertools.product(range(gen.backend.vocab_size), repeat=length):
        logp_total = 0.0
        for j in range(length):
            logp = log_probs(session.logits("all", list(prompt) + list(seq[:j]))[:, -1], target)
            step = logp[0] if reference else token_target(logp, target)[0]
            logp_total += float(step[seq[j]])
        out[seq] = math.exp(logp_total)
    return out


def empirical(gen, n, length, prompt=PROMPT, **kw):
    """The empirical distribution of n seeded generations of `length` tokens."""
    counts = Counter(tuple(gen.generate(list(prompt), max_new_tokens=length, seed=i, ignore_eos=True, **kw).token_ids)
                     for i in range(n))
    return {x: c / n for x, c in counts.items()}


def tv(p, q):
    """Total-variation distance of two distributions given as {outcome: probability}."""
    return 0.5 * sum(abs(p.get(x, 0.0) - q.get(x, 0.0)) for x in set(p) | set(q))


def tv_bound(p, n, delta=1e-4):
    """A TV that n samples of an exact sampler of p exceed with probability < delta. TV(empirical, p)
    is (1/n)-Lipschitz in each sample, so by McDiarmid P(TV >= E[TV] + t) <= exp(-2 n t^2), and
    E[TV] <= 1/2 sum_x sqrt(p(x)(1 - p(x)) / n)."""
    return 0.5 * sum(math.sqrt(v * (1 - v) / n) for v in p.values()) + math.sqrt(math.log(1 / delta) / (2 * n))





# ---------------------------------------------------------------------------------------------
# A real vLLM server for the remote backend's tests and benchmarks (CPU build, its own venv)
# ---------------------------------------------------------------------------------------------

#: PEFT module names -> vLLM's (it packs q/k/v and gate/up). Serving LoRA on only the adapters'
#: modules keeps vLLM 0.32 from wrapping lm_head in its LoRA logits processor, which crashes the
#: engine when a prompt_logprobs request shares a batch with another request (docs/scale-out.md).
VLLM_MODULES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
                "up_proj": "gate_up_proj"}


def vllm_python() -> Path:
    """The Python of the vLLM venv: $PERSONAMIX_VLLM_PYTHON, else <cache>/vllm-venv (`make vllm`)."""
    import os

    from .loading import cache_dir

    env = os.environ.get("PERSONAMIX_VLLM_PYTHON")
    return Path(env) if env else cache_dir() / "vllm-venv" / "bin" / "python"


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` serving `model` (a directory) under `name`
    with LoRA `adapters` {name: dir} on 127.0.0.1, its log in `log_path`; `block_size` 32: vLLM's CPU
    default (128) leaves contexts shorter than a block out of its prefix cache. Start with `start()`
    (returns when /health answers, within `startup_s`); `pause()` / `resume()` stop and continue
    the process (a stalled engine); `stop()` ends it."""

    def __init__(self, model: str, name: str, adapters: dict[str, str], *, port: int | None = None,
                 max_logprobs: int = 20, max_model_len: int = 2048, block_size: int | None = 32,
                 extra: tuple[str, ...] = (),
                 log_path: str | Path | None = None, startup_s: float = 600.0):
        import socket
        import tempfile

        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port, self.url = port, f"http://127.0.0.1:{port}/v1"
        import json

        rank, modules = 8, set()
        for path in adapters.values():
            cfg = Path(path) / "adapter_config.json"
            if cfg.is_file():
                cfg = json.loads(cfg.read_text())
                rank = max(rank, int(cfg.get("r", 8)))
                modules |= {VLLM_MODULES.get(m, m) for m in cfg.get("target_modules") or ()}
        self.cmd = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                    "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
                    "--max-model-len", str(max_model_len), "--dtype", "float32", "--max-logprobs", str(max_logprobs),
                    "--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(max(1, min(len(adapters), 8))),
                    "--lora-modules", *[f"{n}={p}" for n, p in adapters.items()],
                    *(["--lora-target-modules", *sorted(modules)] if modules else []),
                    *(["--block-size", str(block_size)] if block_size else []), *extra]
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="vllm-")) / "server.log"
        self.startup_s = startup_s
        self.proc = None

    def start(self) -> VllmServer:
        import os
        import subprocess
        import time

        import httpx

        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + self.startup_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode} while starting; log: {self.log_path}\n"
                                   + self.log_tail())
            try:
                if httpx.get(self.url.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"vLLM did not start within {self.startup_s:.0f} s; log: {self.log_path}\n"
                           + self.log_tail())

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def pause(self) -> None:
        import os
        import signal

        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        import os
        import signal

        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        import os
        import signal

        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, OSError):
                pass
            except Exception:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)

    def kill(self) -> None:
        import os
        import signal

        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


class SamplerWork(TorchDispatchMode):
    """What a sampler asks of PyTorch between its backend's forwards, counted while generating
    (one generation at a time) inside `with SamplerWork(backend) as work:`. `ops`: tensor
    operations dispatched (on a GPU each is a kernel launch or more, issued under the GIL).
    `reads`: read-backs to the host:
    `.item()`, `int(t)` and the like, `.tolist()` (which reads a CPU tensor without dispatching, so
    it is counted where it is called), and nonzero / unique, whose output's size is read back; on a
    GPU each waits for the stream to drain. Neither depends on the device: a CPU run says what a GPU
    step pays. The models' forwards (the backend's `forward`, `forward_together` and the batched
    backend's `run`) are not counted, but the draws and chunk scores a backend makes for the
    sampler are (`Backend.forward_draw`; the batched backend's `draw_calls` and `score_calls`);
    `forwards` says how many ran.
    `backend=None`: count everything in the block."""

    SIZED = (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten._unique2,
             torch.ops.aten.unique_dim, torch.ops.aten.masked_select)
    UNCOUNTED = ("forward", "forward_together", "run")     # the models' work
    COUNTED = ("draw_calls", "score_calls")                # the sampler's, inside `run`

    def __init__(self, backend=None) -> None:
        super().__init__()
        self.backend, self.ops, self.reads, self.forwards, self._counting = backend, 0, 0, 0, True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._counting:
            self.ops += 1
            self.reads += func.overloadpacket in self.SIZED
        return func(*args, **(kwargs or {}))

    def _switched(self, f, counting: bool):
        def run(*args, **kwargs):
            outer, self._counting = self._counting, counting   # one backend method may call another
            try:
                return f(*args, **kwargs)
            finally:
                self._counting = outer
                self.forwards += outer and not counting
        return run

    def __enter__(self):
        names = [(n, c) for group, c in ((self.UNCOUNTED, False), (self.COUNTED, True)) for n in group
                 if self.backend is not None and hasattr(self.backend, n)]
        self._own = {name: vars(self.backend).get(name) for name, _ in names}
        for name, counting in names:
            setattr(self.backend, name, self._switched(getattr(self.backend, name), counting))
        tolist = self._tolist = torch.Tensor.tolist

        def counted_tolist(t):
            self.reads += self._counting
            return tolist(t)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        for name, own in self._own.items():
            if own is None:
                delattr(self.backend, name)       # the class's method again
            else:
                setattr(self.backend, name, own)
        return super().__exit__(*exc)


__all__ = ["sequence_distribution", "empirical", "tv", "tv_bound", "tiny_tokenizer", "tiny_model", "save_tiny",
           "save_lora", "save_chat_tiny", "CHAT_WORDS", "VllmServer", "vllm_python", "SamplerWork"]
