"""Prometheus metrics of the server (text format at ``GET /metrics``).

Each :class:`Metrics` has its own registry, so several servers (tests) can live
in one process. The scheduler thread updates them; prometheus-client is
thread-safe.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from verispec.engine import StepEvent

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
MAX_POSITIONS = 16  # acceptance by draft position is kept for the first positions


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "verispec_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("verispec_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter(
            "verispec_generation_tokens", "Tokens generated (after stop strings)", registry=r
        )
        self.target_passes = Counter(
            "verispec_target_passes", "Batched target forward passes", registry=r
        )
        self.sequence_passes = Counter(
            "verispec_sequence_passes",
            "Sequence verifications (one per sequence per pass)",
            registry=r,
        )
        self.drafted = Counter("verispec_drafted_tokens", "Draft tokens proposed", registry=r)
        self.accepted = Counter("verispec_accepted_tokens", "Draft tokens accepted", registry=r)
        self.free_drafted = Counter(
            "verispec_free_drafted_tokens",
            "Draft tokens proposed by prompt lookup (alone or in hybrid), not by a draft model",
            registry=r,
        )
        self.drafted_by_position = Counter(
            "verispec_drafted_by_position",
            "Draft tokens proposed at position i",
            ["position"],
            registry=r,
        )
        self.accepted_by_position = Counter(
            "verispec_accepted_by_position",
            "Draft tokens accepted at position i",
            ["position"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "verispec_queue_depth", "Requests waiting for a batch slot", registry=r
        )
        self.running = Gauge(
            "verispec_running_sequences", "Sequences in the running batch", registry=r
        )
        self.finished_sequences = Counter(
            "verispec_finished_sequences", "Sequences that left the batch", ["outcome"], registry=r
        )
        self.request_latency = Histogram(
            "verispec_request_latency_seconds",
            "Time from receiving a request to its last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "verispec_time_to_first_token_seconds",
            "Time from receiving a request to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "verispec_queue_wait_seconds",
            "Time spent waiting for a batch slot",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pass_seconds = Histogram(
            "verispec_target_pass_seconds",
            "Duration of one batched target pass",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pass_rows = Histogram(
            "verispec_target_pass_rows",
            "Positions scored per batched target pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.batch_size = Histogram(
            "verispec_batch_size",
            "Sequences per batched target pass",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )

    def record_pass(self, event: StepEvent, emitted: int, *, free: bool = False) -> None:
        """One sequence's verification; ``free``: its draft came from a prompt lookup."""
        self.sequence_passes.inc()
        self.generation_tokens.inc(emitted)
        self.drafted.inc(event.num_drafted)
        if free:
            self.free_drafted.inc(event.num_drafted)
        self.accepted.inc(event.num_accepted)
        for i in range(min(event.num_drafted, MAX_POSITIONS)):
            self.drafted_by_position.labels(position=str(i + 1)).inc()
            if i < event.num_accepted:
                self.accepted_by_position.labels(position=str(i + 1)).inc()

    def target_pass(self, *, seconds: float, rows: int, batch: int) -> None:
        self.target_passes.inc()
        self.pass_seconds.observe(seconds)
        self.pass_rows.observe(rows)
        self.batch_size.observe(batch)

    def finished(self, *, cancelled: bool) -> None:
        self.finished_sequences.labels(outcome="cancelled" if cancelled else "completed").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
