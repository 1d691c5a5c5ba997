"""The demand bench's pieces: the trace generator's shape, the trace file reader's
refusals, and the replay's accounting on traces small enough to reason about."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import demand as bench_demand
from bench.trace import DAY, MONDAY, Request, TraceError, TraceShape, generate, read


def test_the_generated_week_has_weekday_peaks_quiet_nights_and_weekends() -> None:
    trace = generate(TraceShape(weeks=1, seed=3))
    assert trace == sorted(trace, key=lambda r: r.at)

    def count(day: int, start_h: float, end_h: float) -> int:
        start = MONDAY + day * DAY + start_h * 3600
        return sum(1 for r in trace if start <= r.at < start + (end_h - start_h) * 3600)

    tuesday_day, tuesday_night = count(1, 9, 17), count(1, 0, 6)
    saturday_day = count(5, 9, 17)
    assert tuesday_day > 10 * max(tuesday_night, 1)
    assert tuesday_day > 3 * saturday_day
    assert {r.label for r in trace} == {"debian", "debian-large"}
    # The same seed, the same trace.
    assert generate(TraceShape(weeks=1, seed=3)) == trace


def test_a_trace_file_is_read_with_a_header_iso_times_and_durations(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text(
        "time,label,duration\n"
        "1796601700,debian,300\n"
        "# exported from nodepool\n"
        "2026-12-07T00:00:00Z,debian-large\n"
    )
    assert read(path, default_duration=42) == [
        Request(1796601600.0, "debian-large", 42.0),
        Request(1796601700.0, "debian", 300.0),
    ]


def test_bad_rows_are_refused_with_their_line_and_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(
        "time,label\n"
        "1796601700,debian\n"
        "yesterday,debian\n"
        "1796601700,Debian_12\n"
        "1796601700\n"
        "1796601700,debian,-5\n"
        "2026-12-07T00:00:00,debian\n"
    )
    with pytest.raises(TraceError) as caught:
        read(path)
    lines = str(caught.value).splitlines()
    assert lines == [
        f"{path}:3: time 'yesterday' is neither seconds since the epoch nor an ISO 8601 time",
        f"{path}:4: label 'Debian_12' is not a label name (a-z, 0-9, -)",
        f"{path}:5: expected 2 or 3 fields (time,label[,duration]), got 1",
        f"{path}:6: duration '-5' is not a positive number of seconds",
        f"{path}:7: time '2026-12-07T00:00:00' has no time zone (add Z or +00:00)",
    ]


def test_the_replay_counts_waits_and_idle_nodes() -> None:
    model = bench_demand.PoolModel(launch_sigma=0.0, launch_median=40, delete_time=10)
    start = MONDAY + 10 * 3600
    trace = [Request(start + i * 600, "debian", 60.0) for i in range(6)]
    cold = bench_demand.Replay(trace, model, 0, start).run()
    # With nothing warm every job waits one launch.
    assert cold.waits == pytest.approx([40.0] * 6)
    assert cold.ready_s == 0
    warm = bench_demand.Replay(trace, model, 1, start).run()
    assert warm.waits == [0.0] * 6
    # One node always ready, but while its successor launches after each hand-out.
    assert warm.ready_s == pytest.approx(trace[-1].at - start - 5 * 40)
    assert warm.hand_outs == 6 and warm.node_s > warm.ready_s
