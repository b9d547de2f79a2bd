"""Start a real PostgreSQL server (Debian's ``postgresql`` package) on loopback for tests.

``initdb`` makes a throwaway cluster, the ``postgres`` server runs in the foreground as our
child (so we hold its PID) on a free 127.0.0.1 port with its unix socket in the temp dir,
and a database is created for the caller. PostgreSQL refuses to run as root: when the tests
run as root, the cluster is owned by the ``postgres`` system account (created by the Debian
package) and lives in its own 0700 temp dir, because pytest's temp dirs are not reachable
for other users.

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.servers._process import ServerStartError, free_port, server_process

START_TIMEOUT_S = 60.0
SUPERUSER = "postgres"


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

    @property
    def url(self) -> str:
        """SQLAlchemy URL naming the psycopg (3) driver, so no SQLAlchemy default is assumed."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{self.database}"

    @property
    def asyncpg_url(self) -> str:
        """The same database for asyncpg clients (Prefect's PostgreSQL driver)."""
        return f"postgresql+asyncpg://{self.user}@{self.host}:{self.port}/{self.database}"


def postgres_bindir() -> Path:
    """Directory holding ``initdb`` and ``postgres``: $PILAMIM_PG_BINDIR, PATH, or the newest
    /usr/lib/postgresql/<version>/bin (Debian keeps them off PATH)."""
    if os.environ.get("PILAMIM_PG_BINDIR"):
        return Path(os.environ["PILAMIM_PG_BINDIR"])
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # Debian links a few tools; the rest sit beside
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    raise ServerStartError(
        "PostgreSQL binaries not found: install them with `apt-get install -y postgresql` "
        "(or set PILAMIM_PG_BINDIR to the directory holding initdb and postgres).")


def _run_as() -> str | None:
    """The account that owns the cluster: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SUPERUSER)
    except KeyError as err:
        raise ServerStartError(
            "PostgreSQL refuses to run as root and there is no 'postgres' account to run it "
            "as; install the Debian `postgresql` package (it creates one) or run as non-root."
        ) from err
    return SUPERUSER


@contextmanager
def postgres_server(
    tmp_dir: str | Path, database: str = "pilamim", timeout: float = START_TIMEOUT_S
) -> Iterator[PostgresServer]:
    """Run a throwaway PostgreSQL cluster with one database until the ``with`` block ends."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    bindir = postgres_bindir()
    user = _run_as()
    # Root: a private dir the postgres account owns (pytest's dirs are root-only).
    cluster_root = Path(tempfile.mkdtemp(prefix="pilamim-pg-")) if user else tmp_dir / "pg"
    cluster_root.mkdir(parents=True, exist_ok=True)
    if user:
        shutil.chown(cluster_root, user=user, group=user)
    data_dir = cluster_root / "data"
    log_path = tmp_dir / "postgres.log"
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
                [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-t", "1"],
                capture_output=True, check=False)
            return probe.returncode == 0

        # SIGINT is PostgreSQL's "fast" shutdown: it does not wait for clients to disconnect.
        with server_process(cmd, name="PostgreSQL", where=f"127.0.0.1:{port}",
                            log_path=log_path, ready=ready, timeout=timeout, user=user,
                            cwd=cluster_root, stop_signal=signal.SIGINT) as proc:
            _createdb(bindir, port, database, log_path)
            yield PostgresServer(host="127.0.0.1", port=port, database=database,
                                 user=SUPERUSER, pid=proc.pid, data_dir=data_dir,
                                 log_path=log_path)
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
        print(pg.url)
        input("PostgreSQL running; press Enter to stop ")
