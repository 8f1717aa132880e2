"""What of a backend's answer is trusted and logged: pure parsing, no network."""

from __future__ import annotations

from daemon.backend import _counts, _total


def test_only_a_few_numeric_top_level_fields_of_a_success_body_are_logged() -> None:
    body = {"status": "synced", "synced_items": 12, "took_s": 0.4, "ok": True, "nested": {"a": 1}}
    assert _counts(body) == {"synced_items": 12, "took_s": 0.4}
    assert len(_counts({f"k{i}": i for i in range(100)}) or {}) == 10
    assert _counts(["not", "an", "object"]) is None
    assert _counts({"status": "synced"}) is None


def test_the_announced_size_of_background_work_is_read_from_total_or_expected_items() -> None:
    assert _total({"in_progress": True, "progress": 3, "total": 40}) == 40
    assert _total({"status": "started", "expected_items": 7}) == 7
    assert _total({"total": -1}) is None
    assert _total({"total": True}) is None
    assert _total("garbage") is None
