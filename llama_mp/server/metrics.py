"""GET /metrics: the server's counters in Prometheus' text format, with vLLM's metric names where vLLM has
one, so dashboards and alerts written for vLLM read this server unchanged.

Made with `prometheus_client`, the Prometheus project's own client for Python (its text format, histogram
buckets and escaping are the standard's, not a copy of them). Latencies and token counts are observed on
the HTTP thread, as each answer's events arrive there, never in the batch loop; the batch's gauges
(requests running and waiting, slots in use), its step counters (steps, rows, seconds in the steps and
in the loop's rounds) and the prefix cache's counters are read from the scheduler when a scrape asks for
them: the loop only adds to numbers it keeps anyway.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's buckets for its latency histograms (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Batch:
    """The gauges, read at scrape time from `stats()` (the scheduler's, None while loading)."""

    def __init__(self, model_name: Callable[[], str], stats: Callable[[], Optional[Dict[str, int]]]):
        self.model_name, self.stats = model_name, stats

    def collect(self):
        stats = self.stats()
        if stats is None:
            return
        label = [self.model_name()]

        def gauge(name: str, doc: str, value: float, kind=GaugeMetricFamily):
            family = kind(name, doc, labels=["model_name"])
            family.add_metric(label, value)
            return family

        def counter(name: str, doc: str, value: float):
            return gauge(name, doc, value, CounterMetricFamily)

        yield gauge("vllm:num_requests_running", "Sequences in a slot of the running batch.", stats["running"])
        yield gauge("vllm:num_requests_waiting", "Sequences waiting for a slot.", stats["waiting"])
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of the KV cache's slots (rows) in use, 0 to 1.",
                    stats["running"] / stats["slots"])
        yield gauge("llama_mp:kv_cache_slots_in_use", "KV cache slots (rows) holding a sequence.", stats["running"])
        yield gauge("llama_mp:kv_cache_slots", "KV cache slots (rows): --max_batch_size.", stats["slots"])
        # Mean step time over a window: the change of the seconds over the change of the steps.
        yield counter("llama_mp:batch_steps", "Steps of the batch run (each gives every row one token).",
                      stats["steps"])
        yield counter("llama_mp:batch_rows", "Rows of the steps run, summed.", stats["rows"])
        yield counter("llama_mp:batch_step_seconds", "Seconds inside the steps (every rank's model calls).",
                      stats["step_s"])
        yield counter("llama_mp:batch_loop_seconds", "Seconds of the batch loop's rounds that ran a step: "
                      "planning, the step, handing out the tokens of the step before.", stats["loop_s"])

        # vLLM's prefix cache counters count tokens: queries the prompt tokens looked up, hits those found
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      stats["prefix_queries"])
        yield counter("vllm:prefix_cache_hits", "Prompt tokens a cached prefix held (not prefilled).",
                      stats["cached_tokens"])
        yield counter("llama_mp:prefix_cache_hit_prompts", "Prompts that continued from a cached prefix.",
                      stats["prefix_hits"])
        yield counter("llama_mp:prefix_cache_evictions", "Kept cache rows whose prefix was forgotten (the "
                      "--prefix_cache_rows budget) or overwritten by another prompt.", stats["prefix_evictions"])


class Metrics:
    """One server's metrics, in a registry of its own (a process may hold several servers: the tests)."""

    def __init__(self, model_name: Callable[[], str], stats: Callable[[], Optional[Dict[str, int]]]):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        self.model_name = model_name
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time from a request's arrival to the first piece "
                              "of each of its answers.", labels, registry=self.registry, buckets=TTFT_BUCKETS)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between successive pieces of an answer (one "
                             "token each, but where text is held back: a split character, a possible stop string).",
                             labels, registry=self.registry, buckets=ITL_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Time from a request's arrival to the end of each "
                             "of its answers.", labels, registry=self.registry, buckets=E2E_BUCKETS)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of the answers finished (a prompt once, "
                                     "however many samples).", labels, registry=self.registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated in the answers finished.",
                                         labels, registry=self.registry)
        self.success = Counter("vllm:request_success", "Answers finished, by finish reason.",
                               labels + ["finished_reason"], registry=self.registry)
        self.registry.register(_Batch(model_name, stats))

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self, arrived: float) -> "Tracker":
        return Tracker(self, arrived)


class Tracker:
    """The timings of one request's answers, observed as their events arrive (on the HTTP thread)."""

    def __init__(self, metrics: Metrics, arrived: float):
        self.metrics, self.arrived = metrics, arrived
        self.last: Dict[int, float] = {}  # each answer's last piece

    def piece(self, index: int) -> None:
        now, name = time.monotonic(), self.metrics.model_name()
        before = self.last.get(index)
        if before is None:
            self.metrics.ttft.labels(name).observe(now - self.arrived)
        else:
            self.metrics.itl.labels(name).observe(now - before)
        self.last[index] = now

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        name, m = self.metrics.model_name(), self.metrics
        m.e2e.labels(name).observe(time.monotonic() - self.arrived)
        m.prompt_tokens.labels(name).inc(prompt_tokens)
        m.generation_tokens.labels(name).inc(completion_tokens)
        m.success.labels(name, reason).inc()
