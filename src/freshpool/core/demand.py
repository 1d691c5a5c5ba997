"""The warm pool's size learned from demand: a forecast of a label's requests and the
ready count that covers it. Pure functions of a history and a clock, so the launcher
(with the store's history and the wall clock) and the bench (with a replayed trace
and simulated time) run the same rule.

The rule is a base-stock policy. A node launched now serves a request no sooner than
one launch time from now, so the ready nodes plus those launching must cover the
requests that arrive within that lead time. Taking that count as Poisson with the
forecast rate, the smallest stock S with P(count <= S - 1) >= service level makes
that share of requests find a node at once (an M/G/inf argument: the nodes on order
are the requests of the last lead time). A request may wait `target-wait` seconds,
so the lead time to cover is the launch time less that.

The forecast rate is the larger of
- the seasonal rate: a quantile of the rates seen in the same window (the next
  `WINDOW` seconds) on past days of the same kind (weekday or weekend), over the
  last four weeks, scaled by the recent trend (the last hour against the same hour
  on those days, bounded); used only once there is a day of history;
- the last hour's rate.
CI demand comes in bursts (a merge starts many jobs at once) that a Poisson count
underrates, so the season also gives the most requests seen within one lead time
in that window on those days (the same quantile), and the target
covers that too. A reactive rate (the last few minutes) raises the target at once
in a burst the season did not foresee.
Lower targets take effect slowly (a half-life), higher ones at once.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

DAY = 86400.0
WEEK = 7 * DAY
# The window ahead the seasonal forecast looks at: the next quarter hour.
WINDOW = 900.0
# Past days looked at for the seasonal forecast, and the quantile taken of them.
SEASON_DAYS = 28
SEASONAL_QUANTILE = 0.8
# History shorter than this is not trusted for the seasonal forecast.
MIN_HISTORY = DAY
RECENT = 3600.0
# The reactive path's window: a burst shows in this many seconds of arrivals.
REACTIVE = 300.0
# The recent trend scales the seasonal rate within these bounds.
TREND_BOUNDS = (0.5, 2.0)
# A lowered target closes half its gap to the new value in this many seconds.
DECAY_HALF_LIFE = 1800.0
# The season moves slowly; it is recomputed this often (seconds).
SEASON_REFRESH = 300.0
# Launch times assumed: this quantile of recent launches.
LAUNCH_QUANTILE = 0.9


@dataclass(frozen=True)
class Policy:
    """A label's `min-ready: {auto: ...}` settings, with the cap its providers impose."""

    min: int
    max: int
    target_wait: float = 1.0
    service_level: float = 0.95
    # What the providers serving the label can run at once (None: no cap known).
    provider_cap: int | None = None


@dataclass(frozen=True)
class Season:
    """What past days of the same kind say about the next WINDOW: the rate then, the
    most requests that came within one lead time then (bursts), and the rate in the
    hour before (to compare today's with). Each is a quantile over those days."""

    rate: float
    burst: int
    before: float
    days: int


@dataclass(frozen=True)
class Forecast:
    """What the target was chosen from: rates in requests per second."""

    season: Season | None
    recent: float
    reactive: float
    trend: float
    rate: float
    history: float

    def describe(self) -> str:
        if self.season is None:
            seasonal = f"seasonal: history {self.history / 3600:.1f} h is short of a day"
        else:
            seasonal = (
                f"seasonal {self.season.rate * 3600:.1f}/h x trend {self.trend:.2f},"
                f" bursts of {self.season.burst} ({self.season.days} past days)"
            )
        return (
            f"{seasonal}; last hour {self.recent * 3600:.1f}/h;"
            f" last {REACTIVE / 60:.0f} min {self.reactive * 3600:.1f}/h"
        )


@dataclass(frozen=True)
class Decision:
    """A target ready count and why."""

    target: int
    forecast: Forecast
    launch_time: float
    wanted: int
    why: str
    # What the next decision decays from.
    peak: Peak


def count_between(times: Sequence[float], start: float, end: float) -> int:
    """How many of the sorted `times` are in [start, end)."""
    return bisect_left(times, end) - bisect_left(times, start)


def most_within(times: Sequence[float], start: float, end: float, span: float) -> int:
    """The most of the sorted `times` in [start, end) that fall within `span` seconds."""
    first, last = bisect_left(times, start), bisect_left(times, end)
    most, behind = 0, first
    for at in range(first, last):
        while times[at] - times[behind] >= span:
            behind += 1
        most = max(most, at - behind + 1)
    return most


