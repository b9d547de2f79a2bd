"""Which stage failures are worth a retry: network, server and lock errors, not bugs.

:func:`retry_transient` is the Prefect ``retry_condition_fn`` of
:func:`pilamim_flows.pipeline.run_stage`.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Any

from pilamim.config import ParamsError

_TRANSIENT_MESSAGES = ("database is locked", "unable to acquire lock", "temporarily unavailable",
                       "connection reset", "connection refused", "connection aborted",
                       "max retries exceeded", "timed out")


def _transient_types() -> tuple[type[BaseException], ...]:
    from pilamim.tracking.server import TrackingUnavailable

    types: list[type[BaseException]] = [TrackingUnavailable, ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        import requests

        types += [requests.ConnectionError, requests.Timeout]
    with contextlib.suppress(ImportError):
        import botocore.exceptions as boto

        types += [boto.EndpointConnectionError, boto.ConnectTimeoutError,
                  boto.ReadTimeoutError, boto.ConnectionClosedError]
    with contextlib.suppress(ImportError):
        import urllib3.exceptions as u3

        types += [u3.NewConnectionError, u3.MaxRetryError, u3.TimeoutError]
    with contextlib.suppress(ImportError):
        from dvc.lock import LockError

        types.append(LockError)
    return tuple(types)


def _permanent_types() -> tuple[type[BaseException], ...]:
    from pilamim.stages.runner import MissingInputError

    return ParamsError, MissingInputError, ValueError, TypeError, KeyError


def exception_chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_transient(err: BaseException) -> bool:
    """True when retrying the stage may succeed: the error (or its cause) is about the network,
    a server or a lock, not about params, inputs or code.

    The error itself decides first: a ParamsError or MissingInputError is permanent even when
    raised while handling a network error.
    """
    if isinstance(err, _permanent_types()) and not isinstance(err, _transient_types()):
        return False
    transient = _transient_types()
    for link in exception_chain(err):
        if isinstance(link, transient):
            return True
        # MLflow wraps store and HTTP failures in MlflowException; SQLite reports its lock as
        # an OperationalError: only their message tells a lock or an outage from a bug.
        wrapper = type(link).__name__ == "MlflowException"
        if wrapper or isinstance(link, sqlite3.OperationalError | RuntimeError | OSError):
            text = str(link).lower()
            if any(m in text for m in _TRANSIENT_MESSAGES):
                return True
    return False


def retry_transient(task_: Any, task_run_: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed stage only when :func:`is_transient`."""
    try:
        state.result()
    except Exception as err:  # noqa: BLE001 - classify whatever the stage raised
        return is_transient(err)
    return False
