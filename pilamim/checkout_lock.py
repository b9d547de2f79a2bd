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
* **One run, many processes, each with its own lock.** The first process of a run takes the
  lock *exclusively* (so it is the only one to claim the checkout), writes who it is and a random
  token into the file and its environment (``PILAMIM_RUN_TOKEN``), then turns its lock into a
  *shared* one. A process that carries the token written in the file belongs to the same run:
  it takes a shared lock of its own (the flow's nested calls, the stage commands DVC starts for
  it, the ranks of one torchrun job, whose token derives from the job's rendezvous). A newcomer
  needs the exclusive lock, which the kernel refuses while any process of the run still holds a
  shared one, so a flow killed on its own leaves the checkout busy until its stage processes
  have stopped writing too. Nothing is handed down: DVC closes inherited descriptors when it
  starts a stage command, and need not know about this lock.
* **Refuse, don't wait.** The second run exits at once with :data:`EXIT_BUSY`; waiting for a
  run of hours behind a silent terminal helps nobody.

Why not the ``filelock`` package (a dependency already, for MLflow's SQLite store): its
``FileLock`` is exclusive only and keeps no holder details beyond a pid in its soft fallback;
its ``ReadWriteLock`` is a SQLite database that cannot turn a write hold into a read hold. The
two ``flock`` modes and a JSON line are all this needs.
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

    The first process of a run claims it; a process carrying the claimant's token (see
    :func:`run_token`) joins that run with a shared lock of its own, also when nested in the
    claimant's own process.
    """
    path = lock_path(root)
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        token = run_token()
        if not _join_or_claim(fd, path, token):
            yield  # joined the run that holds the checkout: its claimant clears the file
            return
        token = token or uuid.uuid4().hex
        _write_holder(fd, path.parent.parent, token)
        _share(fd, path, token)
        previous = os.environ.get(TOKEN_ENV)
        os.environ[TOKEN_ENV] = token  # children started from here inherit it
        try:
            yield
        finally:
            _restore_env(previous)
            os.ftruncate(fd, 0)  # a clean exit leaves no stale holder behind
    finally:
        os.close(fd)  # releases the flock


def _join_or_claim(fd: int, path: Path, token: str | None) -> bool:
    """True: ``fd`` holds the lock exclusively (claim it); False: joined the holder's run with a
    shared lock. Raises CheckoutBusyError when another run holds it.

    A claimant holds the exclusive lock only for the moment it takes to write who it is: wait
    that long for its details (the ranks of a job start together) or for its shared lock.
    """
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        if _try_flock(fd, fcntl.LOCK_EX):
            return True
        holder = read_holder(path)
        ours = bool(holder) and token is not None and holder.get("token") == token
        if holder and not ours:
            raise CheckoutBusyError(busy_message(path, holder))
        if ours and _try_flock(fd, fcntl.LOCK_SH):
            if read_holder(path).get("token") == token:
                return False
            fcntl.flock(fd, fcntl.LOCK_UN)  # another run claimed it meanwhile: refused next
            continue
        if time.monotonic() > deadline:
            raise CheckoutBusyError(busy_message(path, holder))
        time.sleep(0.05)


def _share(fd: int, path: Path, token: str) -> None:
    """Turn the claimant's exclusive lock into a shared one, so its run's processes can join.

    ``flock`` drops the old lock before taking the new one; a newcomer that slips into that gap
    claims the checkout, writes its own token and shares in turn, and is found out here.
    """
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits out such a newcomer's claim (milliseconds)
    holder = read_holder(path)
    if holder.get("token") != token:
        raise CheckoutBusyError(busy_message(path, holder))


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


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


def _gone(holder: dict[str, Any]) -> bool:
    """True when the holder named in the file ran on this host and has exited."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def busy_message(path: Path, holder: dict[str, Any]) -> str:
    """Who holds the checkout and what to do about it (the whole message the user sees)."""
    checkout = path.parent.parent
    advice = ("Nothing to clean up: the lock frees itself when that process exits, even if it "
              f"is killed. Do not delete {path}: a run started after that would not see this one.")
    if not holder:
        return (f"this checkout ({checkout}) is busy: another process holds {path} but has not "
                f"said who it is. Wait for it to finish, then run again. {advice}")
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    if _gone(holder):
        return (f"this checkout ({checkout}) is busy: the run that pid {pid} on host {host} "
                f"started here ({holder.get('started', '?')}) has lost that process, but "
                f"processes of the run (stage commands) still hold {path} and may still "
                f"write. `fuser -v {path}` lists them: wait for them to end, or stop them. "
                f"The lock frees itself when the last one exits.\n"
                f"  command: {holder.get('command', '?')}")
    return (f"this checkout ({checkout}) is busy: another run is using it, one run at a time "
            "(two would write the same outputs).\n"
            f"  pid {pid} on host {host}, started {holder.get('started', '?')}\n"
            f"  command: {holder.get('command', '?')}\n"
            f"Wait for it to finish and run again, or stop it (kill {pid} on {host}) if it "
            f"should not run. {advice}")