def _weekend(at: float) -> bool:
    # The epoch was a Thursday: day 2 of a week counted from Thursday is Saturday.
    return int(at // DAY) % 7 in (2, 3)


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    at = q * (len(ordered) - 1)
    low = math.floor(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def season(arrivals: Sequence[float], now: float, first_seen: float, lead: float) -> Season | None:
    """The seasonal view of the next WINDOW (None while history is short of a day).
    It moves slowly: callers may keep one for a few minutes (SEASON_REFRESH)."""
    if now - first_seen < MIN_HISTORY:
        return None
    ahead: list[float] = []
    bursts: list[float] = []
    behind: list[float] = []
    for days in range(1, SEASON_DAYS + 1):
        then = now - days * DAY
        if then < first_seen:
            break
        if _weekend(then) != _weekend(now):
            continue
        ahead.append(count_between(arrivals, then, then + WINDOW) / WINDOW)
        bursts.append(most_within(arrivals, then, then + WINDOW, lead) if lead > 0 else 0)
        behind.append(count_between(arrivals, then - RECENT, then) / RECENT)
    if not ahead:
        return None
    return Season(
        rate=quantile(ahead, SEASONAL_QUANTILE),
        burst=math.ceil(quantile(bursts, SEASONAL_QUANTILE)),
        before=sum(behind) / len(behind),
        days=len(ahead),
    )


def forecast(
    arrivals: Sequence[float], now: float, first_seen: float, seen: Season | None
) -> Forecast:
    """The request rate to expect over the next WINDOW, from sorted arrival times
    (only those before `now` are used), when history began, and the season."""
    history = max(0.0, now - first_seen)
    recent = count_between(arrivals, now - RECENT, now) / RECENT
    reactive = count_between(arrivals, now - REACTIVE, now) / REACTIVE
    trend = 1.0
    if seen is not None and seen.before > 0:
        trend = min(max(recent / seen.before, TREND_BOUNDS[0]), TREND_BOUNDS[1])
    rate = max((seen.rate if seen else 0.0) * trend, recent)
    return Forecast(seen, recent, reactive, trend, rate, history)


def base_stock(rate: float, lead: float, service_level: float) -> int:
    """The smallest S with P(Poisson(rate * lead) <= S - 1) >= service_level."""
    mean = rate * max(lead, 0.0)
    if mean <= 0:
        return 0
    term = math.exp(-mean)
    cumulative = term
    stock = 1
    while cumulative < service_level and stock < 100_000:
        term *= mean / stock
        cumulative += term
        stock += 1
    return stock


def launch_time(samples: Sequence[float], fallback: float) -> float:
    """The launch time to assume: a high quantile of recent launches, else `fallback`."""
    return quantile(samples, LAUNCH_QUANTILE) if samples else fallback


@dataclass(frozen=True)
class Peak:
    """The last target that was a rise, and when: a lower target decays from it."""

    value: int
    at: float


def decayed(peak: Peak | None, wanted: int, now: float) -> int:
    """The target on its way from `peak` toward `wanted`: at once if up, by a
    half-life if down (so a lull between bursts does not empty the pool)."""
    if peak is None or wanted >= peak.value:
        return wanted
    keep: float = 0.5 ** (max(now - peak.at, 0.0) / DECAY_HALF_LIFE)
    return max(wanted, math.floor(wanted + (peak.value - wanted) * keep + 0.5))


def clamp(policy: Policy, wanted: int) -> tuple[int, str]:
    """`wanted` within min, max and the provider cap, and which bound applied."""
    ceiling = policy.max if policy.provider_cap is None else min(policy.max, policy.provider_cap)
    if wanted > ceiling:
        bound = "max" if ceiling == policy.max else "the providers' cap"
        return ceiling, f"capped at {bound} {ceiling}"
    if wanted < policy.min:
        return policy.min, f"raised to min {policy.min}"
    return wanted, ""


def lead_time(policy: Policy, launch: float) -> float:
    """The seconds of arrivals the warm pool must cover: a launch less the wait allowed."""
    return max(launch - policy.target_wait, 0.0)


def decide(
    policy: Policy,
    arrivals: Sequence[float],
    now: float,
    first_seen: float,
    launch: float,
    peak: Peak | None = None,
) -> Decision:
    """decide_with a season computed now."""
    seen = season(arrivals, now, first_seen, lead_time(policy, launch))
    return decide_with(policy, seen, arrivals, now, first_seen, launch, peak)


def decide_with(
    policy: Policy,
    seen: Season | None,
    arrivals: Sequence[float],
    now: float,
    first_seen: float,
    launch: float,
    peak: Peak | None = None,
) -> Decision:
    """The target ready count for now: base stock over the forecast rate, the
    season's bursts and the reactive rate, decaying from the last rise (`peak`,
    from the previous decision), within the policy's bounds."""
    ahead = forecast(arrivals, now, first_seen, seen)
    lead = lead_time(policy, launch)
    planned = 0
    if seen is not None:
        planned = max(base_stock(ahead.rate, lead, policy.service_level), seen.burst)
    burst = base_stock(ahead.reactive, lead, policy.service_level)
    wanted = max(planned, burst)
    source = "reactive (burst)" if burst > planned else "forecast"
    if seen is None and burst <= policy.min:
        source = "short history: min"
    bounded, bound = clamp(policy, wanted)
    # Decay within the bounds, so a capped burst does not leave a phantom peak above them.
    moved = decayed(peak, bounded, now)
    target, _ = clamp(policy, moved)
    parts = [
        f"{source}: covers {policy.service_level:.0%} of requests within"
        f" {policy.target_wait:g} s over a {launch:.0f} s launch",
        f"wants {wanted}",
    ]
    if moved != bounded and peak is not None:
        parts.append(f"decaying from {peak.value} (half-life {DECAY_HALF_LIFE / 60:.0f} min)")
    if bound:
        parts.append(bound)
    # A rise (or a decay that has arrived) is what later decays start from.
    after = peak if peak is not None and moved != bounded else Peak(target, now)
    return Decision(target, ahead, launch, wanted, "; ".join(parts), after)
