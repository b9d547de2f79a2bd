"""S3 on loopback (a real SeaweedFS, started as the tests start it), DVC's remote on it, and
plain boto3 copies of the same bytes to compare DVC's transfers with.

The parent starts the server and hands its endpoint and keys down in the environment
(``AWS_ENDPOINT_URL`` ...), which boto3 and DVC both read; the copies run in child processes
(``--run-step``) like every other step.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.servers.seaweedfs import S3Server, seaweedfs_s3

__all__ = ["S3Server", "seaweedfs_s3", "add_dvc_remote", "copy_with_boto3", "upload_folder",
           "default_jobs"]

MULTIPART_THRESHOLD = 64 * 2**20  # as boto3's s3transfer would for big files; ours are small


def default_jobs() -> int:
    """DVC's default transfer jobs for S3 (``4 x cpu_count``); boto3 gets as many threads."""
    return 4 * (os.cpu_count() or 1)


def add_dvc_remote(project: Path, env: dict[str, str], s3: S3Server, url: str) -> None:
    """A default DVC remote at ``url`` on the loopback server (credentials from env)."""
    dvc = str(Path(env["PATH"].split(os.pathsep)[0]) / "dvc")
    for args in (["remote", "add", "-f", "-d", "bench", url],
                 ["remote", "modify", "bench", "endpointurl", s3.endpoint_url],
                 ["remote", "modify", "bench", "region", s3.region]):
        subprocess.run([dvc, *args], cwd=project, env=env, check=True, capture_output=True)


def _client(threads: int):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(max_pool_connections=threads))


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, use_threads=False)


def _bucket(client, name: str) -> None:
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


def upload_folder(root: Path, bucket: str, prefix: str, threads: int) -> dict[str, Any]:
    """``upload_file`` every file under ``root`` to ``s3://bucket/prefix/<rel>``, on
    ``threads`` threads (one transfer each; boto3 clients are thread-safe)."""
    client, config = _client(threads), _transfer_config()
    _bucket(client, bucket)
    files = sorted(p for p in root.rglob("*") if p.is_file())

    def put(path: Path) -> int:
        key = f"{prefix}/{path.relative_to(root).as_posix()}".lstrip("/")
        client.upload_file(str(path), bucket, key, Config=config)
        return path.stat().st_size

    return _timed(put, files, threads)


def download_prefix(bucket: str, prefix: str, dest: Path, threads: int) -> dict[str, Any]:
    """``download_file`` every object under ``prefix`` into ``dest``, on ``threads`` threads."""
    client, config = _client(threads), _transfer_config()
    keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix) for obj in page.get("Contents", [])]

    def get(key: str) -> int:
        target = dest / key
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target), Config=config)
        return target.stat().st_size

    return _timed(get, keys, threads)


def _timed(move: Callable[[Any], int], items: list, threads: int) -> dict[str, Any]:
    """Run ``move`` (returns the bytes it moved) over ``items`` on ``threads`` threads, timed."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        nbytes = sum(pool.map(move, items))
    seconds = time.perf_counter() - t0
    return {"files": len(items), "mb": nbytes / 1e6, "seconds": seconds,
            "mb_per_s": nbytes / 1e6 / seconds, "files_per_s": len(items) / seconds}


def copy_with_boto3(config: dict[str, Any]) -> dict[str, Any]:
    """Upload the DVC cache's objects (the bytes ``dvc push`` sent) and download them again."""
    threads = config["threads"]
    up = upload_folder(Path(config["cache_dir"]), config["bucket"], "cache", threads)
    down = download_prefix(config["bucket"], "cache", Path(config["download_dir"]), threads)
    return {"threads": threads, "upload": up, "download": down,
            "seconds": up["seconds"] + down["seconds"]}
