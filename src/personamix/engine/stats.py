"""What a generation cost and how its acceptance tests went."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class Stats:
    """Counters filled in by a sampler; see docs/samplers.md for the exact definitions.

    proposals/accepted: reference tokens put to an acceptance test (token-rs rounds, scr and
        spec drafted tokens) and how many of them were kept.
    chunks_proposed/accepted: scr only, keyed by prefix length j: how often C_{1:j} was tested
        against the window bound, and accepted.
    bound_violations: scr tests where S exceeded the estimated log M (acceptance capped at 1).
    clamps: tested or sampled continuations whose linear sum_i alpha_i r_i was <= 0.
    fallback_tokens: scr tokens that came from the single-token fallback (Token-RS).
    rs_exhausted: Token-RS rounds that hit max_retries and sampled the exact target directly.
    warmup_chunks: scr chunks verified with the exact per-token bound before the window is used.
    round_trips: waits on an inference engine (remote backend; concurrent requests count once);
        forward_passes then counts engine requests.
    """

    method: str
    new_tokens: int = 0
    elapsed_s: float = 0.0
    forward_passes: int = 0
    proposals: int = 0
    accepted: int = 0
    chunks_proposed: Counter = field(default_factory=Counter)
    chunks_accepted: Counter = field(default_factory=Counter)
    bound_violations: int = 0
    clamps: int = 0
    fallback_tokens: int = 0
    rs_exhausted: int = 0
    warmup_chunks: int = 0
    round_trips: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposals if self.proposals else None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def forward_passes_per_token(self) -> float | None:
        return self.forward_passes / self.new_tokens if self.new_tokens else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["chunks_proposed"] = {int(k): v for k, v in sorted(self.chunks_proposed.items())}
        d["chunks_accepted"] = {int(k): v for k, v in sorted(self.chunks_accepted.items())}
        d.update(acceptance_rate=self.acceptance_rate, tokens_per_s=self.tokens_per_s,
                 forward_passes_per_token=self.forward_passes_per_token)
        return d

    def summary(self) -> str:
        parts = [f"{self.method}: {self.new_tokens} tokens in {self.elapsed_s:.2f}s "
                 f"({self.tokens_per_s:.1f} tok/s)"]
        if self.round_trips:
            parts.append(f"{self.forward_passes_per_token:.2f} engine requests/token, "
                         f"{self.round_trips / max(self.new_tokens, 1):.2f} round trips/token")
        elif self.forward_passes_per_token is not None:
            parts.append(f"{self.forward_passes_per_token:.2f} forward passes/token")
        if self.acceptance_rate is not None:
            parts.append(f"acceptance {self.acceptance_rate:.1%} ({self.accepted}/{self.proposals})")
        if self.chunks_proposed:
            per_len = ", ".join(f"{j}:{self.chunks_accepted[j]}/{self.chunks_proposed[j]}"
                                for j in sorted(self.chunks_proposed, reverse=True))
            parts.append(f"chunks accepted/tested by length {per_len}")
        if self.method == "scr":
            parts.append(f"bound violations {self.bound_violations}, fallback tokens {self.fallback_tokens}, "
                         f"warm-up chunks {self.warmup_chunks}")
        if self.clamps:
            parts.append(f"clamps {self.clamps}")
        if self.rs_exhausted:
            parts.append(f"retry bound hit {self.rs_exhausted}x")
        return "; ".join(parts)
