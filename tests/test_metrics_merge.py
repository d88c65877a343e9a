"""Merging the metrics of several worker processes into one exposition."""

from __future__ import annotations

from alb_proxy.observability.merge import families, merge, render
from alb_proxy.observability.metrics import Metrics


def _worker(connections: int, healthy: int, generation: int, failures: int) -> Metrics:
    m = Metrics()
    m.connections_total.labels("web").inc(connections)
    m.connections_active.labels("web").set(connections % 3)
    m.server_healthy.labels("10.0.0.1:80").set(healthy)
    m.config_generation.set(generation)
    m.handshake_failures_total.labels("web", "unknown_ca").inc(failures)
    m.upstream_latency.labels("sg").observe(0.01 * connections)
    return m


def _sample(merged: list[dict[str, object]], name: str, **labels: str) -> float:
    for family in merged:
        for sample_name, sample_labels, value in family["samples"]:  # type: ignore[attr-defined]
            if sample_name == name and sample_labels == labels:
                return float(value)
    raise KeyError(name)


def test_counters_and_gauges_sum_health_and_generation_take_the_minimum() -> None:
    a, b = _worker(5, 1, 7, 2), _worker(4, 0, 6, 0)
    merged = merge([families(a.registry), families(b.registry)])
    assert _sample(merged, "alb_connections_total", listener="web") == 9
    assert _sample(merged, "alb_connections_active", listener="web") == 2 + 1
    assert _sample(merged, "alb_upstream_server_healthy", server="10.0.0.1:80") == 0
    assert _sample(merged, "alb_config_generation") == 6
    assert (
        _sample(merged, "alb_tls_handshake_failures_total", listener="web", reason="unknown_ca")
        == 2
    )
    assert _sample(merged, "alb_upstream_response_seconds_count", server_group="sg") == 2
    created = [
        _sample(families(m.registry), "alb_connections_created", listener="web") for m in (a, b)
    ]
    assert _sample(merged, "alb_connections_created", listener="web") == min(created)


def test_a_series_only_one_worker_has_is_kept() -> None:
    a, b = Metrics(), Metrics()
    a.requests_total.labels("web", "2xx").inc(3)
    b.requests_total.labels("api", "5xx").inc()
    merged = merge([families(a.registry), families(b.registry)])
    assert _sample(merged, "alb_http_requests_total", listener="web", code="2xx") == 3
    assert _sample(merged, "alb_http_requests_total", listener="api", code="5xx") == 1


def test_rendered_text_is_what_prometheus_reads() -> None:
    a, b = _worker(5, 1, 7, 2), _worker(4, 1, 7, 1)
    text = render(merge([families(a.registry), families(b.registry)])).decode()
    assert "# TYPE alb_connections_total counter" in text
    assert 'alb_connections_total{listener="web"} 9.0' in text
    assert 'alb_upstream_server_healthy{server="10.0.0.1:80"} 1.0' in text
    assert 'alb_upstream_response_seconds_bucket{le="+Inf",server_group="sg"} 2.0' in text
    # One worker alone renders exactly as its own registry does.
    assert render(merge([families(a.registry)])) == a.render()
