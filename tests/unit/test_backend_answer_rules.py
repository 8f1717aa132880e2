"""The rules for what of a backend's answer is usable: pure functions, no network."""

from __future__ import annotations

import pytest
from yarl import URL

from daemon.backend import _json_or_none, _progress_url, _quote

START = URL("https://backend.example/api/v1/sync/start")


@pytest.mark.parametrize(
    ("link", "resolved"),
    [
        ("/api/v1/sync/progress/1", "https://backend.example/api/v1/sync/progress/1"),
        ("progress/2", "https://backend.example/api/v1/sync/progress/2"),
        ("//other.example/p", "https://other.example/p"),
        ("https://other.example:8443/p", "https://other.example:8443/p"),
    ],
)
def test_a_progress_link_is_resolved_against_the_request_url(link: str, resolved: str) -> None:
    assert _progress_url(START, link) == (resolved, "")


@pytest.mark.parametrize(
    ("link", "problem"),
    [
        ("http://[::1", "an invalid progress URL"),
        ("https://backend.example:70000/p", "an invalid progress URL"),
        ("ftp://backend.example/p", "not http(s)"),
        ("mailto:ops@example.com", "not http(s)"),
        ("http://backend.example/p", "downgrades https to http"),
    ],
)
def test_an_unusable_progress_link_is_refused_with_the_reason(link: str, problem: str) -> None:
    url, reason = _progress_url(START, link)
    assert url is None
    assert problem in reason and _quote(link) in reason


def test_an_http_backend_may_point_its_progress_at_https() -> None:
    assert _progress_url(URL("http://b.example/s"), "https://b.example/p")[0] == (
        "https://b.example/p"
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"NaN",
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b"[" * 50_000 + b"]" * 50_000,
        b"\xff{}",
    ],
)
def test_what_strict_json_refuses_is_not_json(raw: bytes) -> None:
    assert _json_or_none(raw) is None


def test_quoting_a_backend_string_escapes_and_clips_it() -> None:
    assert _quote("/a\nb\udc80") == '"/a\\nb\\udc80"'
    assert _quote("x" * 500) == '"' + "x" * 200 + '..."'
