"""prepare() on a real Dask cluster (data.dask_scheduler): the same bytes as local processes,
a killed worker changes nothing, and an unreachable scheduler or a failing task says why."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from distributed import Client, LocalCluster, get_task_stream

from pilamim.config import DataParams
from pilamim.data.errors import DataError
from pilamim.data.prepare import WORK_DIR, _check_visible, prepare
from pilamim.data.shards import ShardTask
from tests.data.helpers import make_tree
from tests.data.test_prepare_sources import check_a_changed_local_image_is_named

# One cluster for the module: its workers pay torch's import once.
pytestmark = pytest.mark.xdist_group("dask")


def _params(embedded: dict, out: Path, **changes) -> DataParams:
    """~2,000 images in ~30 shard tasks per run: enough for a kill to land mid-run."""
    return DataParams(raw_dir=str(embedded["raw_dir"]), out_dir=str(out),
                      max_images_per_class=200, shard_mb=0.05, **changes)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """Two single-threaded worker processes on loopback, each watched by a nanny."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      scheduler_port=0, dashboard_address=":0") as local:
        yield local


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    """The test's own view of the cluster (prepare connects by address, as a user's would)."""
    with Client(cluster.scheduler_address, set_as_default=False) as view:
        yield view


@pytest.fixture(scope="module")
def reference(embedded: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The output of two local processes (also for these few bytes)."""
    out = tmp_path_factory.mktemp("local") / "p"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("pilamim.data.prepare.POOL_MIN_BYTES", 0)
        prepare(_params(embedded, out, workers=2))
    return _tree(out)


def test_a_cluster_writes_the_bytes_of_local_processes(
        embedded: dict, tmp_path: Path, cluster: LocalCluster, client: Client,
        reference: dict[str, bytes]) -> None:
    out = tmp_path / "p"
    with get_task_stream(client) as stream:  # the scheduler's record of who ran what
        prepare(_params(embedded, out, dask_scheduler=cluster.scheduler_address))
    assert _tree(out) == reference
    assert len([f for f in reference if f.endswith(".bin")]) > 10
    shard_tasks = [t for t in stream.data if t["key"].startswith("_task-")]
    assert len(shard_tasks) == len([f for f in reference if f.endswith(".bin")])
    assert {t["worker"] for t in shard_tasks} == set(client.scheduler_info()["workers"])


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_the_bytes_stay(
        embedded: dict, tmp_path: Path, cluster: LocalCluster, client: Client,
        reference: dict[str, bytes]) -> None:
    out = tmp_path / "p"
    pids = client.run(os.getpid)
    tasks = out.parent / WORK_DIR
    with ThreadPoolExecutor(1) as background:
        run = background.submit(prepare, _params(embedded, out,
                                                 dask_scheduler=cluster.scheduler_address))
        victim = None
        deadline = time.monotonic() + 120
        while victim is None:
            assert not run.done(), "prepare finished before a worker could be killed"
            assert time.monotonic() < deadline
            busy = [w for w, keys in client.processing().items() if keys and w in pids]
            if len(list(tasks.glob("*/tasks/*.json"))) >= 2 and busy:
                victim = busy[0]  # it holds a shard task: the scheduler must give it away
            time.sleep(0.005)
        os.kill(pids[victim], signal.SIGKILL)
        run.result(timeout=180)
    assert _tree(out) == reference
    client.wait_for_workers(2, timeout=60)
    assert pids[victim] not in client.run(os.getpid).values()  # the nanny started another


def test_an_unreachable_scheduler_is_named_quickly(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_tree(tmp_path / "imgs", {"a": 3, "b": 3})
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr("pilamim.data.task_runner.CONNECT_TIMEOUT_S", 2.0)
    params = DataParams(source=str(root), raw_dir=str(tmp_path / "raw"),
                        out_dir=str(tmp_path / "out"), dask_scheduler=address)
    start = time.monotonic()
    with pytest.raises(DataError, match="data.dask_scheduler") as err:
        prepare(params)
    assert time.monotonic() - start < 15
    assert address in str(err.value) and "cannot reach the Dask scheduler" in str(err.value)
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_a_failing_task_on_a_worker_says_why(tmp_path: Path, cluster: LocalCluster) -> None:
    check_a_changed_local_image_is_named(tmp_path, dask_scheduler=cluster.scheduler_address)


def test_a_worker_with_two_threads_writes_the_same_bytes(
        embedded: dict, tmp_path: Path, reference: dict[str, bytes]) -> None:
    """litdata names a chunk after a per-process variable: two tasks in the threads of one
    worker must not swap names."""
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp",
                      host="127.0.0.1", scheduler_port=0, dashboard_address=":0") as threads:
        prepare(_params(embedded, tmp_path / "p", dask_scheduler=threads.scheduler_address))
    assert _tree(tmp_path / "p") == reference


def test_a_result_the_client_cannot_see_names_the_shared_filesystem(tmp_path: Path) -> None:
    """What a worker on another machine, writing to its own disk, leaves this machine."""
    task = ShardTask("train", 3, (("a/x.png", "a"),))
    with pytest.raises(DataError, match="filesystem that every Dask worker shares") as err:
        _check_visible(task, tmp_path / "work")
    assert str(tmp_path / "work" / "tasks" / "train-000003.json") in str(err.value)
