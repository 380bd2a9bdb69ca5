"""`VllmEngine`: the EngineClient for vLLM's OpenAI-compatible server (`vllm serve` or
`python -m vllm.entrypoints.openai.api_server`, started with `--enable-lora --lora-modules NAME=PATH`).

Every call is a POST /v1/completions with the prompt as token ids (no text round trip), the
generation's `session_id` (body field and X-Session-Id header: a router can keep one generation
on one replica), and one of vLLM's extensions:
    sample            max_tokens, n, seed, logprobs=0, return_token_ids   (the sampled tokens' log-probs)
    prompt_logprobs   prompt_logprobs=0, max_tokens=1   (log-probs of the prompt's own tokens; note: vLLM
                      then skips its prefix cache and prefills the whole prompt again)
    next_logprobs     logprob_token_ids=[...], logprobs=len, max_tokens=1   (log-probs of given next tokens)
    next_distribution logprobs=-1, max_tokens=1   (whole distribution; needs --max-logprobs -1)
The adapter is chosen by `model=` (the name given in --lora-modules; the base by its served name).

Faults: a call that cannot connect, times out, or gets a 5xx is retried `retries` times with
exponential backoff, then raises EngineUnreachable / EngineTimeout / EngineError; a 4xx (bad
request) is not retried. So a dead or stalled engine ends a call within
(retries + 1) * timeout + backoff seconds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx
import torch

from ..errors import EngineError, EngineTimeout, EngineUnreachable, PersonamixError
from .remote import EngineClient, EngineInfo, Sampled

TOKEN_ID_PREFIX = "token_id:"


class VllmEngine(EngineClient):
    """A vLLM server at `url` (".../v1" or the bare host). `timeout`: seconds per call;
    `retries`: extra attempts after a failed call (connection error, timeout, 5xx)."""

    def __init__(self, url: str, *, timeout: float = 60.0, retries: int = 2, backoff: float = 0.5,
                 api_key: str | None = None, connect_timeout: float = 5.0):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise PersonamixError(f"engine URL must start with http:// or https://, got {url!r}")
        if timeout <= 0 or retries < 0:
            raise PersonamixError(f"timeout must be > 0 and retries >= 0, got {timeout} and {retries}")
        root = url.rstrip("/")
        self.url = root[: -len("/v1")] if root.endswith("/v1") else root
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers,
                                 timeout=httpx.Timeout(timeout, connect=min(connect_timeout, timeout)),
                                 limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        self.info = self._connect()

    # -- connection ----------------------------------------------------------------------------

    def _connect(self) -> EngineInfo:
        models = self._call("GET", "/v1/models")["data"]
        bases = [m for m in models if not m.get("parent")]
        if len(bases) != 1:
            raise EngineError(f"the engine at {self.url} serves {len(bases)} base models "
                              f"({', '.join(m['id'] for m in bases)}); personamix needs exactly one")
        base = bases[0]
        adapters = tuple(m["id"] for m in models if m.get("parent") == base["id"])
        info = EngineInfo(url=self.url, base=base["id"], adapters=adapters,
                          max_length=int(base.get("max_model_len") or 2048), root=base.get("root"))
        return EngineInfo(**{**info.__dict__, "full_distributions": self._probe_full(info.base)})

    def _probe_full(self, base: str) -> bool:
        """Whether whole distributions can be read (vLLM refuses logprobs=-1 with a 400 unless
        it runs with --max-logprobs -1)."""
        try:
            self._completion({"model": base, "prompt": [0], "max_tokens": 1, "logprobs": -1, "temperature": 0,
                              "return_tokens_as_token_ids": True}, probe=True)
            return True
        except EngineError as e:
            if getattr(e, "http_status", None) == 400:
                return False
            raise

    # -- the EngineClient calls -------------------------------------------------------------

    def sample(self, model: str, prompt: Sequence[int], max_tokens: int, *, n: int = 1, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None, ignore_eos: bool = True,
               session_id: str | None = None) -> list[Sampled]:
        out = self._completion({"model": model, "session_id": session_id,
                                "prompt": list(prompt), "max_tokens": max_tokens, "n": n,
                                "temperature": temperature, "top_k": top_k or -1, "top_p": top_p, "seed": seed,
                                "logprobs": 0, "ignore_eos": ignore_eos, "return_token_ids": True,
                                "return_tokens_as_token_ids": True, "skip_special_tokens": False})
        choices = sorted(out["choices"], key=lambda c: c["index"])
        return [Sampled([int(t) for t in c["token_ids"]], [float(x) for x in c["logprobs"]["token_logprobs"]])
                for c in choices]

    def prompt_logprobs(self, model: str, prompt: Sequence[int], n_last: int, *, session_id: str | None = None
                        ) -> list[float]:
        prompt = list(prompt)
        out = self._completion({"model": model, "session_id": session_id,
                                "prompt": prompt, "max_tokens": 1, "temperature": 0,
                                "prompt_logprobs": 0, "return_tokens_as_token_ids": True})
        rows = out["choices"][0]["prompt_logprobs"]
        values = []
        for pos in range(len(prompt) - n_last, len(prompt)):
            entry = rows[pos] or {}
            got = entry.get(str(prompt[pos]))
            if got is None:
                raise EngineError(f"the engine returned no prompt log-prob for token {prompt[pos]} at position {pos}")
            values.append(float(got["logprob"]))
        return values

    def next_logprobs(self, model: str, prompt: Sequence[int], token_ids: Sequence[int], *,
                      session_id: str | None = None) -> list[float]:
        out = self._completion({"model": model, "session_id": session_id,
                                "prompt": list(prompt), "max_tokens": 1, "temperature": 1.0,
                                "logprobs": len(token_ids), "logprob_token_ids": list(token_ids),
                                "return_tokens_as_token_ids": True})
        top = _token_dict(out["choices"][0]["logprobs"]["top_logprobs"][0])
        missing = [t for t in token_ids if t not in top]
        if missing:
            raise EngineError(f"the engine returned no log-prob for token(s) {missing} (logprob_token_ids "
                              "needs vLLM >= 0.20)")
        return [top[t] for t in token_ids]

    def next_distribution(self, model: str, prompt: Sequence[int], *, session_id: str | None = None) -> torch.Tensor:
        out = self._completion({"model": model, "session_id": session_id,
                                "prompt": list(prompt), "max_tokens": 1, "temperature": 0,
                                "logprobs": -1, "return_tokens_as_token_ids": True})
        top = _token_dict(out["choices"][0]["logprobs"]["top_logprobs"][0])
        dist = torch.full((max(top) + 1,), float("-inf"))
        dist[torch.tensor(list(top))] = torch.tensor(list(top.values()))
        return dist

    def tokenize(self, *, text: str | None = None, messages: list[dict] | None = None) -> list[int]:
        """Token ids of a text, or of chat messages with the engine's chat template."""
        body: dict[str, Any] = {"model": self.info.base}
        if messages is not None:
            body.update(messages=messages, add_generation_prompt=True)
        else:
            body.update(prompt=text)
        return [int(t) for t in self._call("POST", "/tokenize", body)["tokens"]]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._call("POST", "/detokenize", {"model": self.info.base, "tokens": list(tokens)})["prompt"]

    def healthy(self) -> bool:
        try:
            return self.http.get("/health", timeout=min(2.0, self.timeout)).status_code == 200
        except httpx.HTTPError:
            return False

    def tokenizer_info(self) -> dict | None:
        """The engine's tokenizer configuration (vLLM: --enable-tokenizer-info-endpoint), else None."""
        try:
            return self._call("GET", "/tokenizer_info")
        except EngineError:
            return None

    def close(self) -> None:
        self.http.close()

    # -- HTTP ----------------------------------------------------------------------------------

    def _completion(self, body: dict, probe: bool = False) -> dict:
        return self._call("POST", "/v1/completions", body, retry=not probe)

    def _call(self, method: str, path: str, body: dict | None = None, retry: bool = True) -> dict:
        """One request with bounded retries; EngineUnreachable / EngineTimeout / EngineError after the last.
        A body's session_id also goes out as the X-Session-Id header (for routers that hash on a header)."""
        attempts = self.retries + 1 if retry else 1
        headers = {"X-Session-Id": body["session_id"]} if body and body.get("session_id") else None
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                r = self.http.request(method, path, json=body, headers=headers)
            except httpx.TimeoutException:
                if last:
                    raise EngineTimeout(f"the engine at {self.url} did not answer {path} within {self.timeout:g} s "
                                        f"({attempts} attempt(s))") from None
            except httpx.TransportError as e:
                if last:
                    raise EngineUnreachable(f"cannot reach the engine at {self.url} ({type(e).__name__}: {e}; "
                                            f"{attempts} attempt(s))") from None
            else:
                if r.status_code < 400:
                    return r.json()
                err = EngineError(f"the engine at {self.url} answered {path} with HTTP {r.status_code}: "
                                  f"{_message(r)}")
                err.http_status = r.status_code
                if r.status_code < 500 or last:
                    raise err
            time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")


def _token_dict(entry: dict) -> dict[int, float]:
    """{token id: log-prob} from a top_logprobs entry keyed "token_id:123" (or "123")."""
    return {int(k.removeprefix(TOKEN_ID_PREFIX)): float(v) for k, v in entry.items()}


def _message(r: httpx.Response) -> str:
    try:
        body = r.json()
        msg = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("message")
        return str(msg or body)[:500]
    except ValueError:
        return r.text[:500]


__all__ = ["VllmEngine"]
