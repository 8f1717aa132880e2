"""`status --user` and `retry` as an operator runs them: the real CLI on a real SQLite file.

A real `once` against the reference backend leaves a user that always fails quarantined;
the commands are `python -m daemon ...` subprocesses, and what is checked is their exit
status and output, the database, and what the backend received.
"""

from __future__ import annotations

import getpass
import json
import socket

from tests.acceptance.conftest import Backend, Harness, json_lines


def _calls(backend: Backend, user: str) -> int:
    return int(backend.stats()["per_user_calls"].get(user, 0))


def test_a_quarantined_user_is_shown_then_released_by_retry_and_synced_by_the_next_once(
    harness: Harness,
) -> None:
    db = harness.database(users=5)
    backend = harness.start_backend(latency_ms=5, fail_users=frozenset({"3"}))
    env = harness.env(backend, SYNC_MAX_RETRIES=0, SYNC_QUARANTINE_AFTER=1)
    assert harness.cli("once", env=env).returncode == 1  # user 3 failed

    shown = harness.cli("status", "--user", "3", env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("user 3: QUARANTINED since ")
    assert "HTTP 500" in shown.stdout and "retry requested: never" in shown.stdout
    data = json.loads(harness.cli("status", "--user", "3", "--json", env=env).stdout)
    assert (data["state"], data["consecutive_failures"]) == ("quarantined", 1)
    assert data["quarantined_since"] == data["attempts"][0]["finished_at"]
    assert data["attempts"][0]["http_status"] == 500
    assert data["next_attempt_in_s"] > 3600  # only probed a day later

    backend.set_faults()  # the backend recovers
    assert harness.cli("once", env=env).returncode == 0
    assert _calls(backend, "3") == 1  # still quarantined: not called
    assert db.last_sync()[3] is None

    retried = harness.cli("retry", "3", "99", env=env)
    assert retried.returncode == 67, retried.stdout + retried.stderr  # 99 is not a user
    assert "released 1 user(s): 3" in retried.stdout
    assert "not in the users table: 99" in retried.stdout
    operator = f"{getpass.getuser()}@{socket.gethostname()}"
    [logged] = [e for e in json_lines(retried.stdout) if e.get("event") == "users_retried"]
    assert (logged["by"], logged["count"], logged["unknown"]) == (operator, 1, 1)
    data = json.loads(harness.cli("status", "--user", "3", "--json", env=env).stdout)
    assert (data["state"], data["retry_requested_by"]) == ("due", operator)

    assert harness.cli("once", env=env).returncode == 0
    assert _calls(backend, "3") == 2
    assert db.last_sync()[3] is not None
    assert harness.cli("status", "--user", "3", env=env).stdout.startswith("user 3: fresh")


def test_status_user_of_an_unknown_id_exits_67_and_retry_now_while_paused_exits_3(
    harness: Harness,
) -> None:
    db = harness.database(users=2)
    backend = harness.start_backend(latency_ms=5, fail_users=frozenset({"2"}))
    env = harness.env(backend, SYNC_MAX_RETRIES=0, SYNC_QUARANTINE_AFTER=1)
    assert harness.cli("once", env=env).returncode == 1

    unknown = harness.cli("status", "--user", "77", env=env)
    assert unknown.returncode == 67
    assert unknown.stdout.startswith("user 77: NOT IN THE USERS TABLE")

    assert harness.cli("pause", env=env).returncode == 0
    paused = harness.cli("retry", "--quarantined", "--now", env=env)
    assert paused.returncode == 3, paused.stdout + paused.stderr
    assert "released 1 quarantined user(s): 2" in paused.stdout
    assert "no cycle requested" in paused.stderr
    assert db.query("SELECT force_requested_at FROM sync_control") == [(None,)]  # not forced
