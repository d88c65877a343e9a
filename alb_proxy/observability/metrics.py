"""Prometheus metrics of one daemon, in a registry of its own (tests run several daemons)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """Every metric the data plane updates. Label values are bounded sets (names, reasons)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections_total = Counter(
            "alb_connections", "Client connections accepted.", ["listener"], registry=r
        )
        self.connections_active = Gauge(
            "alb_connections_active", "Client connections open now.", ["listener"], registry=r
        )
        self.handshakes_total = Counter(
            "alb_tls_handshakes", "Completed TLS handshakes.", ["listener", "version"], registry=r
        )
        self.handshake_failures_total = Counter(
            "alb_tls_handshake_failures",
            "Failed TLS handshakes by reason.",
            ["listener", "reason"],
            registry=r,
        )
        self.requests_total = Counter(
            "alb_http_requests",
            "Requests answered, by status class.",
            ["listener", "code"],
            registry=r,
        )
        self.upstream_errors_total = Counter(
            "alb_upstream_errors",
            "Requests a backend could not serve, by kind (connect, timeout, protocol).",
            ["server_group", "kind"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "alb_upstream_response_seconds",
            "Time from sending a request to a backend to its response head.",
            ["server_group"],
            registry=r,
        )

        self.tunnels_active = Gauge(
            "alb_tunnels_active",
            "Upgraded (WebSocket) connections being relayed.",
            ["listener"],
            registry=r,
        )
        self.server_healthy = Gauge(
            "alb_upstream_server_healthy",
            "1 while a backend server takes traffic.",
            ["server"],
            registry=r,
        )
        self.config_generation = Gauge(
            "alb_config_generation", "Generation of the snapshot being served.", registry=r
        )
        self.config_reloads_total = Counter(
            "alb_config_reloads",
            "Config reloads by result (applied, refused).",
            ["result"],
            registry=r,
        )

        self._answered: dict[tuple[str, int], Any] = {}
        self._latency: dict[str, Any] = {}
        self.workers = Gauge(
            "alb_workers", "Worker processes serving the current generation.", registry=r
        )
        self.worker_restarts_total = Counter(
            "alb_worker_restarts", "Worker processes that exited and were replaced.", registry=r
        )

    def request_answered(self, listener: str, status: int) -> None:
        """Count one answer by status class; the labelled child is looked up once per pair
        (``labels()`` costs more than the increment, and this runs per request)."""
        key = (listener, status // 100)
        child = self._answered.get(key)
        if child is None:
            child = self._answered[key] = self.requests_total.labels(listener, f"{key[1]}xx")
        child.inc()

    def upstream_responded(self, group: str, seconds: float) -> None:
        child = self._latency.get(group)
        if child is None:
            child = self._latency[group] = self.upstream_latency.labels(group)
        child.observe(seconds)

    def accepted(self) -> int:
        """Client connections accepted so far, on every listener."""
        return int(
            sum(
                sample.value
                for family in self.connections_total.collect()
                for sample in family.samples
                if sample.name.endswith("_total")
            )
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
