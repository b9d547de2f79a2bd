"""Shared fixtures: tiny models and the tiny embedded data set, so every test takes seconds."""

from __future__ import annotations

import os

# One thread per process: tiny models gain nothing from more, and tests that start
# subprocesses (DDP, CLI stages) would otherwise oversubscribe the 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pilamim.config import ModelParams  # noqa: E402
from tests.servers.seaweedfs import S3Server, seaweedfs_s3  # noqa: E402

# Tests own their tool state: no stray MLflow/Prefect/DVC state from the developer's machine.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
torch.set_num_threads(1)


# Session-scoped servers, and the xdist group of every test that uses one (directly or
# through another fixture): under ``pytest -n N --dist loadgroup`` each group runs on one
# worker, so each server starts once, as without xdist; every other test spreads over the
# workers. First match wins: the integration suite's ``s3_server`` comes from ``_topology``.
# One SeaweedFS serves every suite that needs S3 (tests/data, tests/dvc, tests/integration's
# topology), each in its own buckets, so those suites share one group.
SERVER_GROUPS = {
    "seaweedfs": "s3",              # the session's S3 server, and all that builds on it
    "prefect_harness": "prefect",   # tests/flows: a temporary Prefect server
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the marks into "@group" ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        group = next((g for name, g in SERVER_GROUPS.items() if name in used), None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    # Slow tests first (a stable sort keeps every module's and group's own order): xdist hands
    # out the server groups first, then single tests in this order, so a minutes-long test no
    # longer starts last while the other worker sits idle.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


_UNGROUPED: set[str] = set()


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Notice when loadgroup stopped grouping: every group would then set up its servers once
    per worker, racing on the same state, and the suite would only get slower."""
    if getattr(session.config.option, "loadgroup", False):
        _UNGROUPED.update(item.nodeid for item in session.items
                          if item.get_closest_marker("xdist_group") and "@" not in item.nodeid)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.nodeid in _UNGROUPED:  # before its fixtures start any server
        pytest.fail("--dist loadgroup is not grouping: this pytest/pytest-xdist pair ignores "
                    "xdist_group (pytest-xdist#1386); install the dev extra's pins "
                    "(pip install -e '.[dev]')", pytrace=False)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> S3Server:
    """The one real S3 server of the session (SeaweedFS on loopback); every user makes its own
    buckets (tests/data: pilamim-*, tests/dvc: images + dvc-store, the topology: pilamim-mlflow
    + pilamim-data)."""
    with seaweedfs_s3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def micro_model_params(**changes) -> ModelParams:
    base = dict(size="micro", depth=None, img_size=16, patch_size=4, decoder_depth=1,
                decoder_width=16, decoder_heads=2)
    return ModelParams(**{**base, **changes})


@pytest.fixture
def micro_params() -> ModelParams:
    return micro_model_params()


@pytest.fixture(scope="session", autouse=True)
def _mlflow_store_outside_the_checkout(tmp_path_factory):
    """Stage commands a test starts without a store of its own would track into the current
    folder's ``./mlflow.db``, i.e. the checkout, growing it on every run (and tracking into a
    developer's own MLFLOW_TRACKING_URI would be worse). Each worker gets a private store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.getbasetemp()}/mlflow.db"
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> str:
    """The embedded data set, 30 images per class (210 train / 30 val / 60 test), prepared once."""
    from pilamim.config import DataParams
    from pilamim.data.prepare import prepare

    root = tmp_path_factory.mktemp("tiny-data")
    params = DataParams(raw_dir=str(root / "raw"), out_dir=str(root / "prepared"),
                        max_images_per_class=30)
    prepare(params)
    return params.out_dir


def micro_run_params(workdir, data_dir: str, model: dict | None = None, **pretrain):
    """Params for a seconds-long micro pretraining run writing under ``workdir``."""
    from pilamim.config import Params, PretrainParams

    pre = dict(data_dir=data_dir, out_dir=str(workdir / "models" / "pretrain"),
               metrics_path=str(workdir / "metrics" / "pretrain.json"),
               plots_path=str(workdir / "plots" / "pretrain.csv"),
               knn_plots_path=str(workdir / "plots" / "pretrain_knn.csv"), epochs=2, batch_size=16,
               lr=1e-3, warmup_epochs=0.5, log_every_steps=1, checkpoint_every_steps=5,
               figure_every_epochs=1, device="cpu")
    return Params(model=micro_model_params(**(model or {})),
                  pretrain=PretrainParams(**{**pre, **pretrain}))
