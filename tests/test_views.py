"""What the admin API and ``certs list`` say about a certificate's expiry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from alb_proxy.control.views import days_left

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("to_expiry", "days"),
    [
        (timedelta(days=30, hours=1), 30),
        (timedelta(hours=23), 0),
        (timedelta(hours=-1), 0),
        (-timedelta(days=1, seconds=1), -1),  # the log says "expired ... (1 day ago)"
        (-timedelta(days=2, hours=23), -2),
    ],
)
def test_days_left_counts_whole_days_either_side_of_expiry(to_expiry: timedelta, days: int) -> None:
    assert days_left(NOW + to_expiry, NOW) == days
