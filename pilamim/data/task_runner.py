"""Where ``prepare``'s shard tasks run: in this process, in local processes, or on a Dask
cluster (``data.dask_scheduler``).

The pool and the cluster are both a :class:`concurrent.futures.Executor` (Dask's
``Client.get_executor``), so one ``as_completed`` loop serves both, and no code that decides
what a shard holds knows where it ran: the shards cannot depend on it.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

from pilamim.data.errors import DataError

if TYPE_CHECKING:
    from distributed import Client

T = TypeVar("T")
R = TypeVar("R")

CONNECT_TIMEOUT_S = 30.0  # a scheduler that does not answer within this is an error


@contextmanager
def task_executor(scheduler: str | None, processes: int) -> Iterator[Executor | None]:
    """The executor to run tasks on, or None to run them in this process.

    With ``scheduler`` (``tcp://host:port``) the tasks go to that Dask cluster whatever
    ``processes`` says; the connection is closed when the block ends, however it ends.
    Otherwise ``processes`` > 1 starts a local pool of spawned processes (no inherited
    threads or locks).
    """
    if scheduler:
        with _dask_client(scheduler) as client:
            yield client.get_executor(pure=False)  # pure=False: no hashing of the arguments
    elif processes > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(processes, mp_context=context) as pool:
            yield pool
    else:
        yield None


def run_each(fn: Callable[[T], R], tasks: list[T],
             executor: Executor | None) -> Iterator[tuple[T, R]]:
    """``(task, fn(task))`` for every task, in the order they finish. A task's exception is
    raised here as it was raised there; the tasks not yet started are then cancelled."""
    if executor is None:
        for task in tasks:
            yield task, fn(task)
        return
    futures: dict[Future[R], T] = {executor.submit(fn, task): task for task in tasks}
    try:
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        for future in futures:
            future.cancel()


@contextmanager
def _dask_client(address: str) -> Iterator[Client]:
    from distributed import Client

    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, ValueError) as err:  # OSError: no answer in time; ValueError: bad address
        raise DataError(f"cannot reach the Dask scheduler at {address!r} "
                        f"(data.dask_scheduler): {err}. Start it (`dask scheduler`), fix the "
                        "address, or set data.dask_scheduler: null to use local processes"
                        ) from err
    with client:
        yield client
