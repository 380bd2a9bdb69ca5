"""Load test of `personamix serve`: 1, 4 and 16 concurrent streaming clients.

Starts the server as a subprocess (default model + shipped MBTI adapters) unless --url is
given, sends a bounded number of streaming chat requests per level, and prints p50/p95
latency, time to first token, aggregate tokens/s, errors, dropped streams (no [DONE]), the
server's mean batch size (generation steps served per model forward: concurrent requests share
forwards; the share of the level's time in model forwards and waiting for company before
them), the cores the server and this load generator kept busy (they share the machine's cores) and
the server's resident memory (when idle) before and after each level. The last level is repeated, so
memory growth is read after a warm-up at full concurrency.

    python bench/loadtest.py [--levels 1 4 16 16 16] [--requests 2] [--min-level-requests 8] [--max-tokens 32]
                             [--out docs/loadtest.md]
                             [--unique] [--prefix-cache-mb 256] [--gather-wait 1.0] [--no-cuda-graphs]

Four prompts repeat (each with its persona; one warm-up request each before the first level, so
every level, one client's included, starts with them cached) unless --unique gives every
request of the run its own (never seen before, in any level); the server's prefix cache
(--prefix-cache-mb, 0 = off) serves what prompts share. Every request of the run has a seed of
its own.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["How would you spend a free Saturday?", "What do you do when a plan changes at the last minute?",
           "Describe your ideal workplace.", "How do you make a hard decision?"]
PERSONAS = ["ENTJ", "ISFP", "INFJ", "ESTP"]

#: one HTTP client for the whole run, shared by the clients' threads (httpx's clients are thread-safe): its
#: connections are kept alive between requests. httpx.stream / httpx.get make a client per call, and
#: making one (its SSL context) costs ~20 ms of CPU: at 16 clients that took the load generator
#: to 0.11 of the 2 cores the server runs on, against 0.03 at one client.
HTTP = httpx.Client(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def one_request(url: str, i: int, max_tokens: int, method: str, number: int, unique: bool = False) -> dict:
    """Request i of a level (its prompt and persona); `number`: its number in the run (its seed,
    and with `unique` what makes its prompt its own)."""
    prompt = (f"Question {number}. " if unique else "") + PROMPTS[i % len(PROMPTS)]   # from its 2nd word
    body = {"messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "persona": PERSONAS[i % len(PERSONAS)], "method": method, "seed": number,
            "temperature": 0.7, "top_p": 0.9}
    start, first, tokens, done = time.perf_counter(), None, 0, False
    try:
        with HTTP.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {r.read()[:200]!r}"}
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                msg = json.loads(data)
                if "error" in msg:
                    return {"error": msg["error"]["message"]}
                if msg["choices"][0]["delta"].get("content") and first is None:
                    first = time.perf_counter() - start
                if "personamix" in msg:
                    tokens = msg["personamix"]["stats"]["new_tokens"]
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": tokens, "dropped": not done}


def batching(url: str) -> tuple[float, ...]:
    """The server's counters: forwards, calls they served, seconds in forwards, seconds waiting
    for company before them, row-tokens computed (of them in prompts)."""
    b = HTTP.get(url + "/health", timeout=10).json().get("batching") or {}
    return (b.get("forwards", 0), b.get("calls", 0), b.get("busy_s", 0.0), b.get("waited_s", 0.0),
            b.get("row_tokens", 0), b.get("prompt_row_tokens", 0))


def minor_faults(pid: int | None) -> int | None:
    """The server process's minor page faults so far (/proc/PID/stat, field 10)."""
    if pid is None:
        return None
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def cpu_s(pid: int | None) -> float | None:
    """The server process's CPU seconds so far, user + system, all threads (/proc/PID/stat, fields 14-15)."""
    if pid is None:
        return None
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_rss_mb(url: str, pid: int | None) -> float | None:
    """The server's RSS once no request is in flight (it trims its heap when it goes idle)."""
    deadline = time.time() + 30
    while time.time() < deadline and HTTP.get(url + "/health", timeout=10).json()["in_flight"]:
        time.sleep(0.2)
    time.sleep(1.0)
    return rss_mb(pid)


