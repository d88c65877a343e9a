"""Smooth weighted round-robin: shares, spread, weight 0, the eligibility filter."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alb_proxy.upstream.schedulers import Scheduler, SmoothWeightedRoundRobin

ROOT = Path(__file__).resolve().parents[1]
IO_MODULES = {"asyncio", "socket", "ssl", "selectors"}


def picks(scheduler: SmoothWeightedRoundRobin, n: int) -> list[int | None]:
    return [scheduler.pick() for _ in range(n)]


def test_nginx_sequence_for_5_1_1() -> None:
    assert picks(SmoothWeightedRoundRobin([5, 1, 1]), 14) == [0, 0, 1, 0, 2, 0, 0] * 2


@pytest.mark.parametrize("weights", [[50, 30, 20], [100, 1], [3, 7, 0, 90], [1, 1, 1, 1]])
def test_shares_over_10000_picks_within_2_percent(weights: list[int]) -> None:
    counts = Counter(picks(SmoothWeightedRoundRobin(weights), 10_000))
    total = sum(weights)
    for index, weight in enumerate(weights):
        assert abs(counts[index] / 10_000 - weight / total) <= 0.02


@given(st.lists(st.integers(0, 100), min_size=1, max_size=8).filter(any))
def test_each_cycle_gives_exact_shares(weights: list[int]) -> None:
    counts = Counter(picks(SmoothWeightedRoundRobin(weights), sum(weights)))
    assert counts == Counter({i: w for i, w in enumerate(weights) if w})


def test_weight_zero_is_never_picked() -> None:
    scheduler = SmoothWeightedRoundRobin([0, 1, 0])
    assert set(picks(scheduler, 100)) == {1}


def test_eligible_filter_skips_servers_and_they_come_back() -> None:
    scheduler = SmoothWeightedRoundRobin([1, 1, 1])
    healthy = {0, 2}
    assert [scheduler.pick(healthy.__contains__) for _ in range(6)] == [0, 2, 0, 2, 0, 2]
    healthy.add(1)
    assert Counter(scheduler.pick(healthy.__contains__) for _ in range(300)) == Counter(
        {0: 100, 1: 100, 2: 100}
    )


@pytest.mark.parametrize("weights", [[], [0], [0, 0, 0]])
def test_no_weight_gives_none(weights: list[int]) -> None:
    assert SmoothWeightedRoundRobin(weights).pick() is None


def test_nothing_eligible_gives_none() -> None:
    assert SmoothWeightedRoundRobin([5, 5]).pick(lambda index: False) is None


@pytest.mark.parametrize("weight", [-1, 101])
def test_weight_out_of_range_is_refused(weight: int) -> None:
    with pytest.raises(ValueError, match="0–100"):
        SmoothWeightedRoundRobin([1, weight])


def test_client_ip_does_not_change_round_robin() -> None:
    scheduler: Scheduler = SmoothWeightedRoundRobin([2, 1])
    assert [scheduler.pick(client_ip="192.0.2.1") for _ in range(3)] == [0, 1, 0]


def test_module_is_pure() -> None:
    module = "alb_proxy.upstream.schedulers"
    code = f"import sys, {module}; print(sorted({IO_MODULES!r} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
