"""`RemoteBackend` (backend "remote"): the reference and the N preference models are a base model
and LoRA adapters served by an inference engine (vLLM's OpenAI-compatible server; engines plug
in as an `EngineClient`, one module each: vllm_engine.py). personamix orchestrates over HTTP.

What an engine gives, and what each method needs of it:

    sampled tokens + their log-probs     the engine drafts a chunk from the reference in ONE call
    prompt log-probs of given tokens     log pi_i(c_j | Y, c_<j) of a drafted chunk under adapter i
    log-probs of given next tokens       log pi_i(t | Y) of a few proposals t (Token-RS)
    whole next-token distributions       only where the engine allows it (vLLM: --max-logprobs -1)

`base`, `scr` and `token-rs` need the first three ("scores only"); the exact `token` and `spec`
(and temperature-0 `token-rs`) need whole distributions, which this backend then returns as
dense log-probs through the usual `forward`, so those samplers run unchanged.

Engines apply no temperature, top-k or top-p to prompt log-probs (vLLM: "prompt tokens do not
go through sampling processors"), so the scores-only path serves the temperature-1, untruncated
target only, and refuses other settings with that reason. The engine's log-prob mode never
matters: sampled-token log-probs are read only where raw and processed ones coincide.

Every call has a timeout and a bounded number of retries (the client's); the N scoring calls of
one step run concurrently.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import torch

from ..engine.session import Backend, Group
from ..errors import PersonamixError


class ScoringWays:
    """Which way of scoring a chunk is faster, learnt per context length (in powers of two): each
    way is timed on its first calls, then the faster is used and the other retried every
    RETRY-th call. Thread-safe; the numbers are the same either way, only the time differs."""

    WAYS = ("prompt", "next")
    RETRY = 16

    def __init__(self):
        self._lock = threading.Lock()
        self._cost: dict[int, dict[str, float]] = {}     # bucket -> way -> smoothed seconds
        self._calls: dict[int, int] = {}

    def pick(self, length: int) -> str:
        bucket = max(length, 1).bit_length()
        with self._lock:
            cost = self._cost.setdefault(bucket, {})
            n = self._calls[bucket] = self._calls.get(bucket, 0) + 1
            untried = [w for w in self.WAYS if w not in cost]
            if untried:
                return untried[0]
            best = min(cost, key=cost.get)
            return next(w for w in self.WAYS if w != best) if n % self.RETRY == 0 else best

    def record(self, length: int, way: str, seconds: float) -> None:
        bucket = max(length, 1).bit_length()
        with self._lock:
            cost = self._cost.setdefault(bucket, {})
            cost[way] = seconds if way not in cost else 0.7 * cost[way] + 0.3 * seconds


@dataclass(frozen=True)
class EngineInfo:
    """What a client learned about the engine when it connected."""

    url: str
    base: str                          # the base model's name on the engine
    adapters: tuple[str, ...]          # the LoRA adapters it serves, by name
    max_length: int                    # context length
    root: str | None = None            # the base model's path or hub id on the engine (to find a tokenizer)
    full_distributions: bool = False   # whole next-token distributions can be read


@dataclass
class Sampled:
    """Tokens an engine sampled, with the log-probability it sampled each one with."""

    tokens: list[int]
    logprobs: list[float]


class EngineClient(ABC):
    """The calls a remote backend makes; `model` is the base model's or an adapter's name."""

    info: EngineInfo

    @abstractmethod
    def sample(self, model: str, prompt: Sequence[int], max_tokens: int, *, n: int = 1, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None, ignore_eos: bool = True,
               session_id: str | None = None) -> list[Sampled]:
        """n independent continuations of up to max_tokens tokens (fewer when EOS ends one).
        `session_id` (every call): one generation's id, so a router can keep its calls on one replica."""

    @abstractmethod
    def prompt_logprobs(self, model: str, prompt: Sequence[int], n_last: int, *, session_id: str | None = None
                        ) -> list[float]:
        """log P(prompt[i] | prompt[:i]) for the last n_last positions (temperature 1, no truncation)."""

    @abstractmethod
    def next_logprobs(self, model: str, prompt: Sequence[int], token_ids: Sequence[int], *,
                      session_id: str | None = None) -> list[float]:
        """log P(t | prompt) for each t in token_ids (temperature 1, no truncation)."""

    @abstractmethod
    def next_distribution(self, model: str, prompt: Sequence[int], *, session_id: str | None = None) -> torch.Tensor:
        """log P(. | prompt) over the whole vocabulary [V] (only where `info.full_distributions`)."""

    def healthy(self) -> bool:
        """Whether the engine answers its health check now (a short call, not retried)."""
        return True

    def tokenize(self, *, text: str | None = None, messages: list[dict] | None = None) -> list[int]:
        """Token ids of a text, or of chat messages with the engine's chat template."""
        raise NotImplementedError(f"{type(self).__name__} cannot tokenize")

    def detokenize(self, tokens: Sequence[int]) -> str:
        raise NotImplementedError(f"{type(self).__name__} cannot detokenize")

    def close(self) -> None:
        """Release connections."""
        return None


