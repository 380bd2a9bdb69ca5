"""The user-facing API: `Generator.from_pretrained(...).generate(prompt, persona=..., method=...)`.

A Generator is a backend (backends/, or any implementation of engine.session.Backend) plus a
tokenizer; `generate` / `stream` turn a prompt and SamplingParams into a target (engine/targets.py)
and run the method's sampler (engine/samplers/) over a Session of that backend.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters import shipped_adapters
from .backends import build_backend
from .detokenize import Detokenizer
from .engine.params import SamplingParams
from .engine.samplers import METHODS
from .engine.session import Backend, Session
from .engine.stats import Stats
from .engine.targets import Target, resolve_weights
from .errors import PersonamixError, first_line
from .loading import DEFAULT_MODEL, load_reference, pick_device

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


@dataclass
class GenerationResult:
    """text and token_ids hold the new tokens only (an end-of-sequence token is not included)."""

    text: str
    token_ids: list[int]
    stats: Stats
    prompt_ids: list[int]
    finish_reason: str            # "stop" (end-of-sequence token) or "length" (max_new_tokens)
    weights: dict[str, float] = field(default_factory=dict)
    seed: int = 0                 # the seed used (drawn at random when none was given)


class TextStream:
    """Iterator over text pieces of a generation; `.result` is set once it is exhausted."""

    def __init__(self, gen: Generator, tokens: Iterator[list[int]], run: _Run):
        self._gen, self._tokens, self._run = gen, tokens, run
        self._text = ""
        self._detokenizer = Detokenizer(gen.tokenizer)   # each step decodes its new tokens only
        self.result: GenerationResult | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        for _ in self._tokens:
            piece = self._detokenizer.step(self._run.token_ids)    # "" until it adds whole characters
            if piece:
                self._text += piece
                return piece
        if self.result is None:
            self.result = self._run.result(self._gen.tokenizer)
            piece = self.result.text[len(self._text):]
            self._text = self.result.text
            if piece:
                return piece
        raise StopIteration

    @property
    def stats(self) -> Stats:
        """Live statistics of the generation (updated after every committed step)."""
        return self._run.stats

    @property
    def token_ids(self) -> list[int]:
        """The new tokens committed so far."""
        return self._run.token_ids

    def close(self) -> None:
        """Stop early (e.g. a client went away): the sampler and its caches are released."""
        self._tokens.close()


@dataclass
class _Run:
    prompt_ids: list[int]
    stats: Stats
    weights: dict[str, float]
    seed: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"

    def result(self, tokenizer) -> GenerationResult:
        text = tokenizer.decode(self.token_ids, skip_special_tokens=True) if tokenizer is not None else ""
        return GenerationResult(text, list(self.token_ids), self.stats, self.prompt_ids,
                                self.finish_reason, self.weights, self.seed)


class Generator:
    """Multi-personality generation over a reference model and N preference models."""

    def __init__(self, backend: Backend, tokenizer=None, eos_token_ids: Sequence[int] = ()):
        self.backend = backend
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, adapters: Mapping[str, str] | str | None = None, *,
                        backend: str = "auto", device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, onednn: bool = True) -> Generator:
        """Load a reference (the embedded default's alias, a hub id or a local directory) and
        preference models: `adapters` maps a name ("E", "N", ...) to a PEFT LoRA adapter
        directory / hub id, or to a full model (see backends.build_backend for `backend`). A string
        names adapters shipped for the default model: "mbti", "roleplay" or "mbti,roleplay".
        onednn: on CPU, run linear layers with prepacked weights (faster; on x86 CPUs with AVX2 or
            AVX-512 personamix's own kernels, else oneDNN's: backends/packing.py;
            PERSONAMIX_CPU_KERNEL chooses).
        dtype: the models' dtype; default fp32, or bf16 on a GPU that supports it."""
        if isinstance(adapters, str):
            adapters = shipped_adapters(adapters, model)
        device = pick_device(device)
        if dtype is None and device.type == "cuda" and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16     # half the memory and bandwidth; dtype=torch.float32 keeps fp32
        ref, tokenizer = load_reference(model, device, dtype)
        if ref.config.get_text_config().vocab_size < len(tokenizer):
            raise PersonamixError(f"tokenizer of {model!r} has {len(tokenizer)} tokens but the model only "
                                  f"{ref.config.get_text_config().vocab_size} embeddings")
        return cls(build_backend(ref, tokenizer, adapters, backend, dtype, onednn), tokenizer, _eos_ids(ref, tokenizer))

    @classmethod
    def from_engine(cls, url: str, adapters: Sequence[str] | None = None, *, tokenizer: str | None = None,
                    timeout: float = 60.0, retries: int = 2, api_key: str | None = None) -> Generator:
        """Use models served by an inference engine (vLLM's OpenAI-compatible server at `url`):
        its base model is the reference and its LoRA adapters named in `adapters` (default: all it
        serves) are the preference models; personamix samples over HTTP (backends/remote.py).
        `tokenizer`: a local copy of the model's tokenizer (alias, directory or hub id); default: the
        engine's model directory when it is on this machine, else the engine's /tokenize. A local
        tokenizer is checked against the engine's. Every call times out after `timeout` seconds and
        is retried `retries` times."""
        from .backends.remote import EngineTokenizer, RemoteBackend
        from .backends.vllm_engine import VllmEngine

        client = VllmEngine(url, timeout=timeout, retries=retries, api_key=api_key)
        try:
            tok, eos = _engine_tokenizer(client, tokenizer)
            if tok is None:
                eos = _engine_eos(client)
                tok, vocab = EngineTokenizer(client, eos), 2**31 - 1   # the engine checks token ids itself
            else:
                vocab = len(tok)
            backend = RemoteBackend(client, client.info.adapters if adapters is None else list(adapters), vocab)
        except BaseException:
            client.close()
            raise
        return cls(backend, tok, eos)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return self.backend.names

    # -- prompts -----------------------------------------------------------------------------

    def encode(self, prompt: Prompt, chat_template: bool = True) -> list[int]:
        """Token ids of a prompt. A string gets the model's chat template when it has one (and
        `chat_template` is on); a list of {"role", "content"} messages always does; a list of
        ints is used as given."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise PersonamixError("this generator has no tokenizer: pass token ids")
            if chat_template and getattr(self.tokenizer, "chat_template", None):
                ids = self._apply_template([{"role": "user", "content": prompt}])
            else:
                ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
            if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
                raise PersonamixError("chat messages need a tokenizer with a chat template")
            for m in prompt:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise PersonamixError("each chat message needs string 'role' and 'content' fields")
            ids = self._apply_template(list(prompt))
        elif isinstance(prompt, (Sequence, torch.Tensor)) and not isinstance(prompt, (bytes, bytearray)):
            ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise PersonamixError("a prompt list must hold token ids (ints) or chat messages (dicts)")
            bad = [t for t in ids if not 0 <= t < self.backend.vocab_size]
            if bad:
                raise PersonamixError(f"token id(s) {bad[:5]} outside the vocabulary 0..{self.backend.vocab_size - 1}")
        else:
            raise PersonamixError("prompt must be a string, a list of token ids or chat messages, got "
                                  f"{type(prompt).__name__}")
        if not ids:
            raise PersonamixError("the prompt is empty: at least one token is needed")
        return ids

    def _apply_template(self, messages: list) -> list[int]:
        return _chat_ids(self.tokenizer, messages)

    # -- generation --------------------------------------------------------------------------

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, *, chat_template: bool = True,
                 **settings: Any) -> GenerationResult:
        """Generate from `prompt` with a persona / weights and a sampling method.

        Settings are SamplingParams' fields, given as `params` or as keyword arguments (which
        change `params` when both are given): persona ("ENTJ") or weights ({"E": 0.7, "N": 0.3}),
        default equal weights on all; method "scr" | "spec" | "token" | "token-rs" | "base";
        aggregation "linear" | "geometric"; max_new_tokens (64), seed (None: random),
        temperature (1.0; 0 = greedy), top_k (0), top_p (1.0), k (4), window (20), gamma (1.2),
        warmup (5), bound ("window"), max_retries (256), ignore_eos (False).
        `chat_template`: whether a string prompt gets the model's chat template.
        """
        stream = self.stream(prompt, params, chat_template=chat_template, **settings)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *, chat_template: bool = True,
               **settings: Any) -> TextStream:
        """Like generate, but an iterator of text pieces as they are accepted; `.result` at the end."""
        tokens, run = self.stream_tokens(prompt, params, chat_template=chat_template, **settings)
        return TextStream(self, tokens, run)

    def stream_tokens(self, prompt: Prompt, params: SamplingParams | None = None, *, chat_template: bool = True,
                      **settings: Any) -> tuple[Iterator[list[int]], _Run]:
        """The token-level stream under `stream`: (iterator of committed token lists, run record)."""
        params = SamplingParams.from_kwargs(params, **settings)
        self.backend.check(params)
        if params.method == "base":
            alphas: dict[str, float] = {}
        else:
            alphas = resolve_weights(self.backend.names, params.persona, params.weights)
        # temperature 0 is greedy decoding of the temperature-1 target (the samplers take its argmax)
        target = Target(names=tuple(alphas), weights=tuple(alphas.values()), aggregation=params.aggregation,
                        temperature=params.temperature or 1.0, top_k=params.top_k, top_p=params.top_p)
        prompt_ids = self.encode(prompt, chat_template)
        room = self.backend.max_length - len(prompt_ids)
        if room < 1:
            raise PersonamixError(f"the prompt has {len(prompt_ids)} tokens; the model's context is "
                                  f"{self.backend.max_length}: shorten the prompt")
        if params.max_new_tokens > room:
            raise PersonamixError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                                  f"exceeds the model's context of {self.backend.max_length}; at most {room} new "
                                  "tokens fit")
        run = _Run(prompt_ids, Stats(params.method), alphas,
                   secrets.randbits(63) if params.seed is None else params.seed)
        return self._tokens(run, target, params), run

    def _tokens(self, run: _Run, target: Target, params: SamplingParams) -> Iterator[list[int]]:
        rng = torch.Generator(device=self.backend.device)
        rng.manual_seed(run.seed)
        session = Session(self.backend, target.names)
        sampler = METHODS[params.method](session, run.prompt_ids, target, params, rng, run.stats)
        stats, start = run.stats, time.perf_counter()
        try:
            for step in sampler:
                out = []
                for t in step:
                    if t in self.eos_token_ids and not params.ignore_eos:
                        run.finish_reason = "stop"
                        break
                    out.append(t)
                    if len(run.token_ids) + len(out) >= params.max_new_tokens:
                        break
                run.token_ids.extend(out)
                stats.new_tokens = len(run.token_ids)
                stats.forward_passes, stats.round_trips = session.forward_passes, session.round_trips
                stats.elapsed_s = time.perf_counter() - start
                if out:
                    yield out
                if run.finish_reason == "stop" or len(run.token_ids) >= params.max_new_tokens:
                    break
        finally:
            sampler.close()
            session.close()
            stats.forward_passes, stats.round_trips = session.forward_passes, session.round_trips
            stats.elapsed_s = time.perf_counter() - start


def _chat_ids(tokenizer, messages: list) -> list[int]:
    """Token ids of chat messages with the tokenizer's chat template and a generation prompt."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, Mapping):      # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def _engine_tokenizer(client, name: str | None):
    """(local tokenizer, EOS ids) matching the engine's, or (None, None) when none is at hand."""
    import os

    from transformers import AutoTokenizer, GenerationConfig

    from .loading import resolve_model

    source = resolve_model(name) if name is not None else client.info.root
    if source is None:
        return None, None
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as e:   # not local and no hub: the engine's own tokenizer will do
        if name is not None:
            raise PersonamixError(f"cannot load the tokenizer {name!r}: {first_line(e)}") from None
        return None, None
    probe = [{"role": "user", "content": "Hi! Ünïcödé, numbers 12345 and <tags>?"}]
    local = _chat_ids(tok, probe) if getattr(tok, "chat_template", None) else tok(probe[0]["content"])["input_ids"]
    remote = client.tokenize(messages=probe) if getattr(tok, "chat_template", None) else \
        client.tokenize(text=probe[0]["content"])
    if local != remote:
        raise PersonamixError(
            f"the tokenizer {source!r} does not match the engine's (a probe message is {local[:12]}... here and "
            f"{remote[:12]}... on the engine, serving {client.info.base!r}): ratios pi_i/pi_ref need one vocabulary; "
            "pass tokenizer= the engine model's tokenizer")
    ids: list[int] = []
    config = None
    if os.path.isdir(source):
        try:
            config = GenerationConfig.from_pretrained(source)
        except OSError:
            config = None
    for value in (getattr(config, "eos_token_id", None), tok.eos_token_id):
        if value is not None:
            ids.extend(value if isinstance(value, (list, tuple)) else [value])
    return tok, sorted(set(int(i) for i in ids))


def _engine_eos(client) -> list[int]:
    """EOS ids from the engine's tokenizer info (vLLM: --enable-tokenizer-info-endpoint); [] when
    it does not say (generations then end at max_new_tokens)."""
    info = client.tokenizer_info() or {}
    eos = info.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if isinstance(eos, str):
        return client.tokenize(text=eos)[-1:]
    return []


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        ids.extend(value if isinstance(value, (list, tuple)) else [value])
    return sorted(set(int(i) for i in ids))


__all__ = ["Generator", "GenerationResult", "TextStream"]
