"""CI demand traces for `python -m bench demand`: a generator shaped like real CI load,
and a reader for an operator's own trace (CSV of request times and labels).

The generator's parameters (TraceShape) and what each means:
- weeks: how many weeks to make; the bench measures the last one, the weeks before
  are the history auto learns from.
- labels: each label's share of the demand (the peak rate is the whole pool's).
- peak_per_hour: requests per hour at a weekday's busiest, before bursts.
- day_start, day_end: the working day (UTC hours); demand rises and falls over an
  hour around each, with a dip to `lunch` of the peak between 12 and 13.
- night: the share of the peak that goes on outside the working day (other time
  zones, cron jobs).
- weekend: the share of a weekday's shape that Saturdays and Sundays see.
- merges_per_hour: during working hours, how often a merge (or a push to a busy
  branch) starts a burst; bursts scale with the day's shape like the rest.
- burst_min, burst_max, burst_spread: a burst is that many requests (uniform),
  spread over `burst_spread` seconds.
- job_median, job_sigma: each job's run time, log-normal (seconds, and the sigma
  of its logarithm).
- seed: the random stream; the same seed gives the same trace.
"""

from __future__ import annotations

import csv
import math
import random
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

DAY = 86400.0
# A Monday 00:00 UTC: generated traces start on one, so weekdays come out right.
MONDAY = 1_796_601_600.0
LABEL = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


@dataclass(frozen=True)
class Request:
    at: float
    label: str
    # How long the job holds its node (seconds).
    duration: float


@dataclass(frozen=True)
class TraceShape:
    weeks: int = 3
    labels: dict[str, float] = field(default_factory=lambda: {"debian": 0.8, "debian-large": 0.2})
    peak_per_hour: float = 240.0
    day_start: float = 8.0
    day_end: float = 19.0
    lunch: float = 0.7
    night: float = 0.04
    weekend: float = 0.15
    merges_per_hour: float = 2.0
    burst_min: int = 10
    burst_max: int = 40
    burst_spread: float = 60.0
    job_median: float = 600.0
    job_sigma: float = 0.6
    seed: int = 7


class TraceError(ValueError):
    """A trace file that cannot be replayed: every bad row's line and what is wrong."""


def _ramp(hour: float, start: float, end: float) -> float:
    """0 before start, 1 after end, a smooth rise between."""
    if hour <= start:
        return 0.0
    if hour >= end:
        return 1.0
    return 0.5 - 0.5 * math.cos(math.pi * (hour - start) / (end - start))


def shape_at(shape: TraceShape, at: float) -> float:
    """The demand at `at` as a share of the weekday peak (bursts aside)."""
    hour = (at % DAY) / 3600
    working = _ramp(hour, shape.day_start - 0.5, shape.day_start + 0.5) * (
        1 - _ramp(hour, shape.day_end - 0.5, shape.day_end + 0.5)
    )
    if 12 <= hour < 13:
        working *= shape.lunch
    level = shape.night + (1 - shape.night) * working
    weekday = int((at - MONDAY) // DAY) % 7
    return level * (shape.weekend if weekday >= 5 else 1.0)


def generate(shape: TraceShape) -> list[Request]:
    """Requests over `shape.weeks` weeks from MONDAY: a Poisson stream thinned to the
    day's shape, plus merge bursts; sorted by time."""
    rng = random.Random(shape.seed)
    names, weights = list(shape.labels), list(shape.labels.values())
    end = MONDAY + shape.weeks * 7 * DAY
    peak = shape.peak_per_hour / 3600
    out: list[Request] = []

    def job() -> float:
        return shape.job_median * math.exp(rng.gauss(0, shape.job_sigma))

    at = MONDAY
    while True:
        at += rng.expovariate(peak)
        if at >= end:
            break
        if rng.random() < shape_at(shape, at):
            out.append(Request(at, rng.choices(names, weights)[0], job()))
    merges = shape.merges_per_hour / 3600
    at = MONDAY
    while True:
        at += rng.expovariate(merges)
        if at >= end:
            break
        # Merges follow the working day; the night's trickle does not merge much.
        if rng.random() < max(0.0, shape_at(shape, at) - shape.night):
            label = rng.choices(names, weights)[0]
            for _ in range(rng.randint(shape.burst_min, shape.burst_max)):
                out.append(Request(at + rng.uniform(0, shape.burst_spread), label, job()))
    return sorted(out, key=lambda r: r.at)


def _time_of(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        raise ValueError(f"time {text!r} has no time zone (add Z or +00:00)")
    return stamp.timestamp()


def _row(fields: list[str], default_duration: float) -> Request:
    if len(fields) not in (2, 3):
        raise ValueError(f"expected 2 or 3 fields (time,label[,duration]), got {len(fields)}")
    text, label = fields[0].strip(), fields[1].strip()
    try:
        at = _time_of(text)
    except ValueError as exc:
        raise ValueError(
            f"time {text!r} is neither seconds since the epoch nor an ISO 8601 time"
            if "time zone" not in str(exc)
            else str(exc)
        ) from None
    if not math.isfinite(at) or at < 0:
        raise ValueError(f"time {text!r} is not a time")
    if not LABEL.match(label):
        raise ValueError(f"label {label!r} is not a label name (a-z, 0-9, -)")
    duration = default_duration
    if len(fields) == 3:
        try:
            duration = float(fields[2])
        except ValueError:
            raise ValueError(f"duration {fields[2].strip()!r} is not a number") from None
        if not math.isfinite(duration) or duration <= 0:
            raise ValueError(f"duration {fields[2].strip()!r} is not a positive number of seconds")
    return Request(at, label, duration)


def read(path: Path, default_duration: float = 600.0) -> list[Request]:
    """A trace from CSV rows `time,label[,duration]`: time in seconds since the epoch
    or ISO 8601 with a zone, duration the job's seconds (default `default_duration`).
    A first row `time,label...` is a header. Blank lines and `#` comments are skipped.
    Raises TraceError naming every bad row (up to 20) by line."""
    problems: list[str] = []
    out: list[Request] = []
    with path.open(newline="") as stream:
        for line, fields in enumerate(csv.reader(stream), 1):
            if not fields or not "".join(fields).strip() or fields[0].lstrip().startswith("#"):
                continue
            if line == 1 and fields[0].strip().lower() == "time":
                continue
            try:
                out.append(_row(fields, default_duration))
            except ValueError as exc:
                problems.append(f"{path}:{line}: {exc}")
    if problems:
        shown = problems[:20]
        more = len(problems) - len(shown)
        raise TraceError("\n".join(shown + ([f"... and {more} more bad rows"] if more else [])))
    if not out:
        raise TraceError(f"{path}: no requests in the trace")
    return sorted(out, key=lambda r: r.at)
