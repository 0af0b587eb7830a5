"""Every Prometheus metric the service exports, defined in one place, and the one sink every measurement goes to.

One prefix (``quantserve_``), base units in the names, labels ``model``, ``task``, ``variant``
(plus ``endpoint``/``status`` on requests and ``metric``/``source`` on fidelity). Each app owns
its own registry, so two apps in one process (tests) never clash. Every variant's series exist
from start-up (:meth:`Metrics.declare_variant`), not only after its first request.

The request path, the batchers and shadow traffic record through the ``record_*`` methods and
:meth:`Metrics.batch_observer`, which also keep the live figures /v1/models shows (:meth:`Metrics.live`).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector

PREFIX = "quantserve"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
VARIANT = ("model", "task", "variant")
LATENCY_WINDOW = 2048  # the latest requests whose latency /v1/models summarises
Labels = tuple[str, str, str]  # (model, task, variant)
# a variant's life: serving-eager (a faster form is due), optimizing (being built in the background), optimized
# (swapped in), serving (final: nothing to optimise, or the optimisation did not check out), degraded (the gate)
STATES = ("serving-eager", "optimizing", "optimized", "serving", "degraded")
ENDPOINTS = {"embed": ("embed", "embeddings", "compare"), "classify": ("classify", "compare"),
             "translate": ("translate", "compare")}


@dataclass
class LiveStats:
    """A variant's figures since start-up, as /v1/models shows them."""

    latencies: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LATENCY_WINDOW))
    requests: int = 0
    inputs: int = 0
    shadow_inputs: int = 0
    shadow_sum: float = 0.0


