"""Prometheus metrics of one app: HTTP traffic, generation speed, the scheduler's state, voice, predictions.

Design choices:
- A `CollectorRegistry` per app instead of prometheus-client's global one: tests (and anyone embedding the
  server) can create several apps in one process without "duplicated timeseries" errors, and `/metrics`
  shows exactly one app's numbers.
- Route labels are route *templates* (`/v1/conversations/{conversation_id}`), never raw paths, and unknown
  paths share one label, so a scanner cannot blow up the number of time series.
- Generation numbers come from each finished sequence's `Completion` (time to first token, decode rate,
  token counts), the same numbers the CLI's `--json` prints. Scheduler gauges are read at scrape time.
- The prefix cache, KV-cache memory and the response cache keep their own counters (the scheduler thread
  updates them between steps); a collector reads them at scrape time instead of copying them on every step.
- Names follow Prometheus' conventions (https://prometheus.io/docs/practices/naming/): a `mini_claude_` prefix,
  base units in the name (`_seconds`, `_bytes`), counters exposed with `_total`, no colons (those are for
  recording rules, `deploy/rules.yml`). `tests/server/test_monitoring.py` lints the exposition
  with `promtool check metrics` and checks these rules, and `scripts/generate_dashboard.py` builds
  the dashboard from the names exposed, so a rename cannot leave a panel behind.
- Nothing here knows FastAPI: the app's middleware calls `observe_request`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mini_claude.engine import Completion

if TYPE_CHECKING:
    from mini_claude.scheduler import SchedulerStats
    from mini_claude.server.response_cache import ResponseCacheStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
AUDIO_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)
PREDICT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _ModelCacheCollector(Collector):
    """The prediction model cache's counters (`predict.ModelCache`), read at scrape time."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Any]:
        stats = self.cache.stats
        for name, value, doc in (
            ("hits", stats.hits, "Model lookups answered by an already loaded, unchanged file."),
            ("loads", stats.loads, "Model files loaded (at start, when new, or when changed)."),
            ("load_failures", stats.failures, "Model files that failed to load."),
        ):
            yield CounterMetricFamily(f"mini_claude_model_cache_{name}", doc, value=value)


