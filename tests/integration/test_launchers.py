"""The server launchers fail clearly and clean up: a server that dies or never answers is
reported with its name, where it should have answered and its log; nothing is left running."""

from __future__ import annotations

import os
import sys
import time

import pytest

from tests.servers._process import ServerStartError, free_port, http_ok, server_process


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_server_that_exits_is_reported_with_its_log(tmp_path):
    log = tmp_path / "dummy.log"
    cmd = [sys.executable, "-c", "import sys; print('bad config: no such store'); sys.exit(3)"]
    with pytest.raises(ServerStartError) as err:
        with server_process(cmd, name="Dummy server", where="127.0.0.1:1", log_path=log,
                            ready=lambda: False, timeout=30):
            pass
    message = str(err.value)
    assert "Dummy server" in message and "exited with code 3" in message
    assert "127.0.0.1:1" in message and str(log) in message
    assert "bad config: no such store" in message


def test_a_server_that_never_answers_times_out_and_is_killed(tmp_path):
    port = free_port()
    log = tmp_path / "silent.log"
    pids = []
    # Ignores SIGTERM, so only the final SIGKILL of its process group stops it.
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    started = time.monotonic()
    with pytest.raises(ServerStartError) as err:
        with server_process([sys.executable, "-c", code], name="Silent server",
                            where=f"http://127.0.0.1:{port}/health", log_path=log,
                            ready=lambda: pids.append(1) or http_ok(f"http://127.0.0.1:{port}/"),
                            timeout=1.0, stop_timeout=1.0):
            pass
    assert time.monotonic() - started < 15
    message = str(err.value)
    assert "Silent server" in message and "did not answer" in message
    assert f"127.0.0.1:{port}" in message and str(log) in message
    assert pids  # readiness was polled


def test_a_ready_server_is_stopped_by_pid_on_exit(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    with server_process(cmd, name="http.server", where=f"127.0.0.1:{port}",
                        log_path=tmp_path / "http.log", timeout=30,
                        ready=lambda: http_ok(f"http://127.0.0.1:{port}/")) as proc:
        pid = proc.pid
        assert http_ok(f"http://127.0.0.1:{port}/")
    assert proc.returncode is not None and _gone(pid)
    assert not http_ok(f"http://127.0.0.1:{port}/", timeout=0.5)