def pool_released_rss_mb(url: str, pid: int | None, health: dict) -> tuple[float, float] | None:
    """(seconds idle, the server's RSS) once its KV pool has dropped its tensors after the run (it keeps
    them for kv_keep_idle_s once idle); None where the server has no such pool or no pid is known."""
    keep = (health.get("batching") or {}).get("kv_keep_idle_s")
    if keep is None or pid is None:
        return None
    start = time.time()
    while time.time() - start < keep + 30:
        if not HTTP.get(url + "/health", timeout=10).json()["batching"]["kv_pool_held"]:
            time.sleep(1.0)
            return time.time() - start, rss_mb(pid)
        time.sleep(0.5)
    return None


def level(url: str, clients: int, requests: int, max_tokens: int, method: str, pid: int | None,
          first: int, unique: bool = False) -> dict:
    """One level: `clients` clients, `requests` each, numbered from `first` in the run."""
    before = idle_rss_mb(url, pid)
    counters, faults, server_cpu = batching(url), minor_faults(pid), cpu_s(pid)
    start, own_cpu = time.perf_counter(), time.process_time()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one_request(url, i, max_tokens, method, first + i, unique),
                                range(clients * requests)))
    wall, own_cpu = time.perf_counter() - start, time.process_time() - own_cpu
    server_cpu = None if server_cpu is None else cpu_s(pid) - server_cpu
    forwards, calls, busy, waited, row_tokens, prompt_rows = (x1 - x0 for x0, x1 in zip(counters, batching(url)))
    faults = None if faults is None else minor_faults(pid) - faults
    ok = [r for r in results if "error" not in r]
    lat = sorted(r["latency"] for r in ok) or [float("nan")]
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None) or [float("nan")]
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "dropped": sum(r["dropped"] for r in ok), "p50_s": statistics.median(lat), "p95_s": pct(lat, 0.95),
            "ttft_p50_s": statistics.median(ttft), "tokens": sum(r["tokens"] for r in ok),
            "agg_tok_s": sum(r["tokens"] for r in ok) / wall, "rss_before_mb": before,
            "rss_after_mb": idle_rss_mb(url, pid),
            "batch": calls / forwards if forwards else None, "busy": busy / wall, "waited": waited / wall,
            "ms_per_forward": 1000 * busy / forwards if forwards else None,
            "faults_per_forward": faults / forwards if forwards and faults is not None else None,
            "server_cores": None if server_cpu is None else server_cpu / wall, "own_cores": own_cpu / wall,
            "row_tokens": row_tokens, "prompt_row_tokens": prompt_rows,
            "error_examples": [r["error"] for r in results if "error" in r][:3]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, max_pending: int, prefix_cache_mb: float, gather_wait: float | None,
                 no_cuda_graphs: bool = False) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    extra = ([] if gather_wait is None else ["--gather-wait", str(gather_wait)]) + (
        ["--no-cuda-graphs"] if no_cuda_graphs else [])
    proc = subprocess.Popen([sys.executable, "-m", "personamix.cli", "serve", "--port", str(port),
                             "--max-pending", str(max_pending), "--prefix-cache-mb", str(prefix_cache_mb), *extra],
                            env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if HTTP.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 16, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--min-level-requests", type=int, default=8,
                    help="at least this many requests per level (more per client where clients are few): one "
                         "client's baseline then covers every persona twice, not whichever two requests come first")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--method", default="scr")
    ap.add_argument("--unique", action="store_true",
                    help="a different prompt for every request (else 4 prompts, each with its own persona, repeat)")
    ap.add_argument("--prefix-cache-mb", type=float, default=256, help="passed to `personamix serve`")
    ap.add_argument("--gather-wait", type=float, default=None, help="passed to `personamix serve` (default: its own)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="passed to `personamix serve`")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    proc = None
    url = a.url
    if url is None:
        port = free_port()
        proc = start_server(port, max(a.levels), a.prefix_cache_mb, a.gather_wait, a.no_cuda_graphs)
        url = f"http://127.0.0.1:{port}"
    try:
        warm = 1 if a.unique else len(PROMPTS)
        for i in range(warm):                                   # warm-up (and the repeating prompts cached)
            one_request(url, i, 4, a.method, i, a.unique)
        # every request of the run has its own number: its seed (and with --unique its prompt), so no
        # level repeats another's drafts (whose keys/values the prefix cache would hold)
        per_client = [max(a.requests, -(-a.min_level_requests // c)) for c in a.levels]
        firsts = [warm + sum(c * r for c, r in zip(a.levels[:j], per_client)) for j in range(len(a.levels))]
        rows = [level(url, c, r, a.max_tokens, a.method, proc.pid if proc else None, first, a.unique)
                for c, r, first in zip(a.levels, per_client, firsts)]
        health = HTTP.get(url + "/health", timeout=10).json()
        released = pool_released_rss_mb(url, proc.pid if proc else None, health)
        saved = health.get("prefix_cache")
        taken = (health.get("batching") or {}).get("turns_taken_over")   # None: the server takes no turns
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=30)
    single = rows[0]["agg_tok_s"]
    head = ("| clients | requests | errors | dropped | p50 latency | p95 latency | TTFT p50 | aggregate tok/s | "
            "x 1 client | steps per forward | row-tokens per token (in prompts) | in forwards / waiting | "
            "ms per forward | server page faults per forward | cores busy: server / load generator | "
            "RSS before -> after |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    dash = lambda x, f: "-" if x is None else format(x, f)
    lines = [head] + [
        f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['dropped']} | {r['p50_s']:.1f} s "
        f"| {r['p95_s']:.1f} s "
        f"| {r['ttft_p50_s']:.2f} s | {r['agg_tok_s']:.1f} | {r['agg_tok_s'] / single:.2f} "
        f"| {'-' if r['batch'] is None else format(r['batch'], '.1f')} "
        f"| {r['row_tokens'] / max(r['tokens'], 1):.1f} ({r['prompt_row_tokens'] / max(r['tokens'], 1):.1f}) "
        f"| {r['busy']:.0%} / {r['waited']:.0%} "
        f"| {dash(r['ms_per_forward'], '.1f')} | {dash(r['faults_per_forward'], '.0f')} "
        f"| {dash(r['server_cores'], '.2f')} / {r['own_cores']:.2f} "
        f"| {r['rss_before_mb'] or 0:.0f} -> {r['rss_after_mb'] or 0:.0f} MB |" for r in rows]
    last = [r for r in rows if r["clients"] == rows[-1]["clients"]]
    if len(last) > 1 and last[0]["rss_after_mb"]:
        growth = last[-1]["rss_after_mb"] / last[0]["rss_after_mb"] - 1
        lines.append(f"\nMemory after warm-up: {last[0]['rss_after_mb']:.0f} MB after the first "
                     f"{last[0]['clients']}-client "
                     f"level, {last[-1]['rss_after_mb']:.0f} MB after the last ({growth:+.1%}; "
                     f"{sum(r['requests'] for r in last[1:])} more requests).")
    if released:
        lines.append(f"\nIdle memory once the KV pool dropped its tensors ({released[0]:.0f} s after the last level; "
                     f"it keeps them {health['batching']['kv_keep_idle_s']:g} s once idle): {released[1]:.0f} MB.")
    info = (f"`personamix serve` (default model, shipped MBTI adapters), {a.method}, {a.max_tokens} new tokens per "
            f"request, {a.requests} streaming requests per client (at least {a.min_level_requests} per level), "
            f"personas cycling ENTJ/ISFP/INFJ/ESTP, "
            f"{os.cpu_count()} CPU cores, {'a different prompt per request' if a.unique else '4 prompts repeating'}, "
            f"prefix cache {a.prefix_cache_mb:g} MB, server backend {health['backend']!r} on {health['device']} "
            f"in {health['dtype']}, gather wait {(health.get('batching') or {}).get('gather_wait', '-')}")
    graphs = (health.get("batching") or {}).get("cuda_graphs")
    if graphs:
        info += (f", CUDA graphs: {graphs['replays']} steps replayed, {graphs['captured']} captures "
                 f"({graphs['shapes']} shapes kept)")
    if saved:
        lines.append(f"\nPrefix cache: {saved['hits']} of {saved['lookups']} prompt rows found a cached "
                     f"prefix; {saved['tokens_saved']} prompt tokens x rows not recomputed.")
    if taken is not None:
        lines.append(f"\nTurns between forwards taken over (held past their limit): {taken}.")
    print(info)
    print("\n".join(lines))
    for r in rows:
        if r["error_examples"]:
            print(f"errors at {r['clients']} clients: {r['error_examples']}")
    if a.out:
        command = "python bench/loadtest.py " + " ".join(sys.argv[1:])
        Path(a.out).write_text(f"# Server load test\n\n{info}.\n\nCommand: `{command}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
