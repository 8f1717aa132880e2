"""The reference backend as a separate process on a free port, shared by every client.

One process serves the whole interleaved run, so that the floor, the peer and the
daemon meet the same backend (same latency, same warm-up, same neighbours).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.procs import (
    BenchError,
    base_environment,
    daemon_command,
    process_cpu_seconds,
    stop_group,
)

SYNC_PATH = "/api/v1/sync/start"
START_SECONDS = 20.0
_ANNOUNCE = re.compile(r"reference-backend: Running on http://[^\s:]+:(\d+)")


class ReferenceBackend:
    """`background-sync reference-backend --latency-ms L`, started and stopped by us."""

    def __init__(self, workdir: Path, latency_ms: float) -> None:
        self.latency_ms = latency_ms
        self.log_path = workdir / "backend.stderr.log"
        self.proc: subprocess.Popen[Any] | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def sync_url(self) -> str:
        return self.base_url + SYNC_PATH

    def start(self) -> None:
        cmd = daemon_command("reference-backend", "--host", "127.0.0.1", "--port", "0")
        cmd += ["--latency-ms", f"{self.latency_ms:g}"]
        with self.log_path.open("wb") as err:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=base_environment(),
                start_new_session=True,  # Ctrl-C reaches only the bench; it stops us
            )
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            match = _ANNOUNCE.search(self.log_path.read_text(errors="replace"))
            if match:
                self.port = int(match.group(1))
                self._get("/health")
                return
            if self.proc.poll() is not None:
                text = self.log_path.read_text(errors="replace").strip()[-2000:]
                raise BenchError(f"reference backend exited with {self.proc.returncode}: {text}")
            time.sleep(0.05)
        raise BenchError(f"reference backend announced no port in {START_SECONDS:g}s")

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=30) as response:
            return json.load(response)

    def reset(self) -> None:
        """Forget the counters of the previous client's run."""
        request = urllib.request.Request(self.base_url + "/_control/reset", method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def stats(self, due: int) -> dict[str, Any]:
        """The backend's view of one run: requests, overlaps, calls per user."""
        raw = self._get("/_control/stats")
        calls: dict[str, int] = raw.get("per_user_calls", {})
        return {
            "requests": raw.get("requests"),
            "successes": raw.get("successes"),
            "overlaps": raw.get("overlaps"),
            "max_in_flight": raw.get("max_in_flight"),
            "by_status": raw.get("by_status", {}),
            "users_called": len(calls),
            "users_called_more_than_once": sum(1 for n in calls.values() if n > 1),
            "not_due_users_called": sum(
                1 for user in calls if not (user.isdigit() and 1 <= int(user) <= due)
            ),
        }

    def cpu_seconds(self) -> float | None:
        return None if self.proc is None else process_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
