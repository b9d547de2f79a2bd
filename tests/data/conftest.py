"""Fixtures for the data tests: the fetched embedded set and a real S3 server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pilamim.config import DataParams
from pilamim.data.sources import materialize
from tests.servers.seaweedfs import S3Server


@pytest.fixture
def s3_server(seaweedfs: S3Server) -> S3Server:
    """The session's real SeaweedFS S3 server (tests/conftest.py)."""
    return seaweedfs


@pytest.fixture
def s3_env(s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point boto3 at ``s3_server`` through the environment only, as a user would."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The bundled subset fetched once per session (an inventory of 12,000 PNGs, ~1 s)."""
    raw_dir = tmp_path_factory.mktemp("embedded") / "raw"
    params = DataParams(raw_dir=str(raw_dir))
    start = time.perf_counter()
    root = materialize(params)
    return {"raw_dir": raw_dir, "root": root, "seconds": time.perf_counter() - start}
