"""Schedulers: shares, smoothness, weight 0, eligibility, ring stability, in-flight counts, cost."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alb_proxy.upstream import schedulers
from alb_proxy.upstream.schedulers import (
    KINDS,
    Eligible,
    Scheduler,
    SourceIpHash,
    WeightedLeastConnections,
    WeightedRoundRobin,
    make_scheduler,
)

ROOT = Path(__file__).resolve().parents[1]
IO_MODULES = {"asyncio", "socket", "ssl", "selectors"}


def picks(scheduler: Scheduler, n: int, eligible: Eligible | None = None) -> list[int | None]:
    return [scheduler.pick("192.0.2.1", eligible) for _ in range(n)]


def random_ips(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [".".join(str(rng.randrange(1, 255)) for _ in range(4)) for _ in range(count)]


def longest_run(sequence: Sequence[object], item: object) -> int:
    """Longest run of ``item``, counting the wrap-around of a repeating cycle."""
    best = run = 0
    for value in [*sequence, *sequence]:
        run = run + 1 if value == item else 0
        best = max(best, run)
    return best


# --- make_scheduler ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "scheduler_type"),
    [("wrr", WeightedRoundRobin), ("wlc", WeightedLeastConnections), ("sch", SourceIpHash)],
)
def test_make_scheduler_builds_each_kind(kind: str, scheduler_type: type) -> None:
    assert isinstance(make_scheduler(kind, [1, 2]), scheduler_type)


def test_make_scheduler_takes_the_config_enum() -> None:
    from alb_proxy.config.model import Scheduler as SchedulerKind

    assert {kind.value for kind in SchedulerKind} == set(KINDS)
    assert isinstance(make_scheduler(SchedulerKind.WLC, [1]), WeightedLeastConnections)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'rr'"):
        make_scheduler("rr", [1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weight", [-1, 101])
def test_weight_out_of_range_is_refused(kind: str, weight: int) -> None:
    with pytest.raises(ValueError, match=r"server 1 is -?\d+, not 0–100"):
        make_scheduler(kind, [1, weight])


@pytest.mark.parametrize("weight", [True, 1.5, "1"])
def test_weight_that_is_not_an_integer_is_refused(weight: Any) -> None:
    with pytest.raises(ValueError, match="not an integer"):
        make_scheduler("wrr", [weight])


@pytest.mark.parametrize("keys", [["a"], ["a", "a"]])
def test_ring_keys_must_be_one_distinct_name_per_server(keys: list[str]) -> None:
    with pytest.raises(ValueError, match="2 distinct names"):
        make_scheduler("sch", [1, 1], keys=keys)


@pytest.mark.parametrize("in_flight", [[1], [0, -1]])
def test_in_flight_seed_must_be_one_count_per_server(in_flight: list[int]) -> None:
    with pytest.raises(ValueError, match="in_flight needs 2 counts"):
        make_scheduler("wlc", [1, 1], in_flight=in_flight)


# --- every kind -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_weight_zero_is_never_picked(kind: str) -> None:
    scheduler = make_scheduler(kind, [0, 1, 0, 1])
    chosen = set()
    for ip in random_ips(500):
        index = scheduler.pick(ip)
        assert index is not None
        scheduler.started(index)
        chosen.add(index)
    assert chosen == {1, 3}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weights", [[], [0], [0, 0, 0]])
def test_no_weight_gives_none(kind: str, weights: list[int]) -> None:
    assert make_scheduler(kind, weights).pick("192.0.2.1") is None


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_eligible_gives_none(kind: str) -> None:
    assert make_scheduler(kind, [5, 5, 0]).pick("192.0.2.1", lambda index: False) is None


@pytest.mark.parametrize("kind", KINDS)
def test_only_weight_zero_eligible_gives_none(kind: str) -> None:
    assert make_scheduler(kind, [5, 0]).pick("192.0.2.1", lambda index: index == 1) is None


@given(
    kind=st.sampled_from(KINDS),
    weights=st.lists(st.integers(0, 100), max_size=12),
    data=st.data(),
)
def test_pick_is_none_or_an_eligible_server_with_weight(
    kind: str, weights: list[int], data: st.DataObject
) -> None:
    """Health flaps between picks and requests end in any order; the answer stays valid."""
    scheduler = make_scheduler(kind, weights)
    running: list[int] = []
    for _ in range(data.draw(st.integers(1, 30), label="picks")):
        healthy = data.draw(st.sets(st.integers(0, max(len(weights) - 1, 0))), label="healthy")
        client_ip = data.draw(st.ip_addresses(), label="client").compressed
        chosen = scheduler.pick(client_ip, healthy.__contains__)
        if not any(weights[i] for i in healthy if i < len(weights)):
            assert chosen is None
            continue
        assert chosen is not None
        assert chosen in healthy
        assert weights[chosen] > 0
        scheduler.started(chosen)
        running.append(chosen)
        if data.draw(st.booleans(), label="one ends"):
            scheduler.finished(running.pop(data.draw(st.integers(0, len(running) - 1))))


# --- wrr --------------------------------------------------------------------------------------


def test_wrr_spreads_5_1_1_with_runs_of_at_most_3() -> None:
    sequence = picks(make_scheduler("wrr", [5, 1, 1]), 14)
    assert sequence == [0, 1, 0, 0, 2, 0, 0] * 2
    assert longest_run(sequence[:7], 0) == 3  # ceil(5 / 2): 2 light picks split 5 heavy ones


@pytest.mark.parametrize("weights", [[50, 30, 20], [100, 1], [3, 7, 0, 90], [1, 1, 1, 1]])
def test_wrr_shares_over_10000_picks_within_2_percent(weights: list[int]) -> None:
    counts = Counter(picks(make_scheduler("wrr", weights), 10_000))
    total = sum(weights)
    for index, weight in enumerate(weights):
        assert abs(counts[index] / 10_000 - weight / total) <= 0.02


@given(st.lists(st.integers(0, 100), min_size=1, max_size=8).filter(any))
def test_wrr_keeps_every_server_within_one_pick_of_its_exact_share(weights: list[int]) -> None:
    """After t picks server i has t * w_i / sum(w), rounded up or down: never a burst.

    This is WF²Q's worst-case fairness. It makes every cycle of sum(w) picks exact, and the
    schedule periodic, so any window of sum(w) consecutive picks holds each server w_i times.
    """
    total = sum(weights)
    sequence = picks(make_scheduler("wrr", weights), 2 * total)
    counts = Counter[int | None]()
    for t, chosen in enumerate(sequence, start=1):
        counts[chosen] += 1
        for index, weight in enumerate(weights):
            assert abs(counts[index] - Fraction(t * weight, total)) < 1
    exact = Counter({i: w for i, w in enumerate(weights) if w})
    for start in range(total + 1):
        assert Counter(sequence[start : start + total]) == exact


def test_wrr_skips_ineligible_servers_and_they_come_back() -> None:
    scheduler = make_scheduler("wrr", [1, 1, 1])
    healthy = {0, 2}
    assert picks(scheduler, 6, healthy.__contains__) == [0, 2, 0, 2, 0, 2]
    healthy.add(1)
    assert Counter(picks(scheduler, 300, healthy.__contains__)) == {0: 100, 1: 100, 2: 100}


def test_wrr_recovered_server_takes_its_share_without_a_burst() -> None:
    """A skipped server is deferred, not left behind: no catch-up for the time it was down."""
    scheduler = make_scheduler("wrr", [1, 1, 1])
    picks(scheduler, 1000, lambda index: index != 1)
    sequence = picks(scheduler, 30)
    assert longest_run(sequence, 1) == 1
    assert Counter(sequence) == {0: 10, 1: 10, 2: 10}


def test_wrr_keeps_the_healthy_servers_in_proportion() -> None:
    sequence = picks(make_scheduler("wrr", [5, 1, 3]), 600, lambda index: index != 2)
    assert Counter(sequence) == {0: 500, 1: 100}
    assert longest_run(sequence, 0) <= 5


def test_wrr_ignores_the_client() -> None:
    scheduler = make_scheduler("wrr", [2, 1])
    assert [scheduler.pick(ip) for ip in random_ips(3)] == [0, 1, 0]


# --- wlc --------------------------------------------------------------------------------------


def start_picks(scheduler: Scheduler, n: int, eligible: Eligible | None = None) -> list[int]:
    """Pick and start ``n`` requests that never finish."""
    chosen: list[int] = []
    for _ in range(n):
        index = scheduler.pick("192.0.2.1", eligible)
        assert index is not None
        scheduler.started(index)
        chosen.append(index)
    return chosen


def test_wlc_splits_never_ending_requests_by_weight() -> None:
    assert Counter(start_picks(make_scheduler("wlc", [1, 3]), 400)) == {0: 100, 1: 300}
    counts = Counter(start_picks(make_scheduler("wlc", [1, 2, 3, 4]), 1000))
    for index, weight in enumerate([1, 2, 3, 4]):
        assert abs(counts[index] - 100 * weight) <= 1


def test_wlc_finished_frees_capacity() -> None:
    scheduler = make_scheduler("wlc", [1, 1])
    start_picks(scheduler, 10)  # 5 each
    for _ in range(3):
        scheduler.finished(0)
    assert start_picks(scheduler, 4) == [0, 0, 0, 1]


def test_wlc_avoids_a_server_with_many_in_flight() -> None:
    scheduler = make_scheduler("wlc", [1, 1, 1])
    for _ in range(50):
        scheduler.started(1)
    assert Counter(start_picks(scheduler, 100)) == {0: 50, 2: 50}
    assert 1 in start_picks(scheduler, 3)


def test_wlc_breaks_ties_round_robin() -> None:
    """Requests that end at once leave every load equal; ties go to the least recent start."""
    scheduler = make_scheduler("wlc", [2, 2, 2])
    sequence = []
    for _ in range(9):
        index = scheduler.pick("192.0.2.1")
        assert index is not None
        scheduler.started(index)
        scheduler.finished(index)
        sequence.append(index)
    assert sequence == [0, 1, 2] * 3


def test_wlc_pick_alone_changes_nothing() -> None:
    scheduler = make_scheduler("wlc", [1, 1])
    assert picks(scheduler, 3) == [0, 0, 0]


def test_wlc_seeded_in_flight_counts() -> None:
    scheduler = make_scheduler("wlc", [1, 1], in_flight=[5, 0])
    assert start_picks(scheduler, 6) == [1, 1, 1, 1, 1, 0]


def test_wlc_ignores_a_finish_it_never_counted() -> None:
    scheduler = make_scheduler("wlc", [1, 1])
    scheduler.finished(0)  # a request started before a reload, on the old scheduler
    assert start_picks(scheduler, 4) == [0, 1, 0, 1]


def test_wlc_skips_the_lightest_when_ineligible_and_changes_nothing() -> None:
    scheduler = make_scheduler("wlc", [1, 1, 1, 1])
    for index, count in enumerate([0, 2, 1, 3]):
        for _ in range(count):
            scheduler.started(index)
    assert scheduler.pick("192.0.2.1", lambda index: index not in {0, 2}) == 1
    assert scheduler.pick("192.0.2.1", lambda index: index == 3) == 3
    assert scheduler.pick("192.0.2.1") == 0


# --- sch --------------------------------------------------------------------------------------

SERVERS = [f"10.0.0.{i}:8080" for i in range(11)]


def assignment(
    scheduler: Scheduler, ips: Sequence[str], eligible: Eligible | None = None
) -> dict[str, int | None]:
    return {ip: scheduler.pick(ip, eligible) for ip in ips}


def named(scheduler: Scheduler, keys: Sequence[str], ips: Sequence[str]) -> dict[str, str]:
    """Which server (by key) each client gets, to compare rings with different indexes."""
    chosen = assignment(scheduler, ips)
    return {ip: keys[index] for ip, index in chosen.items() if index is not None}


def test_sch_client_sticks_to_one_server() -> None:
    scheduler = make_scheduler("sch", [100, 100, 100])
    for ip in random_ips(50):
        assert len({scheduler.pick(ip) for _ in range(5)}) == 1


def test_sch_does_not_depend_on_the_process_hash_seed() -> None:
    ips = random_ips(200)
    code = (
        "from alb_proxy.upstream.schedulers import make_scheduler; "
        f"s = make_scheduler('sch', [100, 50, 20]); print([s.pick(ip) for ip in {ips!r}])"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    here = make_scheduler("sch", [100, 50, 20])
    assert runs == {f"{[here.pick(ip) for ip in ips]}\n"}


def test_sch_spreads_equal_servers_evenly() -> None:
    ips = random_ips(100_000)
    counts = Counter(assignment(make_scheduler("sch", [100] * 10, keys=SERVERS[:10]), ips).values())
    for index in range(10):
        assert abs(counts[index] / len(ips) - 0.10) <= 0.015  # 10 % ± 1.5 points


def test_sch_shares_follow_weights() -> None:
    weights = [100, 50, 25, 25]
    ips = random_ips(100_000)
    counts = Counter(assignment(make_scheduler("sch", weights, keys=SERVERS[:4]), ips).values())
    for index, weight in enumerate(weights):
        assert counts[index] / len(ips) == pytest.approx(weight / 200, rel=0.15)


def test_sch_adding_a_server_moves_about_1_in_n_clients_all_to_it() -> None:
    ips = random_ips(10_000)
    before = named(make_scheduler("sch", [100] * 10, keys=SERVERS[:10]), SERVERS, ips)
    after = named(make_scheduler("sch", [100] * 11, keys=SERVERS), SERVERS, ips)
    moved = [ip for ip in ips if before[ip] != after[ip]]
    assert 0.05 <= len(moved) / len(ips) <= 0.15  # 1/11 ≈ 0.09 expected
    assert {after[ip] for ip in moved} == {SERVERS[10]}


def test_sch_removing_a_server_moves_only_its_clients() -> None:
    ips = random_ips(10_000)
    keys = SERVERS[:10]
    before = named(make_scheduler("sch", [100] * 10, keys=keys), keys, ips)
    rest = keys[:4] + keys[5:]  # a server in the middle: the indexes after it shift
    after = named(make_scheduler("sch", [100] * 9, keys=rest), rest, ips)
    moved = {ip for ip in ips if before[ip] != after[ip]}
    assert moved == {ip for ip in ips if before[ip] == keys[4]}
    assert 0.05 <= len(moved) / len(ips) <= 0.15


def test_sch_default_keys_are_stable_when_the_last_server_goes() -> None:
    ips = random_ips(2_000)
    before = assignment(make_scheduler("sch", [100] * 5), ips)
    after = assignment(make_scheduler("sch", [100] * 4), ips)
    assert {ip for ip in ips if before[ip] != after[ip]} == {ip for ip in ips if before[ip] == 4}


def test_sch_raising_a_weight_only_draws_clients_to_that_server() -> None:
    ips = random_ips(10_000)
    keys = SERVERS[:4]
    before = assignment(make_scheduler("sch", [50, 50, 50, 50], keys=keys), ips)
    after = assignment(make_scheduler("sch", [50, 100, 50, 50], keys=keys), ips)
    assert {after[ip] for ip in ips if before[ip] != after[ip]} == {1}


def test_sch_client_of_an_unhealthy_server_moves_and_comes_back() -> None:
    scheduler = make_scheduler("sch", [100] * 5, keys=SERVERS[:5])
    ips = random_ips(2_000)
    healthy = assignment(scheduler, ips)
    down = assignment(scheduler, ips, lambda index: index != 2)
    for ip in ips:
        if healthy[ip] == 2:
            assert down[ip] not in {2, None}
        else:
            assert down[ip] == healthy[ip]
    assert {healthy[ip] for ip in ips if healthy[ip] != down[ip]} == {2}
    assert assignment(scheduler, ips) == healthy


def test_sch_walks_past_several_unhealthy_servers() -> None:
    scheduler = make_scheduler("sch", [100] * 5)
    assert {scheduler.pick(ip, lambda index: index == 3) for ip in random_ips(100)} == {3}


# --- cost -------------------------------------------------------------------------------------


def count_lines(run: Callable[[], object]) -> int:
    """Python lines executed inside the schedulers module while ``run`` runs.

    The C helpers it calls (heapq, bisect) cost O(log n) each by their contract, so a count that
    stays flat from 10 to 1,000 servers means O(log n) per operation; a scan of every server
    would grow a hundredfold.
    """
    count = 0

    def local(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        return local if frame.f_code.co_filename == schedulers.__file__ else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        run()
    finally:
        sys.settrace(previous)
    return count


def workload(kind: str, n: int, down: int) -> tuple[Callable[[], object], list[int]]:
    """2,000 requests at n servers with random weights, ``down`` of them unhealthy; wlc keeps
    about 5n requests in flight, ending a random one per new one."""
    rng = random.Random(n)
    weights = [rng.randint(1, 100) for _ in range(n)]
    scheduler = make_scheduler(kind, weights)
    unhealthy = set(rng.sample(range(n), down))
    ips = random_ips(2_000, seed=n)
    calls: list[int] = []

    def eligible(index: int) -> bool:
        calls.append(index)
        return index not in unhealthy

    running: list[int] = []
    for ip in random_ips(5 * n, seed=n + 1):
        index = scheduler.pick(ip, eligible)
        assert index is not None
        scheduler.started(index)
        running.append(index)
    calls.clear()

    def run() -> None:
        for ip in ips:
            index = scheduler.pick(ip, eligible)
            assert index is not None
            scheduler.started(index)
            running.append(index)
            scheduler.finished(running.pop(rng.randrange(len(running))))

    return run, calls


@pytest.mark.parametrize("kind", KINDS)
def test_cost_per_request_hardly_grows_from_10_to_1000_servers(kind: str) -> None:
    small, _ = workload(kind, 10, down=0)
    large, calls = workload(kind, 1000, down=0)
    ratio = count_lines(large) / count_lines(small)
    assert ratio <= 4  # log(1000) / log(10) = 3, plus slack; a scan of every server: ~100
    assert len(calls) == 2_000  # one health check per pick, not one per server


@pytest.mark.parametrize("kind", KINDS)
def test_cost_with_a_few_unhealthy_servers_does_not_grow_with_n(kind: str) -> None:
    small, _ = workload(kind, 10, down=3)
    large, calls = workload(kind, 1000, down=3)
    assert count_lines(large) <= 4 * count_lines(small)
    assert len(calls) <= (3 + 1) * 2_000  # each unhealthy server: at most one check per pick


def test_module_is_pure() -> None:
    module = "alb_proxy.upstream.schedulers"
    code = f"import sys, {module}; print(sorted({IO_MODULES!r} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
