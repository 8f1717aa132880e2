"""The daemon's log output: INFO lines of the event loop go out together, warnings at once."""

from __future__ import annotations

import asyncio
import errno
import gc
import io
import json
import os
import threading

from daemon import logs, logsink
from daemon.logsink import BatchedLines


class CountingFile(io.StringIO):
    """A stdout that counts its writes (each is one system call on a real stdout)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_info_lines_of_the_event_loop_go_out_in_one_write_within_the_gather_time() -> None:
    out = CountingFile()
    sink = BatchedLines(out, seconds=0.02)

    async def main() -> tuple[str, str]:
        for n in range(100):
            sink.info(f"line {n}")
        before = out.getvalue()
        await asyncio.sleep(0.1)
        return before, out.getvalue()

    before, after = asyncio.run(main())
    assert before == ""
    assert after.splitlines() == [f"line {n}" for n in range(100)]
    assert out.writes == 1


def test_a_warning_writes_the_gathered_lines_and_itself_at_once_in_order() -> None:
    out = CountingFile()
    sink = BatchedLines(out, seconds=60)

    async def main() -> str:
        sink.info("synced 1")
        sink.info("synced 2")
        sink.warning("failed 3")
        return out.getvalue()

    assert asyncio.run(main()).splitlines() == ["synced 1", "synced 2", "failed 3"]


def test_lines_from_a_thread_without_an_event_loop_are_written_at_once() -> None:
    out = CountingFile()
    sink = BatchedLines(out, seconds=60)
    sink.info("no loop here")
    worker = threading.Thread(target=sink.info, args=("from the database thread",))
    worker.start()
    worker.join()
    assert out.getvalue().splitlines() == ["no loop here", "from the database thread"]


def test_a_full_batch_is_written_without_waiting_for_the_timer() -> None:
    out = CountingFile()
    sink = BatchedLines(out, seconds=60, chars=100)

    async def main() -> str:
        for n in range(20):
            sink.info(f"line {n:02d}")  # 7 characters each: 15 fill a batch
        return out.getvalue()

    assert out.writes == 0
    written = asyncio.run(main()).splitlines()
    assert written == [f"line {n:02d}" for n in range(15)]
    assert out.writes == 1


def test_a_timer_left_by_an_ended_loop_does_not_hold_the_next_loops_lines() -> None:
    out = CountingFile()
    sink = BatchedLines(out, seconds=0.02)

    async def log_and_leave(text: str) -> None:
        sink.info(text)  # the loop ends before the timer fires

    async def log_and_wait(text: str) -> None:
        sink.info(text)
        await asyncio.sleep(0.1)

    asyncio.run(log_and_leave("first loop"))
    asyncio.run(log_and_wait("second loop"))
    assert out.getvalue().splitlines() == ["first loop", "second loop"]


def test_the_daemons_json_lines_reach_stdout_at_exit_and_reconfiguring() -> None:
    """`logs.flush` runs at exit; configuring again (SIGHUP) flushes the old output."""
    out = io.StringIO()
    logs.configure("INFO", "json", stream=out, gather=True)
    try:

        async def main() -> None:
            logs.get_logger(run_id="r1").info("user_synced", user_id=7)

        asyncio.run(main())
        assert out.getvalue() == ""
        logs.flush()
        assert json.loads(out.getvalue())["event"] == "user_synced"
        asyncio.run(main())
        logs.configure("INFO", "json", stream=io.StringIO())  # gather kept: None
        assert len(out.getvalue().splitlines()) == 2
    finally:
        logs.configure("INFO", "json", stream=io.StringIO(), gather=False)


def test_other_commands_and_the_console_write_every_line_at_once() -> None:
    out = io.StringIO()
    logs.configure("INFO", "json", stream=out, gather=False)

    async def main() -> str:
        logs.get_logger().info("migrated")
        return out.getvalue()

    assert "migrated" in asyncio.run(main())
    console = io.StringIO()
    logs.configure("INFO", "console", stream=console, gather=True)
    try:
        assert "migrated" in asyncio.run(_log_to(console))
    finally:
        logs.configure("INFO", "json", stream=io.StringIO(), gather=False)


async def _log_to(out: io.StringIO) -> str:
    logs.get_logger().info("migrated")
    return out.getvalue()


def test_a_logger_bound_before_a_reload_still_has_its_lines_flushed_at_exit() -> None:
    """SIGHUP reconfigures; the cycle's logger, bound before, keeps writing to the same sink."""
    out = io.StringIO()
    logs.configure("INFO", "json", stream=out, gather=True)
    try:
        bound_before = logs.get_logger(run_id="r1")
        logs.configure("WARNING", "json", stream=out)  # a reload, same stdout

        async def main() -> None:
            bound_before.info("user_synced", user_id=7)

        asyncio.run(main())
        logs.flush()  # what exit runs
        assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == [
            "user_synced"
        ]
    finally:
        logs.configure("INFO", "json", stream=io.StringIO(), gather=False)


def test_a_write_to_a_pipe_nobody_reads_loses_those_lines_and_nothing_else() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader went away (`once | head -1`, a closed journal stream)
    with open(write_end, "w") as out:
        sink = BatchedLines(out, seconds=60)

        async def cycle() -> None:
            sink.info("synced 1")  # gathered
            sink.warning("failed 2")  # writes both, fails: no exception reaches the caller

        asyncio.run(cycle())
        assert sink.lines_lost == 2
        # The stream now goes to /dev/null: later lines cost nothing and raise nothing.
        sink.warning("failed 3")
        sink.flush()
        assert sink.lines_lost == 2
        assert os.readlink(f"/proc/self/fd/{out.fileno()}") == os.devnull


class FullDisk(io.StringIO):
    """A redirected stdout whose disk is full until `room` is set."""

    room = False

    def write(self, text: str) -> int:
        if not self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(text)


def test_a_full_disk_drops_the_lines_it_could_not_take_and_later_ones_get_through() -> None:
    out = FullDisk()
    sink = BatchedLines(out, seconds=60)
    sink.warning("lost 1")
    sink.error("lost 2")
    assert sink.lines_lost == 2
    out.room = True
    sink.warning("kept 3")
    assert out.getvalue().splitlines() == ["kept 3"]
    assert logsink.lines_lost() >= 0  # the metric's source reads every sink in use


def test_the_daemons_console_lines_are_written_at_once_and_a_failed_write_is_not_raised() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w") as out:
        logs.configure("INFO", "console", stream=out, gather=True)
        try:
            before = logsink.lines_lost()
            logs.get_logger().warning("user_sync_failed", user_id=3)  # no exception
            logs.get_logger().info("user_synced", user_id=4)  # to /dev/null now
            assert logsink.lines_lost() == before + 1
        finally:
            logs.configure("INFO", "json", stream=io.StringIO(), gather=False)


def test_the_count_of_lost_lines_never_falls_when_a_reload_replaces_the_sink() -> None:
    """It is a Prometheus counter: a sink that lost lines and is then dropped keeps them."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w") as out:
        logs.configure("INFO", "json", stream=out, gather=True)
        try:
            before = logsink.lines_lost()
            logs.get_logger().warning("user_sync_failed", user_id=3)
            assert logsink.lines_lost() == before + 1
            logs.configure("INFO", "console", stream=out)  # a reload to another form
            gc.collect()
            assert logsink.lines_lost() == before + 1
        finally:
            logs.configure("INFO", "json", stream=io.StringIO(), gather=False)
