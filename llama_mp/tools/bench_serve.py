"""`llama-mp bench-serve`: drive a running server with C concurrent clients and report what they got.

Each client sends streamed /v1/completions requests one after another (a few prompts in turn, a fixed
--max_tokens with "ignore_eos", so every answer has the same length whatever the model says) until the
level's requests are done. Per level of concurrency it reports requests/s, output tokens/s, time to
first token and the time between tokens (p50 and p99), measured on the client's side of the socket, and,
from a llama_mp server's /metrics (its batch loop's own counters, read before and after the level), the
mean time of a step, of the loop's round around it, and the rows per step: whether the HTTP side's work
lengthens the loop beyond what the rows themselves cost.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import math
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..checks import MAX_CLIENTS, check_option_values, described, is_int
from ..errors import LlamaMPError

PROMPTS = [
    "The best thing about running a language model on your own machine is",
    "Simply put, the theory of relativity states that ",
    "A short poem about the sea:\n",
    "Translate English to French:\n\nsea otter => loutre de mer\ncheese =>",
]


@dataclass
class Level:
    """What the clients of one concurrency level measured."""

    concurrency: int
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    seconds: float = 0.0
    first_token_s: List[float] = field(default_factory=list)
    between_tokens_s: List[float] = field(default_factory=list)
    first_error: Optional[str] = None  # what the first failed request met, for the message
    server: Optional[Dict[str, float]] = None  # the change of the server's batch counters over the level

    def failed(self, why: str) -> None:
        self.errors += 1
        if self.first_error is None:  # quoted mid-sentence: its own closing period would double the message's
            self.first_error = why.rstrip(". ")

    def summary(self) -> Dict[str, Optional[float]]:
        """The level's figures; a latency nothing measured (no answer, or one token each) is None, not NaN,
        which JSON cannot hold."""
        def ms(values, q):
            p = percentile(values, q)
            return None if p is None else 1e3 * p

        steps = self.server["steps"] if self.server else 0
        return {"concurrency": self.concurrency, "requests": self.requests, "errors": self.errors,
                "requests_per_s": self.requests / self.seconds, "output_tokens_per_s": self.tokens / self.seconds,
                "ttft_p50_ms": ms(self.first_token_s, 50), "ttft_p99_ms": ms(self.first_token_s, 99),
                "itl_p50_ms": ms(self.between_tokens_s, 50), "itl_p99_ms": ms(self.between_tokens_s, 99),
                "step_ms": 1e3 * self.server["step_seconds"] / steps if steps else None,
                "loop_ms": 1e3 * self.server["loop_seconds"] / steps if steps else None,
                "rows_per_step": self.server["rows"] / steps if steps else None}


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The nearest-rank q-th percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def parse_levels(concurrency) -> List[int]:
    """--concurrency 8, or several levels: "1,4,8" (fire may hand over a tuple)."""
    items = concurrency if isinstance(concurrency, (list, tuple)) else str(concurrency).split(",")
    # whole numbers only: int() would turn 1.5 into 1 and True into 1 without a word
    levels = [x if is_int(x) else int(x) if isinstance(x, str) and x.strip().isdigit() else None for x in items]
    if not levels or any(c is None or not 1 <= c <= MAX_CLIENTS for c in levels):
        raise LlamaMPError(f"--concurrency must be an integer from 1 to {MAX_CLIENTS} (clients at once, each with "
                           f"its own connection) or a list of them like 1,4,8; got {described(concurrency)}.")
    return levels


def check_url(url) -> None:
    """--url must be a server's http(s) base address with a host (and a port, if any, from 0 to 65535)."""
    problem = None
    try:
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            problem = "it is not an http:// or https:// address with a host"
        else:
            parts.port  # noqa: B018 - reading it checks it
    except ValueError as e:
        problem = str(e).rstrip(". ")
    if problem:
        raise LlamaMPError(f"--url {described(url)} is not a server's address ({problem}). Give the base address "
                           "`llama-mp serve` prints, such as http://127.0.0.1:8000.")


BATCH_COUNTERS = ("steps", "rows", "step_seconds", "loop_seconds")  # llama_mp:batch_<name>_total


def batch_counters(base_url: str, headers: dict) -> Optional[Dict[str, float]]:
    """The batch loop's counters from a llama_mp server's /metrics, or None from a server without them
    (another kind of server; prometheus_client, which parses them, not installed)."""
    import httpx

    try:
        from prometheus_client.parser import text_string_to_metric_families
        response = httpx.get(base_url + "/metrics", headers=headers, timeout=30)
    except (ImportError, httpx.HTTPError):
        return None
    if response.status_code != 200:
        return None
    found = {s.name: s.value for family in text_string_to_metric_families(response.text) for s in family.samples}
    names = {name: f"llama_mp:batch_{name}_total" for name in BATCH_COUNTERS}
    return {name: found[key] for name, key in names.items()} if all(k in found for k in names.values()) else None


