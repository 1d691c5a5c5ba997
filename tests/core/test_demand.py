"""The warm pool's forecast and target rule (core/demand.py), on made-up histories."""

from __future__ import annotations

import pytest

from freshpool.core import demand
from freshpool.core.demand import DAY, Peak, Policy

# A Monday 00:00 UTC (the epoch's week starts on a Thursday; 4 days on is Monday).
MONDAY = 4 * DAY + 52 * demand.WEEK
POLICY = Policy(min=2, max=40, target_wait=1.0, service_level=0.95)


def steady(start: float, end: float, every: float) -> list[float]:
    times, t = [], start
    while t < end:
        times.append(t)
        t += every
    return times


def working_hours(days: int, every: float) -> list[float]:
    """One request per `every` seconds from 09:00 to 17:00 on each weekday."""
    times: list[float] = []
    for d in range(days):
        day = MONDAY + d * DAY
        if int(day // DAY) % 7 not in (2, 3):
            times += steady(day + 9 * 3600, day + 17 * 3600, every)
    return times


def test_short_history_falls_back_to_min() -> None:
    now = MONDAY + 10 * 3600
    arrivals = steady(now - 3 * 3600, now - 1800, 600)
    decision = demand.decide(POLICY, arrivals, now, first_seen=now - 3 * 3600, launch=30)
    assert decision.forecast.season is None
    assert decision.target == POLICY.min
    assert "short history" in decision.why


def test_a_day_of_history_forecasts_the_morning_before_it_comes() -> None:
    history = working_hours(8, every=20)  # Monday to the next Monday's end
    now = MONDAY + 8 * DAY + 9 * 3600  # Tuesday 09:00, nothing yet today
    decision = demand.decide(POLICY, history, now, first_seen=MONDAY, launch=60)
    assert decision.forecast.season is not None
    assert decision.forecast.season.rate == pytest.approx(1 / 20, rel=0.05)
    # 3 per minute over a 59 s lead: a Poisson(2.95) at 95% needs 7 nodes.
    assert decision.target == demand.base_stock(1 / 20, 59, 0.95) == 7
    # The same hour on a Saturday: weekends are other days, no demand then.
    saturday = MONDAY + 12 * DAY + 9 * 3600
    quiet = demand.decide(POLICY, history, saturday, first_seen=MONDAY, launch=60)
    assert quiet.target == POLICY.min


def test_a_burst_raises_the_target_at_once_even_without_history() -> None:
    now = MONDAY + 3600
    burst = steady(now - 120, now, 2)  # 60 requests in two minutes
    decision = demand.decide(POLICY, burst, now, first_seen=now - 120, launch=30)
    assert decision.target > 10
    assert "reactive" in decision.why


def test_a_lower_target_decays_slowly() -> None:
    now = MONDAY + 3600
    peak = Peak(30, now)
    assert demand.decayed(peak, 0, now + 60) >= 28
    half = demand.decayed(peak, 0, now + demand.DECAY_HALF_LIFE)
    assert half == 15
    assert demand.decayed(peak, 0, now + 10 * demand.DECAY_HALF_LIFE) == 0
    assert demand.decayed(peak, 40, now + 1) == 40
    # Through decide: quiet after the burst keeps most of the pool for a while.
    decision = demand.decide(POLICY, [], now + 120, first_seen=now - 1800, launch=30, peak=peak)
    assert 25 <= decision.target < 30 and "decaying from 30" in decision.why
    assert decision.peak == peak


def test_caps_bound_the_target() -> None:
    now = MONDAY + 3600
    burst = steady(now - 300, now, 0.5)
    capped = Policy(min=1, max=12, provider_cap=None)
    assert demand.decide(capped, burst, now, now - 300, launch=60).target == 12
    by_providers = Policy(min=1, max=100, provider_cap=8)
    decision = demand.decide(by_providers, burst, now, now - 300, launch=60)
    assert decision.target == 8 and "providers' cap" in decision.why
    # Never below min, even with nothing to serve.
    assert demand.decide(Policy(min=3, max=10), [], now, now - 9 * DAY, launch=60).target == 3


def test_waiting_allowed_as_long_as_a_launch_needs_no_warm_nodes() -> None:
    now = MONDAY + 3600
    burst = steady(now - 300, now, 1)
    patient = Policy(min=0, max=50, target_wait=60)
    assert demand.decide(patient, burst, now, now - 300, launch=45).target == 0


def test_launch_time_is_a_high_quantile_of_recent_launches() -> None:
    assert demand.launch_time([], fallback=90) == 90
    assert demand.launch_time([10.0] * 9 + [100.0], fallback=90) == pytest.approx(19, rel=0.01)


def test_recent_trend_scales_the_seasonal_rate() -> None:
    history = working_hours(8, every=20)
    now = MONDAY + 8 * DAY + 12 * 3600  # Tuesday noon
    busier = history + steady(now - 3600, now, 10)  # today's last hour at twice the usual
    seen = demand.season(history, now, MONDAY, lead=30)
    usual = demand.forecast(history + steady(now - 3600, now, 20), now, MONDAY, seen)
    trend = demand.forecast(busier, now, MONDAY, seen)
    assert usual.trend == pytest.approx(1.0, rel=0.05)
    assert trend.trend == pytest.approx(2.0, rel=0.05)
    assert trend.rate == pytest.approx(2 * usual.rate, rel=0.1)


def test_bursts_on_past_days_are_covered_before_they_come() -> None:
    history = working_hours(8, every=600)
    # Every weekday at 10:05, a merge starts 25 jobs within 20 s.
    for d in range(8):
        day = MONDAY + d * DAY
        if int(day // DAY) % 7 not in (2, 3):
            history += steady(day + 10 * 3600 + 300, day + 10 * 3600 + 320, 0.8)
    history.sort()
    now = MONDAY + 8 * DAY + 10 * 3600  # Tuesday 10:00
    decision = demand.decide(POLICY, history, now, first_seen=MONDAY, launch=60)
    assert decision.forecast.season is not None and decision.forecast.season.burst == 25
    assert decision.target == 25
    # A Poisson count at the same mean rate would have kept far fewer.
    assert demand.base_stock(decision.forecast.rate, 59, 0.95) < 10
