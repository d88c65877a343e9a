"""One ``/metrics`` for many processes: every worker's samples, merged by what they mean.

Each worker keeps its own registry; the control plane asks every worker for its samples when
scraped and merges them here (pure: plain data in, plain data out). Counters and histograms are
summed. Gauges are summed too (connections open now), except those where a sum means nothing:
a server is healthy only if every worker sees it healthy, and the generation served is the one
every process has (both the minimum). ``_created`` timestamps take the earliest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

Family = dict[str, Any]
"""``{"name", "type", "help", "samples": [[name, {label: value}, value], ...]}``"""

MIN_GAUGES = frozenset({"alb_upstream_server_healthy", "alb_config_generation"})


def families(registry: CollectorRegistry) -> list[Family]:
    """A registry's samples as plain data, to cross a process boundary."""
    return [
        {
            "name": metric.name,
            "type": metric.type,
            "help": metric.documentation,
            "samples": [[s.name, dict(s.labels), s.value] for s in metric.samples],
        }
        for metric in registry.collect()
    ]


def merge(processes: Iterable[list[Family]]) -> list[Family]:
    """Merge the families of several processes (each a list as ``families`` returns)."""
    merged: dict[str, Family] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for process in processes:
        for family in process:
            name = family["name"]
            if name not in merged:
                merged[name] = {"name": name, "type": family["type"], "help": family["help"]}
                values[name] = {}
            take_min = family["type"] == "gauge" and name in MIN_GAUGES
            into = values[name]
            for sample_name, labels, value in family["samples"]:
                key = (sample_name, tuple(sorted(labels.items())))
                if key not in into:
                    into[key] = value
                elif take_min or sample_name.endswith("_created"):
                    into[key] = min(into[key], value)
                else:
                    into[key] += value
    return [
        {**family, "samples": [[s, dict(labels), v] for (s, labels), v in values[name].items()]}
        for name, family in merged.items()
    ]


def render(merged: list[Family]) -> bytes:
    """Prometheus text exposition of merged families."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(merged))
    return generate_latest(registry)


class _Fixed:
    """A collector that yields the given families as they are."""

    def __init__(self, merged: list[Family]) -> None:
        self._merged = merged

    def collect(self) -> Iterator[Metric]:
        for family in self._merged:
            metric = Metric(family["name"], family["help"], family["type"])
            for sample_name, labels, value in family["samples"]:
                metric.add_sample(sample_name, labels, value)
            yield metric