async def _one(client, url: str, body: dict, level: Level) -> None:
    started = time.perf_counter()
    last, count = None, 0
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                level.failed(f"HTTP {response.status_code} {body[:200]}".strip())
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = jsonlib.loads(line[6:])
                if "error" in chunk:
                    level.failed(f"the stream ended with an error: {jsonlib.dumps(chunk['error'])[:200]}")
                    return
                if chunk.get("usage"):
                    count = chunk["usage"]["completion_tokens"]
                if not any(c.get("text") for c in chunk.get("choices", [])):
                    continue
                now = time.perf_counter()
                if last is None:
                    level.first_token_s.append(now - started)
                else:
                    level.between_tokens_s.append(now - last)
                last = now
    except Exception as e:  # noqa: BLE001 - a failed request is counted, the bench goes on
        level.failed(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        return
    level.requests += 1
    level.tokens += count


async def _level(url: str, concurrency: int, requests: int, max_tokens: int, headers: dict, model: Optional[str]) -> Level:
    import httpx

    level = Level(concurrency)
    queue = list(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker():
            while queue:
                i = queue.pop()
                body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
                        "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
                if model:
                    body["model"] = model
                await _one(client, url, body, level)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        level.seconds = time.perf_counter() - started
    return level


def bench_serve(url: str = "http://127.0.0.1:8000", concurrency: str = "1,4,8", requests: int = 0,
                max_tokens: int = 16, api_key: Optional[str] = None, model: Optional[str] = None,
                warmup: int = 2, json: bool = False) -> None:
    """Measure a running server (`llama-mp serve`, launch/serve.py) at each --concurrency level (e.g. 1,4,8).

    At each level C, C clients send streamed greedy /v1/completions requests back to back, --requests in
    all (default 64, or 8 x C if more), each answered with exactly --max_tokens tokens (default 16; "ignore_eos"). Prints
    per level: requests/s, output tokens/s, time to first token (TTFT) and time between tokens (ITL) at
    p50 and p99, and the failed requests; --json prints one JSON object per level instead. --url is the
    server's base address, --api_key its key, --model the name to send (default: none, the server's).
    --warmup requests are sent first and not counted. From a llama_mp server it also reports the server's
    mean step time, the mean time of the batch loop's round around a step (the step, planning, handing out
    tokens), and rows per step, over the level (from /metrics). If every request of the warmup or of a level fails,
    nothing was measured: it exits 2 with what the first failed request met (some failures are a note).
    """
    levels = parse_levels(concurrency)
    check_option_values("bench_serve", {"requests": requests, "max_tokens": max_tokens, "warmup": warmup})
    check_url(url)
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise LlamaMPError("bench-serve needs httpx: pip install httpx (it comes with the test extra).") from None
    base = str(url).rstrip("/")
    endpoint = base + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if warmup:  # a server that answers nothing is found here, before any level
        measured(asyncio.run(_level(endpoint, 1, warmup, max_tokens, headers, model)), url, "the warmup")
    if not json:
        print(f"{'C':>3} {'req/s':>8} {'tok/s':>9} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} {'p99':>8} {'errors':>6}"
              f" {'step':>7} {'loop':>7} {'rows/step':>9}   (ms)")
    for c in levels:
        before = batch_counters(base, headers)
        level = asyncio.run(_level(endpoint, c, requests or max(64, 8 * c), max_tokens, headers, model))
        after = batch_counters(base, headers) if before is not None else None
        if after is not None:
            level.server = {name: after[name] - before[name] for name in BATCH_COUNTERS}
        s = level.summary()
        if json:
            print(jsonlib.dumps(s), flush=True)
        else:
            print(f"{c:>3} {s['requests_per_s']:>8.2f} {s['output_tokens_per_s']:>9.1f} {_ms(s['ttft_p50_ms'], 9, 1)} "
                  f"{_ms(s['ttft_p99_ms'], 8, 1)} {_ms(s['itl_p50_ms'], 8, 2)} {_ms(s['itl_p99_ms'], 8, 2)} "
                  f"{s['errors']:>6} {_ms(s['step_ms'], 7, 2)} {_ms(s['loop_ms'], 7, 2)} "
                  f"{_ms(s['rows_per_step'], 9, 1)}", flush=True)
        measured(level, url, f"concurrency {c}")


def _ms(value: Optional[float], width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def measured(level: Level, url: str, what: str) -> None:
    """Say what failed: nothing measured (every request of `what` failed) is an error, so the command
    exits 2 instead of reporting zeros; some failed requests are a note beside the figures."""
    if not level.errors:
        return
    if not level.requests:
        raise LlamaMPError(f"Every request of {what} failed ({level.errors} of {level.errors}), so nothing was "
                           f"measured; the first one met: {level.first_error}. Check that a server "
                           f"(`llama-mp serve`) is up at {url} and takes these requests (--api_key, --model).")
    print(f"note: {level.errors} of {level.errors + level.requests} requests of {what} failed; the first one met: "
          f"{level.first_error}", file=sys.stderr, flush=True)
