"""Run a server process for the tests: start it, wait until it answers, stop it by PID.

Shared by the PostgreSQL, MLflow and Prefect launchers. Each server gets its own session
(process group) so that stopping it also stops the helpers it forks (uvicorn workers, ...),
and nothing outlives the test run. Failures name the server, where it should answer and its log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


class ServerStartError(RuntimeError):
    """A test server exited or did not answer in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 30) -> str:
    """The end of a log file, for error messages."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when ``url`` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def clean_env(drop_prefixes: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """This process's environment without variables starting with ``drop_prefixes``, plus extra.

    Servers must not inherit the developer's (or another test's) MLflow/Prefect/AWS settings.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}
    env.update(extra)
    return env


@contextmanager
def server_process(
    cmd: list[str],
    *,
    name: str,
    where: str,
    log_path: Path,
    ready: Callable[[], bool],
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
    stop_signal: int = signal.SIGTERM,
    stop_repeats: int = 1,
    stop_timeout: float = 20.0,
) -> Iterator[subprocess.Popen]:
    """Start ``cmd``, wait until ``ready()`` is true, yield the process, then stop it.

    Stopping sends ``stop_signal`` to the process ``stop_repeats`` times (some servers want
    a second signal), waits, and finally SIGKILLs the whole process group it started.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None, cwd=cwd, user=user,
            start_new_session=True,
        )
    try:
        wait_ready(proc, ready, name=name, where=where, log_path=log_path, timeout=timeout)
        yield proc
    finally:
        stop_process(proc, sig=stop_signal, repeats=stop_repeats, timeout=stop_timeout)


def wait_ready(
    proc: subprocess.Popen,
    ready: Callable[[], bool],
    *,
    name: str,
    where: str,
    log_path: Path,
    timeout: float,
    interval: float = 0.25,
) -> None:
    """Poll ``ready()`` until true; raise :class:`ServerStartError` if the process dies or time
    runs out, naming the server, where it should answer (``where``) and its log file."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerStartError(
                f"{name} (pid {proc.pid}) exited with code {proc.returncode} before it answered "
                f"at {where}. Log {log_path}:\n{log_tail(log_path)}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise ServerStartError(
                f"{name} (pid {proc.pid}) did not answer at {where} within "
                f"{timeout:.0f} s. Log {log_path}:\n{log_tail(log_path)}")
        time.sleep(interval)


def stop_process(
    proc: subprocess.Popen, *, sig: int = signal.SIGTERM, repeats: int = 1, timeout: float = 20.0
) -> None:
    """Signal the process by PID, wait, then SIGKILL its process group (forked helpers too).

    With ``repeats`` > 1 the signal is resent after a short grace (2 s) each time; the last
    signal gets the rest of ``timeout``.
    """
    repeats = max(repeats, 1)
    grace = min(2.0, timeout / repeats)
    waits = [grace] * (repeats - 1) + [timeout - grace * (repeats - 1)]
    for wait in waits:
        if proc.poll() is not None:
            break
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    # The group id is the PID we started (start_new_session); kill what is left of it.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(10)
