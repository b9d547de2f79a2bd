"""One temporary git + DVC repo holding the real ``dvc.yaml``, reproduced once for all DVC tests.

The repo gets the project's ``dvc.yaml``, ``.gitignore``, ``.dvcignore`` and a copy of the
``pilamim`` sources (the stages' code deps; the commands themselves run the installed
``pilamim``), tiny params, and a real SeaweedFS S3 server as its data source: 120 Fashion-MNIST
PNGs under ``s3://images/fmnist`` (``data/raw`` holds their inventory) keep every stage to
seconds. MLflow writes to a SQLite file in the temp dir.

Tests share the repo in file order and each leaves it up to date (``dvc status`` clean).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pilamim.config import Params
from pilamim.params_files import dump_params
from tests.servers.seaweedfs import S3Server

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
STAGES = ("fetch", "prepare", "pretrain", "probe", "finetune", "register")
IMAGES_BUCKET, IMAGES_PREFIX = "images", "fmnist"
IMAGES_PER_CLASS = 12
DVC_TIMEOUT_S = 600


@dataclass
class DvcRepo:
    """The temporary repo, the environment its commands run with, and the first repro's log."""

    root: Path
    env: dict[str, str]
    s3: S3Server
    first_repro: str = ""

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command (``dvc``, ``git``, ...) in the repo; fail with its output if it fails."""
        done = subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=DVC_TIMEOUT_S)
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(args)} exited {done.returncode}:\n"
                        f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
        return done

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(str(VENV_BIN / "dvc"), *args, check=check)

    def dvc_json(self, *args: str):
        return json.loads(self.dvc(*args, "--json").stdout)


def tiny_params(source: str) -> Params:
    """Seconds-long stages (see tests/test_cli_stages.py) on the S3 images; gate floor 0."""
    p = Params()
    p.data.source = source
    p.model = p.model.model_copy(update=dict(
        size="micro", depth=None, img_size=16, decoder_depth=1, decoder_width=16,
        decoder_heads=2))
    p.pretrain.epochs, p.pretrain.batch_size, p.pretrain.lr = 1, 16, 1e-3
    p.pretrain.warmup_epochs, p.pretrain.log_every_steps = 0, 1
    p.probe.warmup_epochs, p.probe.epochs, p.probe.batch_size, p.probe.base_lr = 1, 5, 16, 100.0
    p.finetune.warmup_epochs, p.finetune.epochs, p.finetune.batch_size = 0, 1, 32
    p.register.floor = 0.0
    return p


def upload_images(s3: S3Server) -> None:
    """A few bundled Fashion-MNIST images per class as ``<class>/<n>.png`` objects."""
    import numpy as np

    from pilamim.data.embedded import SUBSET_PATH
    from pilamim.data.sources import encode_gray_png

    client = s3.client()
    client.create_bucket(Bucket=IMAGES_BUCKET)
    with np.load(SUBSET_PATH) as z:
        classes, images, labels = list(z["classes"]), z["train_images"], z["train_labels"]
    for index, name in enumerate(classes):
        for n, i in enumerate(np.flatnonzero(labels == index)[:IMAGES_PER_CLASS]):
            client.put_object(Bucket=IMAGES_BUCKET, Key=f"{IMAGES_PREFIX}/{name}/{n:03d}.png",
                              Body=encode_gray_png(images[i]))


def make_repo(root: Path, s3: S3Server) -> DvcRepo:
    root.mkdir(parents=True)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO_ROOT / name, root / name)
    shutil.copytree(REPO_ROOT / "pilamim", root / "pilamim",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dump_params(tiny_params(f"s3://{IMAGES_BUCKET}/{IMAGES_PREFIX}"), root / "params")
    config = root.parent / "dvc-config"
    env = {**os.environ, **s3.env(),
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root.parent / 'mlflow.db'}",
           # no DVC or git settings from the machine running the tests
           "DVC_NO_ANALYTICS": "1", "DVC_GLOBAL_CONFIG_DIR": str(config / "global"),
           "DVC_SYSTEM_CONFIG_DIR": str(config / "system"),
           "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    for key in ("MLFLOW_RUN_ID", "PILAMIM_PARENT_RUN_ID", "PILAMIM_PIPELINE_ID"):
        env.pop(key, None)
    repo = DvcRepo(root, env, s3)
    repo.run("git", "init", "-q", "-b", "main")
    repo.run("git", "config", "user.name", "pilamim tests")
    repo.run("git", "config", "user.email", "tests@pilamim.invalid")
    repo.dvc("init", "-q")
    repo.dvc("config", "core.analytics", "false")
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-q", "-m", "pipeline")
    return repo


@pytest.fixture(scope="session")
def s3_images(seaweedfs: S3Server) -> S3Server:
    """The session's S3 server (tests/conftest.py) holding the images the repo's source reads."""
    upload_images(seaweedfs)
    return seaweedfs


@pytest.fixture(scope="session")
def dvc_repo(tmp_path_factory, s3_images) -> DvcRepo:
    """The repo after one ``dvc repro`` (the first test asserts what that run did)."""
    repo = make_repo(tmp_path_factory.mktemp("dvc") / "repo", s3_images)
    done = repo.dvc("repro")
    repo.first_repro = done.stdout + done.stderr
    return repo


def read_tree(root: Path, *paths: str) -> dict[str, bytes]:
    """Every file under ``paths`` (relative to ``root``) -> its bytes, to compare trees."""
    files = {}
    for top in paths:
        for path in sorted((root / top).rglob("*")):
            if path.is_file():
                files[path.relative_to(root).as_posix()] = path.read_bytes()
    return files