@dataclass
class RemoteCache:
    """The tokens a generation has sent for one group: the engine keeps its own KV cache (prefix
    caching), so rolling back is forgetting tokens."""

    tokens: list[int] = field(default_factory=list)


class RemoteBackend(Backend):
    """Scores rows of the reference (`client.info.base`) and adapters `names` on an engine."""

    kind = "remote"
    scores_remotely = True

    def __init__(self, client: EngineClient, names: Sequence[str], vocab_size: int, max_workers: int = 32):
        unknown = [n for n in names if n not in client.info.adapters]
        if unknown:
            raise PersonamixError(
                f"the engine at {client.info.url} does not serve adapter(s) {', '.join(unknown)}; it serves "
                f"{', '.join(client.info.adapters) or 'none'} on the base model {client.info.base!r} "
                "(vLLM: --enable-lora --lora-modules NAME=PATH ...)")
        self.client = client
        self.names = tuple(names)
        self.vocab_size = vocab_size
        self.max_length = client.info.max_length
        self.device = torch.device("cpu")
        self.full_distributions = client.info.full_distributions
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="personamix-engine")
        self._ways = ScoringWays()
        self._count = threading.Lock()
        self.calls = 0           # engine requests made
        self.round_trips = 0     # waits on the engine (concurrent requests count once)

    def check(self, params) -> None:
        method = params.method
        if (method in ("token", "spec") or (method == "token-rs" and params.greedy)) and not self.full_distributions:
            what = "temperature 0 (the target's argmax)" if method == "token-rs" else f"method {method!r}"
            raise PersonamixError(
                f"{what} needs whole next-token distributions of every model, which the engine at "
                f"{self.client.info.url} does not return (vLLM: start it with --max-logprobs -1); over this engine "
                "use method 'scr', 'token-rs' or 'base'")
        if method in ("scr", "token-rs") and not params.greedy and (
                params.temperature != 1.0 or params.top_k or params.top_p < 1.0):
            raise PersonamixError(
                f"method {method!r} over an inference engine needs temperature 1, top_k 0 and top_p 1: it reads "
                "the preference models' log-probs of given tokens, which the engine computes without temperature "
                "or truncation (vLLM: prompt tokens do not go through the sampling processors), so a tempered or "
                "truncated target cannot be formed from them; use method 'base', or 'token' / 'spec' with an "
                "engine that returns whole distributions (vLLM --max-logprobs -1)")

    def models(self, group: Group, names: Sequence[str]) -> list[str]:
        return {"ref": [self.client.info.base], "prefs": list(names), "all": [self.client.info.base, *names]}[group]

    # -- the dense contract (whole distributions) --------------------------------------------

    def new_cache(self, group: Group, names: Sequence[str]) -> RemoteCache:
        return RemoteCache()

    def crop(self, cache: RemoteCache, n_remove: int) -> None:
        del cache.tokens[len(cache.tokens) - n_remove:]

    def forward(self, group: Group, tokens: torch.Tensor, cache: RemoteCache, n_logits: int,
                names: Sequence[str]) -> tuple[torch.Tensor, int]:
        """Whole next-token distributions (as log-probs, which `log_probs` treats like logits)
        after each of the last n_logits tokens: one request per (row, position), all at once."""
        if not self.full_distributions:
            raise PersonamixError(
                f"this needs whole next-token distributions, which the engine at {self.client.info.url} does "
                "not return (vLLM: start it with --max-logprobs -1); methods base, scr and token-rs need only "
                "sampled tokens and prompt log-probs")
        models = self.models(group, names)
        if not models:
            raise PersonamixError("no preference models take part")
        seq = cache.tokens + [int(t) for t in tokens.tolist()]
        jobs = [(m, seq[: len(seq) - n_logits + 1 + j]) for m in models for j in range(n_logits)]
        dists = self.gather([(self.client.next_distribution, m, prefix) for m, prefix in jobs])
        cache.tokens = seq
        return torch.stack(dists).view(len(models), n_logits, -1), len(jobs)

    # -- the scores-only contract --------------------------------------------------------------

    def sample(self, seq: Sequence[int], max_tokens: int, *, temperature: float, top_k: int, top_p: float,
               seed: int, ignore_eos: bool = True, session: str | None = None) -> Sampled:
        """A continuation of the reference, sampled by the engine (temperature 0: greedy)."""
        return self.background(self._one, list(seq), max_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed, ignore_eos=ignore_eos, session_id=session).result()

    def _one(self, seq: list[int], max_tokens: int, **settings) -> Sampled:
        return self.client.sample(self.client.info.base, seq, max_tokens, **settings)[0]

    def propose(self, seq: Sequence[int], n: int, *, seed: int, session: str | None = None) -> Sampled:
        """n independent single-token proposals from the reference (temperature 1), in one call."""
        out = self.background(self.client.sample, self.client.info.base, list(seq), 1, n=n, seed=seed,
                              session_id=session).result()
        return Sampled([s.tokens[0] for s in out], [s.logprobs[0] for s in out])

    def score(self, names: Sequence[str], seq: Sequence[int], n_last: int, way: str = "auto",
              session: str | None = None) -> torch.Tensor:
        """[N, n_last]: log pi_i of the last n_last tokens of seq under each adapter, all calls at
        once, in one of two ways that give the same numbers: "prompt" (one prompt-log-prob call per
        adapter: the engine prefills the whole context again and runs its output layer over all of
        it, since vLLM skips its prefix cache for prompt log-probs and has no start position for
        them) or "next" (one next-token call per adapter and position, which the engine's prefix
        cache can serve; it does when its KV block size is below the context, e.g. vLLM on CPU with
        --block-size 32). "auto" times both on each context length (in powers of two) and uses the
        faster, trying the other again every so often (docs/scale-out.md has the measurements)."""
        seq = list(seq)
        chosen = self._ways.pick(len(seq)) if way == "auto" else way
        start_time = time.perf_counter()
        if chosen == "prompt":
            rows = self.gather([(partial(self.client.prompt_logprobs, session_id=session), m, seq, n_last)
                                for m in names])
        elif chosen == "next":
            start = len(seq) - n_last
            call = partial(self.client.next_logprobs, session_id=session)
            flat = self.gather([(call, m, seq[:start + j], [seq[start + j]]) for m in names for j in range(n_last)])
            rows = [[flat[i * n_last + j][0] for j in range(n_last)] for i in range(len(names))]
        else:
            raise ValueError(f"way must be 'auto', 'prompt' or 'next', got {way!r}")
        self._ways.record(len(seq), chosen, time.perf_counter() - start_time)
        return torch.tensor(rows, dtype=torch.float32).view(len(names), n_last)

    def score_next(self, names: Sequence[str], seq: Sequence[int], token_ids: Sequence[int],
                   session: str | None = None) -> torch.Tensor:
        """[N, len(token_ids)]: log pi_i(t | seq) under each adapter (N calls at once)."""
        call = partial(self.client.next_logprobs, session_id=session)
        rows = self.gather([(call, m, list(seq), list(token_ids)) for m in names])
        return torch.tensor(rows, dtype=torch.float32).view(len(names), len(token_ids))

    # -- calls ---------------------------------------------------------------------------------

    def background(self, fn, *args, **kwargs) -> Future:
        self._counted(1)
        return self.pool.submit(fn, *args, **kwargs)

    def gather(self, jobs: list[tuple]) -> list:
        """Run (fn, *args) jobs concurrently; their results in order (the first error is raised)."""
        self._counted(len(jobs))
        futures = [self.pool.submit(fn, *args) for fn, *args in jobs]
        return [f.result() for f in futures]

    def _counted(self, calls: int) -> None:
        with self._count:
            self.calls += calls
            self.round_trips += 1

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


class EngineTokenizer:
    """The engine's own tokenizer, over HTTP (when no local copy of the model's tokenizer is at
    hand): encoding applies the engine's chat template; decoding is a call per text update, so a
    local tokenizer is much faster (Generator.from_engine(tokenizer=...))."""

    chat_template = "the engine's"

    def __init__(self, client: EngineClient, eos_token_ids: Sequence[int] = ()):
        self.client = client
        self.eos_token_id = list(eos_token_ids) or None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.client.tokenize(text=text)}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int]:
        return self.client.tokenize(messages=list(messages))

    def decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.client.detokenize(list(tokens)) if tokens else ""


__all__ = ["EngineTokenizer", "EngineInfo", "EngineClient", "Sampled", "RemoteBackend", "RemoteCache"]