class _AudioCacheCollector(Collector):
    """The audio cache's own counters (it is also used outside the server), read at scrape time."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Any]:
        stats = self.cache.stats
        for name, value, doc in (
            ("hits", stats.hits, "Speech requests answered from the audio cache."),
            ("misses", stats.misses, "Speech requests that had to be synthesized."),
            ("evictions", stats.evictions, "Cached files removed to stay within the size bound."),
        ):
            yield CounterMetricFamily(f"mini_claude_audio_cache_{name}", doc, value=value)
        yield GaugeMetricFamily("mini_claude_audio_cache_bytes", "Bytes the audio cache holds.", value=self.cache.size)
        yield GaugeMetricFamily("mini_claude_audio_cache_entries", "Files in the audio cache.", value=len(self.cache))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mini_claude_http_requests", "HTTP requests by route template, method and status.",
            ["route", "method", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "mini_claude_http_request_duration_seconds", "Time from request to the last byte of the response.",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("mini_claude_http_requests_in_flight", "HTTP requests being served.", registry=r)
        self.errors = Counter(
            "mini_claude_errors", "Error responses and failed generations by type.", ["type"], registry=r
        )
        self.ttft = Histogram(
            "mini_claude_time_to_first_token_seconds", "From submitting a prompt to its first new token.",
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.decode_rate = Histogram(
            "mini_claude_decode_tokens_per_second", "Per sequence: tokens/s after the first token.",
            buckets=RATE_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("mini_claude_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generated_tokens = Counter("mini_claude_generated_tokens", "Tokens generated.", registry=r)
        self.sequences = Counter(
            "mini_claude_sequences", "Finished sequences by finish reason (stop, length, cancelled).",
            ["finish_reason"], registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge("mini_claude_scheduler_waiting", "Prompts waiting for a slot.", registry=r)
        self.running = Gauge("mini_claude_scheduler_running", "Sequences in the decode batch.", registry=r)
        self.speech_ttfa = Histogram(
            "mini_claude_speech_time_to_first_audio_seconds", "From starting a synthesis to its first audio bytes.",
            ["engine"], buckets=AUDIO_BUCKETS, registry=r,
        )  # fmt: skip
        self.speech_audio = Counter(
            "mini_claude_speech_audio_seconds", "Seconds of speech synthesized (cache hits excluded).", ["engine"],
            registry=r,
        )  # fmt: skip
        self.speech_work = Counter(
            "mini_claude_speech_synthesis_seconds", "Time spent synthesizing and encoding speech; divided by the "
            "audio seconds it is the real-time factor.", ["engine"], registry=r,
        )  # fmt: skip
        self.transcribed = Counter(
            "mini_claude_transcription_audio_seconds", "Seconds of audio transcribed.", registry=r
        )
        self.predictions = Counter(
            "mini_claude_prediction_requests", "Prediction requests by model, protocol (v1: /predict, v2: KServe V2) "
            "and status.", ["model", "protocol", "status"], registry=r,
        )  # fmt: skip
        self.predicted = Counter(
            "mini_claude_prediction_instances", "Instances predicted, by model.", ["model"], registry=r
        )
        self.predict_latency = Histogram(
            "mini_claude_prediction_duration_seconds", "Time to load (when changed) and run a model on a request.",
            ["model"], buckets=PREDICT_BUCKETS, registry=r,
        )  # fmt: skip
        self.adapters = Gauge("mini_claude_adapters_loaded", "LoRA adapters served beside the base model.", registry=r)
        self.fine_tunes = Counter(
            "mini_claude_fine_tune_jobs_submitted", "Fine-tuning jobs accepted by POST /v1/fine-tunes.", registry=r
        )
        self.prediction_log = Counter(
            "mini_claude_prediction_log_rows", "Logged predictions by outcome (written to the database, or dropped).",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.upstream_requests = Counter(
            "mini_claude_upstream_requests", "Chat requests proxied to upstreams, by upstream and status (499: the "
            "client left).", ["upstream", "status"], registry=r,
        )  # fmt: skip
        self.upstream_latency = Histogram(
            "mini_claude_upstream_request_duration_seconds", "From sending to an upstream to its last byte.",
            ["upstream"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_ttft = Histogram(
            "mini_claude_upstream_time_to_first_token_seconds", "From sending a streamed request to its first text.",
            ["upstream"], buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_tokens = Counter(
            "mini_claude_upstream_tokens", "Tokens upstreams reported, by kind (prompt, completion).",
            ["upstream", "kind"], registry=r,
        )  # fmt: skip
        self.agent_requests = Counter(
            "mini_claude_agent_requests", "Requests that named an agent as their model.", ["agent"], registry=r
        )
        self._audio_cache_watched = False
        self._model_cache_watched = False

    def watch_cache(self, scheduler: Callable[[], SchedulerStats], responses: Callable[[], ResponseCacheStats]) -> None:
        """Report the prefix cache, KV-cache memory and the response cache from their own counters at scrape time."""
        self.registry.register(_CacheCollector(scheduler, responses))

    def watch_adapters(self, count: Callable[[], float]) -> None:
        """Read the number of served adapters whenever /metrics is scraped."""
        self.adapters.set_function(count)

    def watch_scheduler(self, waiting: Callable[[], float], running: Callable[[], float]) -> None:
        """Read the scheduler's queue depth and batch size whenever /metrics is scraped."""
        self.queue_depth.set_function(waiting)
        self.running.set_function(running)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(f"http_{status}").inc()

    def observe_completion(self, completion: Completion) -> None:
        """Record one finished sequence (a chat choice, a completion choice, a UI reply)."""
        self.prompt_tokens.inc(completion.prompt_tokens)
        self.generated_tokens.inc(completion.completion_tokens)
        self.sequences.labels(completion.finish_reason).inc()
        if completion.completion_tokens:
            self.ttft.observe(completion.ttft_ms / 1000)
        if completion.decode_tokens_per_s > 0:
            self.decode_rate.observe(completion.decode_tokens_per_s)

    def watch_audio_cache(self, cache: Any) -> None:
        """Export the audio cache's hits, misses, evictions and size (once per app)."""
        if not self._audio_cache_watched:
            self.registry.register(_AudioCacheCollector(cache))
            self._audio_cache_watched = True

    def observe_speech(self, run: Any) -> None:
        """Record one speech run (`audio.SpeechRun`): time to first audio, and the work for a synthesized one."""
        engine = run.utterance.engine.name
        if run.first_audio_seconds is not None:
            self.speech_ttfa.labels(engine).observe(run.first_audio_seconds)
        if not run.cached:
            self.speech_audio.labels(engine).inc(run.audio_seconds)
            self.speech_work.labels(engine).inc(run.synthesis_seconds)

    def observe_prediction(self, model: str, protocol: str, status: str, instances: int, seconds: float) -> None:
        self.predictions.labels(model, protocol, status).inc()
        if status == "ok":
            self.predicted.labels(model).inc(instances)
            self.predict_latency.labels(model).observe(seconds)

    def observe_prediction_log(self, outcome: str, rows: int = 1) -> None:
        self.prediction_log.labels(outcome).inc(rows)

    def watch_model_cache(self, cache: Any) -> None:
        """Export the prediction model cache's hits, loads and failures (once per app)."""
        if not self._model_cache_watched:
            self.registry.register(_ModelCacheCollector(cache))
            self._model_cache_watched = True

    def observe_upstream(
        self, upstream: str, status: int, seconds: float, ttft_s: float | None = None, prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:  # fmt: skip
        """Record one proxied request (its outcome, and for a successful one its timing and tokens)."""
        self.upstream_requests.labels(upstream, str(status)).inc()
        self.upstream_latency.labels(upstream).observe(seconds)
        if ttft_s is not None:
            self.upstream_ttft.labels(upstream).observe(ttft_s)
        self.upstream_tokens.labels(upstream, "prompt").inc(prompt_tokens)
        self.upstream_tokens.labels(upstream, "completion").inc(completion_tokens)
        if status >= 500:
            self.errors.labels("upstream").inc()

    def observe_agent(self, agent: str) -> None:
        self.agent_requests.labels(agent).inc()

    def observe_transcription(self, audio_seconds: float) -> None:
        self.transcribed.inc(audio_seconds)

    def observe_cancelled(self, n: int = 1) -> None:
        self.sequences.labels("cancelled").inc(n)

    def observe_error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _CacheCollector:
    """Counters that the scheduler thread and the response cache keep themselves, exposed as they stand."""

    def __init__(self, scheduler: Callable[[], SchedulerStats], responses: Callable[[], ResponseCacheStats]) -> None:
        self.scheduler, self.responses = scheduler, responses

    def collect(self) -> Iterator[Metric]:
        s, r = self.scheduler(), self.responses()
        c = s.cache
        counters = [
            ("prefix_cache_lookups", "Prompts looked up in the prefix cache.", c.lookups),
            ("prefix_cache_hits", "Prompts that reused cached keys/values of a prefix.", c.hits),
            ("prefix_cache_reused_tokens", "Prompt tokens whose keys/values came from the prefix cache.",
             c.reused_tokens),
            ("prefix_cache_lookup_tokens", "Prompt tokens looked up in the prefix cache.", c.prompt_tokens),
            ("prefix_cache_evicted_blocks", "Cached KV blocks evicted (least recently used first).", c.evicted_blocks),
            ("sequences_failed", "Sequences that ended with an error of their own (the batch went on).", s.failed),
            ("response_cache_hits", "Requests answered from the response cache.", r.hits),
            ("response_cache_misses", "Cacheable requests the response cache did not hold.", r.misses),
        ]  # fmt: skip
        for name, doc, value in counters:
            yield CounterMetricFamily(f"mini_claude_{name}", doc, value=value)
        gauges = [
            ("kv_cache_bytes", "KV-cache memory resident: blocks in use, cached, or free and not yet returned.",
             s.kv_bytes),
            ("kv_cache_used_bytes", "KV-cache memory of blocks running sequences hold.", s.kv_used_bytes),
            ("kv_cache_cached_bytes", "KV-cache memory of blocks kept only for the prefix cache.", s.kv_cached_bytes),
            ("response_cache_entries", "Answers held by the response cache.", r.entries),
        ]  # fmt: skip
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"mini_claude_{name}", doc, value=value)
