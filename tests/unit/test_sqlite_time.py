"""last_sync written to SQLite text columns keeps the exact text of its storage form."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy.dialects import sqlite

from daemon.schema import Storage, _SqliteTime


def test_text_storage_is_strftimes_text_for_every_year() -> None:
    dialect = sqlite.dialect()
    text = _SqliteTime(Storage.TEXT)
    iso = _SqliteTime(Storage.ISO8601, suffix="Z")
    rng = random.Random(3)
    for _ in range(2000):
        value = datetime(1, 1, 1) + timedelta(seconds=rng.uniform(0, 3e11))
        value = value.replace(microsecond=rng.choice([0, rng.randrange(10**6)]))
        aware = value.replace(tzinfo=rng.choice([UTC, timezone(timedelta(hours=3))]))
        utc = aware.astimezone(UTC).replace(tzinfo=None)
        assert text.process_bind_param(aware, dialect) == utc.strftime("%Y-%m-%d %H:%M:%S.%f")
        assert iso.process_bind_param(aware, dialect) == utc.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"
