"""Prometheus metrics under vLLM's names (so existing dashboards work), labelled with ``model_name``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.async_engine import RequestOutput
from engine.client import EngineClient

# Histogram buckets in seconds (vLLM's, trimmed to what a CPU server sees).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


class _EngineCollector:
    """Reads gauges and engine-side counters from the engine's stats at scrape time."""

    def __init__(self, engine: EngineClient, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        s, spec = self.engine.stats, self.engine.spec_totals
        gauges = (
            ("vllm:num_requests_running", "Requests running on the worker.", s.num_running),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage, 0..1 (1 = all blocks held).", s.kv_usage),
        )
        counters = (
            ("vllm:prompt_tokens", "Prompt tokens received.", s.prompt_tokens_total),
            ("vllm:generation_tokens", "Tokens generated.", s.generation_tokens_total),
            ("vllm:num_preemptions", "Preemptions (recompute).", s.num_preemptions),
            ("vllm:prefix_cache_queries", "Tokens looked up in the prefix cache.", s.prefix_queries),
            ("vllm:prefix_cache_hits", "Tokens found in the prefix cache.", s.prefix_hits),
            # speculative decoding, under vLLM's names
            ("vllm:spec_decode_num_drafts", "Drafts verified (one per sequence and step).", spec.num_drafts),
            ("vllm:spec_decode_num_draft_tokens", "Drafted tokens verified.", spec.num_draft_tokens),
            ("vllm:spec_decode_num_accepted_tokens", "Drafted tokens accepted.", spec.num_accepted_tokens),
            # ours: engine step wall time vs. worker compute time -> scheduler + IPC overhead
            ("a8w8:engine_steps", "Engine steps run.", s.steps),
            (
                "a8w8:engine_step_seconds",
                "Wall time of engine steps (schedule, IPC, compute, postprocess).",
                s.step_seconds_total,
            ),
            ("a8w8:worker_compute_seconds", "Time the worker spent computing those steps.", s.compute_seconds_total),
            ("a8w8:worker_restarts", "Worker processes started again after the previous one died.", s.worker_restarts),
            (
                "a8w8:constraint_failures",
                "Sequences ended with an error because their grammar failed mid-answer (a grammar engine limit).",
                s.constraint_failures,
            ),
        )
        for family, rows in ((GaugeMetricFamily, gauges), (CounterMetricFamily, counters)):
            for name, doc, value in rows:
                metric = family(name, doc, labels=["model_name"])
                metric.add_metric([self.model_name], value)
                yield metric
        per_pos = CounterMetricFamily(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Drafted tokens accepted, by position in the draft.",
            labels=["model_name", "position"],
        )
        for i, n in enumerate(spec.accepted_per_position):
            per_pos.add_metric([self.model_name, str(i)], n)
        yield per_pos
        info = self.engine.worker_info
        if info is not None:  # (Prometheus' *_info convention: the labels are the information, the value 1)
            backend = GaugeMetricFamily(
                "a8w8:backend_info",
                "Where the model runs: the device and the kernels (cpu-vnni, cpu-avx-vnni, cpu-avx2, cpu-neon, cpu-neon-plain, cpu-onednn, "
                "cuda-triton).",
                labels=["model_name", "device", "backend"],
            )
            backend.add_metric([self.model_name, info.device, info.backend], 1)
            yield backend


# The APIs that generate: OpenAI's chat completions, completions and Responses, Anthropic's Messages.
API_NAMES = ("chat_completions", "completions", "responses", "messages")


class ServerMetrics:
    def __init__(self, engine: EngineClient, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineCollector(engine, model_name))
        label = ["model_name"]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            label,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between generated tokens.",
            label,
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Arrival to finish.", label, buckets=E2E_BUCKETS, registry=self.registry
        )
        self.queue = Histogram(
            "vllm:request_queue_time_seconds",
            "Arrival to first scheduling.",
            label,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.success = Counter(
            "vllm:request_success", "Finished requests.", ["model_name", "finished_reason"], registry=self.registry
        )
        self.api_requests = Counter(
            "a8w8:api_requests",
            "Generation requests the engine took, by the API they came through.",
            ["model_name", "api"],
            registry=self.registry,
        )
        for api in API_NAMES:  # (every API's series from the start, at 0)
            self.api_requests.labels(model_name, api)

    def observe_finished(self, out: RequestOutput) -> None:
        """Record one finished choice's latencies from its engine timestamps."""
        m = self.model_name
        if out.first_token is not None:
            self.ttft.labels(m).observe(out.first_token - out.arrival)
        for a, b in zip(out.token_times, out.token_times[1:]):
            self.itl.labels(m).observe(b - a)
        if out.finished_at is not None:
            self.e2e.labels(m).observe(out.finished_at - out.arrival)
        if out.first_scheduled is not None:
            self.queue.labels(m).observe(out.first_scheduled - out.arrival)
        self.success.labels(m, out.finish_reason or "abort").inc()

    def observe_request(self, api: str) -> None:
        """A generation request the engine took, through ``api`` (one of :data:`API_NAMES`)."""
        self.api_requests.labels(self.model_name, api).inc()

    def observe_aborted(self) -> None:
        """A request its client abandoned (disconnect or cancel)."""
        self.success.labels(self.model_name, "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