class Metrics:
    def __init__(self) -> None:
        self._live: dict[Labels, LiveStats] = {}
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds
        self.requests = Counter(f"{PREFIX}_requests_total", "HTTP requests answered, by status code",
                                (*VARIANT, "endpoint", "status"), registry=r)
        self.request_seconds = Histogram(f"{PREFIX}_request_duration_seconds",
                                         "Time from request received to response ready", (*VARIANT, "endpoint"),
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram(f"{PREFIX}_queue_duration_seconds",
                                       "Time a request waited for its first batch", VARIANT,
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram(f"{PREFIX}_inference_duration_seconds",
                                           "Duration of one batched model call", VARIANT,
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Inputs per batched model call", VARIANT,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inputs = Counter(f"{PREFIX}_inputs_total", "Inputs (texts) processed", VARIANT, registry=r)
        self.tokens = Counter(f"{PREFIX}_tokens_total", "Input tokens processed", VARIANT, registry=r)
        self.weight_bytes = Gauge(f"{PREFIX}_weight_bytes", "Stored bytes of the variant's weights", VARIANT,
                                  registry=r)
        self.memory_bytes = Gauge(f"{PREFIX}_variant_memory_bytes",
                                  "Resident memory the process grew by while building the variant", VARIANT,
                                  registry=r)
        self.quantization_seconds = Gauge(f"{PREFIX}_quantization_seconds",
                                          "Seconds spent building the variant at start-up", VARIANT, registry=r)
        self.fidelity = Gauge(f"{PREFIX}_fidelity", "Agreement of the variant with the FP32 baseline "
                              "(source=startup: the probe set; source=shadow: running mean over shadow traffic)",
                              (*VARIANT, "metric", "source"), registry=r)
        self.shadow_comparisons = Counter(f"{PREFIX}_shadow_comparisons_total",
                                          "Inputs compared between a served variant and its shadow", VARIANT,
                                          registry=r)
        self.shadow_shed = Counter(f"{PREFIX}_shadow_shed_total", "Shadow requests dropped: served traffic kept "
                                   "the model busy, or the shadow budget was spent", VARIANT, registry=r)
        self.late_compiles = Counter(f"{PREFIX}_late_compiles_total",
                                     "Graphs a compiled variant compiled while serving, for an input its warm-up did not "
                                     "cover (each stalls its batch for seconds)", VARIANT, registry=r)
        self.degraded = Gauge(f"{PREFIX}_variant_degraded", "1 while the serving gate keeps unpinned traffic off the "
                              "variant (slower than its FP32 baseline, or below its fidelity bound; /v1/models says "
                              "why)", VARIANT, registry=r)
        self.cpu = Gauge(f"{PREFIX}_cpu_info", "The CPU the service measured its kernels on (value is always 1)",
                         ("vendor", "model", "arch", "isa", "features", "threads", "emulated"), registry=r)
        self.info = Gauge(f"{PREFIX}_model_info", "Static facts about each variant (value is always 1)",
                          (*VARIANT, "strategy", "runtime", "source"), registry=r)
        self.ready = Gauge(f"{PREFIX}_ready", "1 once every model can answer (see /readyz)", registry=r)
        self.model_ready = Gauge(f"{PREFIX}_model_ready", "1 once every variant of the model can answer",
                                 ("model", "task"), registry=r)
        self.state = Enum(f"{PREFIX}_variant_state", "The variant's state (see /v1/models): " + ", ".join(STATES),
                          VARIANT, states=list(STATES), registry=r)
        self.optimizations = Counter(f"{PREFIX}_optimizations_total", "Background optimisations of a variant, by "
                                     "outcome (swapped, failed, rejected)", (*VARIANT, "outcome"), registry=r)

    def declare_variant(self, model: str, task: str, variant: str, *, strategy: str, runtime: str, source: str,
                        weight_bytes: int, memory_bytes: int, quantization_seconds: float,
                        fidelity: dict[str, float]) -> None:
        labels = (model, task, variant)
        for endpoint in ENDPOINTS.get(task, ()):
            self.requests.labels(*labels, endpoint, "200")
            self.request_seconds.labels(*labels, endpoint)
        for metric in (self.queue_seconds, self.inference_seconds, self.batch_size, self.inputs, self.tokens,
                       self.shadow_comparisons, self.shadow_shed, self.late_compiles):
            metric.labels(*labels)
        self.weight_bytes.labels(*labels).set(weight_bytes)
        self.memory_bytes.labels(*labels).set(memory_bytes)
        self.quantization_seconds.labels(*labels).set(quantization_seconds)
        for name, value in fidelity.items():
            if name != "n":
                self.fidelity.labels(*labels, name, "startup").set(value)
        self.info.labels(*labels, strategy, runtime, source).set(1)
        self.degraded.labels(*labels).set(0)

    # -- the sink ------------------------------------------------------------------------------
    def record_request(self, labels: Labels, endpoint: str, status: str, seconds: float, inputs: int) -> None:
        """One request answered (or refused) by the request path."""
        self.requests.labels(*labels, endpoint, status).inc()
        if status == "200":
            self.request_seconds.labels(*labels, endpoint).observe(seconds)
            live = self._stats(labels)
            live.latencies.append(seconds)
            live.requests += 1
            live.inputs += inputs

    def record_queue(self, labels: Labels, seconds: float) -> None:
        self.queue_seconds.labels(*labels).observe(seconds)

    def batch_observer(self, labels: Labels, module: Any) -> Callable[[int, int, float], None]:
        """What a variant's batcher calls after each batch: its size, token cost and seconds."""
        seen = {"late_compiles": getattr(module, "late_compiles", 0)}

        def on_batch(size: int, cost: int, seconds: float) -> None:
            self.batch_size.labels(*labels).observe(size)
            self.inference_seconds.labels(*labels).observe(seconds)
            self.inputs.labels(*labels).inc(size)
            self.tokens.labels(*labels).inc(cost)
            late = getattr(module, "late_compiles", 0)  # a compiled variant's count (internals.compiled.Settled)
            if late > seen["late_compiles"]:
                self.late_compiles.labels(*labels).inc(late - seen["late_compiles"])
                seen["late_compiles"] = late

        return on_batch

    def record_shadow(self, labels: Labels, metric: str, agreements: list[float]) -> tuple[float, int]:
        """Per-input agreements of a shadow comparison; the running mean and count since start-up."""
        live = self._stats(labels)
        live.shadow_inputs += len(agreements)
        live.shadow_sum += sum(agreements)
        mean = live.shadow_sum / live.shadow_inputs
        self.fidelity.labels(*labels, metric, "shadow").set(mean)
        self.shadow_comparisons.labels(*labels).inc(len(agreements))
        return mean, live.shadow_inputs

    def record_shadow_shed(self, labels: Labels) -> None:
        self.shadow_shed.labels(*labels).inc()

    def live(self, *labels: str) -> dict[str, Any]:
        s = self._stats(labels)  # type: ignore[arg-type]
        xs = sorted(s.latencies)
        pick = lambda q: round(xs[min(len(xs) - 1, int(q * len(xs)))], 6) if xs else None  # noqa: E731
        return {"shadow_agreement": {"inputs": s.shadow_inputs,
                                     "mean": s.shadow_sum / s.shadow_inputs if s.shadow_inputs else None},
                "requests": s.requests, "inputs": s.inputs,
                "latency_seconds": {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99)}}

    def _stats(self, labels: Labels) -> LiveStats:
        live = self._live.get(labels)
        if live is None:
            live = self._live[labels] = LiveStats()
        return live

    def declare_cpu(self, prof) -> None:
        self.cpu.labels(prof.vendor, prof.model, prof.arch, prof.isa, ",".join(prof.features), str(prof.threads),
                        prof.emulated or "").set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
