"""One run at a time per checkout, whichever entrance starts it.

Every stage reads and writes relative paths (``params/``, ``data/``, ``models/pretrain/
checkpoint.pt``, ``dvc.lock``) under the working directory, so two runs started in the same
checkout overwrite each other's outputs and the registered version depends on who wrote last.
The checkout is therefore the resolved working directory, and a run holds
``.pilamim/run.lock`` in it for as long as it writes there:

* **An OS lock, not a marker file.** ``fcntl.flock`` belongs to the open file; the kernel drops
  it when the holder exits, however it exits (SIGKILL, out of memory), so a dead run never
  blocks the next one and there is nothing to clean up. The file also carries the holder's pid,
  command line, start time and host, only to tell the next user who is busy.
* **One run, many processes.** The holder puts a random token in the file and in its
  environment (``PILAMIM_RUN_TOKEN``); a process that finds the lock taken but carries the token
  written in the file belongs to the same run and goes on: the flow's own stage calls, its
  isolated probe/finetune processes. The ranks of one torchrun job share a token derived from
  the job (rendezvous id, master address and port), so whichever rank comes first holds the
  lock for all. A ``dvc repro`` started elsewhere does not carry the token: its first stage
  command is refused.
* **Refuse, don't wait.** The second run exits at once with :data:`EXIT_BUSY`; waiting for a
  run of hours behind a silent terminal helps nobody.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

LOCK_FILE = Path(".pilamim") / "run.lock"
TOKEN_ENV = "PILAMIM_RUN_TOKEN"
EXIT_BUSY = 75  # sysexits EX_TEMPFAIL: "try again later", told apart from a failed stage
HOLDER_WAIT_S = 2.0  # how long to wait for a holder that has the lock but not yet said who
_held_fds: list[int] = []  # the lock files this process holds, innermost last


class CheckoutBusyError(RuntimeError):
    """Another run holds this checkout; the message names it and says what to do."""


def lock_path(root: str | Path = ".") -> Path:
    """The lock file of the checkout ``root`` (resolved: two spellings, one checkout)."""
    return Path(root).resolve() / LOCK_FILE


def run_token() -> str | None:
    """The token of the run this process belongs to, if it already belongs to one.

    Inherited from the process that holds the lock, or, under torchrun, the same for every
    rank of the job: its rendezvous id and master address are what the ranks share and what
    two jobs running at once cannot both have.
    """
    inherited = os.environ.get(TOKEN_ENV)
    if inherited:
        return inherited
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if "RANK" in os.environ and addr and port:
        return f"torchrun:{os.environ.get('TORCHELASTIC_RUN_ID', '-')}@{addr}:{port}"
    return None


@contextlib.contextmanager
def hold_checkout(root: str | Path = ".") -> Iterator[None]:
    """Hold the checkout ``root`` for the duration of the block, or raise CheckoutBusyError.

    Re-entrant across the processes of one run: a process carrying the holder's token (see
    :func:`run_token`) passes without taking the lock again.
    """
    path = lock_path(root)
    fd, holder = _lock_or_holder(path)
    if fd is None:
        token = run_token()
        if token is None or holder.get("token") != token:
            raise CheckoutBusyError(busy_message(path, holder))
        yield  # the run that holds the checkout: its holder releases it
        return
    try:
        token = run_token() or uuid.uuid4().hex
        _write_holder(fd, path.parent.parent, token)
        previous = os.environ.get(TOKEN_ENV)
        os.environ[TOKEN_ENV] = token  # children started from here inherit it
        _held_fds.append(fd)
        try:
            yield
        finally:
            _held_fds.remove(fd)
            _restore_env(previous)
            os.ftruncate(fd, 0)  # a clean exit leaves no stale holder behind
    finally:
        os.close(fd)  # releases the flock


def held_lock_fds() -> tuple[int, ...]:
    """The lock files this process holds, for ``subprocess``'s ``pass_fds``.

    A flock belongs to the open file, so a child given the descriptor holds the checkout with
    its parent: if the parent is killed while the child still writes, the checkout stays
    busy until the child ends too, instead of freeing while outputs are still being written.
    """
    return tuple(_held_fds)


def _lock_or_holder(path: Path) -> tuple[int | None, dict[str, Any]]:
    """``(fd, {})`` holding the lock, or ``(None, holder info)`` when another process holds it.

    A holder writes its info right after taking the lock: wait a moment for it (the ranks of a
    job start together), and take the lock if it frees meanwhile.
    """
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd, {}
        except BlockingIOError:
            pass
        except BaseException:
            os.close(fd)
            raise
        holder = read_holder(path)
        if holder or time.monotonic() > deadline:
            os.close(fd)
            return None, holder
        time.sleep(0.05)


def _write_holder(fd: int, checkout: Path, token: str) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(sys.orig_argv), "checkout": str(checkout), "token": token}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def read_holder(path: Path) -> dict[str, Any]:
    """What the lock file says about its holder; ``{}`` while it is empty or half written."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _restore_env(previous: str | None) -> None:
    if previous is None:
        os.environ.pop(TOKEN_ENV, None)
    else:
        os.environ[TOKEN_ENV] = previous


def busy_message(path: Path, holder: dict[str, Any]) -> str:
    """Who holds the checkout and what to do about it (the whole message the user sees)."""
    checkout = path.parent.parent
    advice = ("Nothing to clean up: the lock frees itself when that process exits, even if it "
              f"is killed. Do not delete {path}: a run started after that would not see this one.")
    if not holder:
        return (f"this checkout ({checkout}) is busy: another process holds {path} but has not "
                f"said who it is. Wait for it to finish, then run again. {advice}")
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    return (f"this checkout ({checkout}) is busy: another run is using it, one run at a time "
            "(two would write the same outputs).\n"
            f"  pid {pid} on host {host}, started {holder.get('started', '?')}\n"
            f"  command: {holder.get('command', '?')}\n"
            f"Wait for it to finish and run again, or stop it (kill {pid} on {host}) if it "
            f"should not run. {advice}")
