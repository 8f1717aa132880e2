from datetime import UTC, datetime, timedelta

from daemon.ages import ago, span

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def test_a_span_uses_the_largest_unit_that_fits_twice() -> None:
    assert span(5.7) == "5 s"
    assert span(90) == "90 s"
    assert span(180) == "3 min"
    assert span(2 * 3600 + 59) == "2 h"
    assert span(5 * 86400) == "5 d"


def test_no_moment_reads_never_and_a_negative_span_reads_zero() -> None:
    assert span(None) == "never"
    assert span(-3) == "0 s"
    assert ago(None, NOW) == "never"


def test_a_moment_reads_ago_or_in() -> None:
    assert ago(NOW - timedelta(minutes=3), NOW) == "3 min ago"
    assert ago(NOW + timedelta(seconds=40), NOW) == "in 40 s"
