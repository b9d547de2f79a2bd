"""The :class:`pilamim.loggers.Logger` a stage plugs into the library: metrics to MLflow.

Metrics go out through MLflow's asynchronous logging (``log_batch(..., synchronous=False)``):
MLflow's worker threads send them while training goes on. MLflow's queue reports a failed batch
with one ERROR line per batch and forgets it; :class:`MLflowLogger` adds what a run of days
needs on top: one warning per outage, the failed metrics kept and sent again once the store
answers, and a :meth:`MLflowLogger.close` that waits a bounded time.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pilamim.tracking.server import brief_error

log = logging.getLogger(__name__)

MAX_BATCH = 1000                 # MLflow takes at most 1000 metrics per log_batch call
DEFAULT_MAX_HELD = 100_000       # metric values kept for resending during an outage (~20 MB)
DEFAULT_CLOSE_TIMEOUT_S = 30.0   # how long close() waits for the store before giving up
DEFAULT_RETRY_EVERY_S = 5.0      # while the store fails, at most one probe this often
# The logger MLflow's async queue reports failed batches on, one ERROR line each.
MLFLOW_QUEUE_LOGGER = "mlflow.utils.async_logging.async_logging_queue"


class MLflowLogger:
    """:class:`pilamim.loggers.Logger` that sends metrics with MLflow's asynchronous logging.

    :meth:`log_metrics` never waits on the tracking store. A failing store costs no curve and
    stops nothing:

    * **Reported once per outage.** The first failed batch warns, naming the run and the error;
      the first batch that gets through again logs that sending resumed.
    * **Retried, not lost.** Metrics of a batch that failed because the store did not answer
      (connection refused, timeout, 5xx) are kept, at most ``max_held`` values (the oldest go
      first), and sent again once the store answers: MLflow's queue does not retry, and a
      blip would otherwise cut a hole into a curve of days. Resending is harmless: MLflow's
      SQL store skips a metric it already holds (same key, step, timestamp and value). A batch
      the store *answered* with a 4xx (a deleted run, a bad value) is dropped with a warning:
      sending it again would fail the same way.
    * **One probe at a time while the store fails**, at most every ``retry_every_s``.
      Metrics logged meanwhile wait here instead of piling up requests that each sit through
      MLflow's HTTP retries, so :meth:`close` ends within ``close_timeout_s`` and the process
      exit is not held up.

    ``mlflow.flush_async_logging()`` is not used: it has no timeout and waits on every run's
    batches in the process, not only this run's.
    """

    def __init__(self, run_id: str, client: MlflowClient | None = None, *,
                 close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
                 max_held: int = DEFAULT_MAX_HELD,
                 retry_every_s: float = DEFAULT_RETRY_EVERY_S,
                 artifact_dirs: Mapping[str, str] | None = None) -> None:
        self.run_id = run_id
        self.client = client or MlflowClient()
        self.close_timeout_s = close_timeout_s
        self.max_held = max_held
        self.retry_every_s = retry_every_s
        # File suffix -> artifact sub folder, so figures and JSON land in tidy places.
        self.artifact_dirs = dict(artifact_dirs or {".png": "figures", ".jpg": "figures",
                                                     ".json": "metrics", ".csv": "curves"})
        self._lock = threading.Lock()
        self._held: list[Metric] = []          # not yet handed to MLflow, oldest first
        self._in_flight: dict[Future, list[Metric]] = {}
        self._down = False                     # a batch failed and none got through since
        self._next_probe = 0.0                 # monotonic time the next probe may go out
        self._last_error = ""
        self._dropped = 0                      # values given up: over max_held, or rejected
        self._rejection_warned = False
        self._closed = False
        self._quiet = _QuietFailuresOf(run_id)
        logging.getLogger(MLFLOW_QUEUE_LOGGER).addFilter(self._quiet)

    # ------------------------------------------------------------------ Logger protocol

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now_ms = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            try:
                batch.append(Metric(key=key, value=float(value), timestamp=now_ms,
                                    step=int(step)))
            except (TypeError, ValueError):
                continue
        if not batch:
            return
        with self._lock:
            self._hold(batch)
            sent = self._send_held() if self._may_send() else []
        self._watch(sent)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if artifact_path is None:
            artifact_path = self.artifact_dirs.get(path.suffix.lower())
        try:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as err:  # noqa: BLE001 - a stage's files matter more than its records
            self._warn(f"could not log artifact {path}: {brief_error(err)}")

    # ------------------------------------------------------------------ flush and close

    def flush(self, timeout_s: float | None = None) -> bool:
        """Send what is held and wait for what is in flight; True when everything got through.

        Waits at most ``timeout_s`` (default ``close_timeout_s``). While the store fails, one
        last probe is made: a store that came back gets everything, a dead one costs one
        probe's retries, not one per held batch.
        """
        deadline = time.monotonic() + (self.close_timeout_s if timeout_s is None else timeout_s)
        probed = False
        while True:
            with self._lock:
                sent = []
                if not self._in_flight:
                    if not self._held or (self._down and probed):
                        return not self._held
                    sent = self._send_held()
                probed = probed or self._down
                # a finished future may still be in _in_flight until its callback has run
                waiting = [f for f in self._in_flight if not f.done()]
            self._watch(sent)
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if waiting:
                wait(waiting, timeout=left, return_when=FIRST_COMPLETED)
            else:
                time.sleep(0.01)

    def close(self) -> None:
        """Flush (bounded by ``close_timeout_s``) and say which metrics never got through."""
        complete = self.flush()
        with self._lock:
            self._closed = True
            unsent = len(self._held) + sum(len(c) for c in self._in_flight.values())
            dropped = self._dropped
            why = (f"no answer from {self.client.tracking_uri} within "
                   f"{self.close_timeout_s:g} s" if self._in_flight else self._last_error)
        logging.getLogger(MLFLOW_QUEUE_LOGGER).removeFilter(self._quiet)
        if not complete or dropped:
            self._warn(f"{unsent + dropped} metric values of MLflow run {self.run_id} were not "
                       f"recorded ({why}); the stage's CSV/JSON outputs still hold its curves "
                       f"and results")

    # ------------------------------------------------------------------ internals

    def _hold(self, batch: list[Metric], *, first: bool = False) -> None:
        """Keep ``batch`` for sending (``first``: a failed batch goes before newer ones);
        beyond ``max_held`` values the oldest are dropped. Caller holds the lock."""
        if first:
            self._held[:0] = batch
        else:
            self._held.extend(batch)
        extra = len(self._held) - self.max_held
        if extra > 0:
            del self._held[:extra]
            self._dropped += extra

    def _may_send(self) -> bool:
        """While the store fails: only when no probe is out and ``retry_every_s`` has passed.
        Caller holds the lock."""
        if not self._down:
            return True
        return not self._in_flight and time.monotonic() >= self._next_probe

    def _send_held(self) -> list[tuple[Future, list[Metric]]]:
        """Hand held metrics to MLflow's queue: all of them while the store answers, one batch
        (the probe) while it fails. Caller holds the lock; the caller then :meth:`_watch`-es
        the result outside it."""
        if self._closed:
            return []
        sent = []
        while self._held:
            chunk, self._held = self._held[:MAX_BATCH], self._held[MAX_BATCH:]
            future = self._submit(chunk)
            self._in_flight[future] = chunk
            sent.append((future, chunk))
            if self._down:
                break
        return sent

    def _submit(self, chunk: list[Metric]) -> Future:
        """One asynchronous ``log_batch``; a refusal to queue becomes a failed future.

        The returned ``RunOperations`` offers only ``wait()`` (no timeout, errors flattened
        into one message); its future tells a store that did not answer from one that refused.
        """
        try:
            operations = self.client.log_batch(self.run_id, metrics=chunk, synchronous=False)
            return operations._operation_futures[0]  # <= 1000 metrics: one batch, one future
        except Exception as err:  # noqa: BLE001 - handled like any failed batch
            future: Future = Future()
            future.set_exception(err)
            return future

    def _watch(self, sent: list[tuple[Future, list[Metric]]]) -> None:
        """Call :meth:`_done` when each batch ends (at once for one that already has)."""
        for future, chunk in sent:
            future.add_done_callback(lambda f, c=chunk: self._done(f, c))

    def _done(self, future: Future, chunk: list[Metric]) -> None:
        """A batch ended (in one of MLflow's threads): note how, and after a success send what
        was held. After a failure the next :meth:`log_metrics` probes, so a dead store is not
        asked again in a tight loop. After :meth:`close` nothing is sent or reported."""
        error = future.exception()
        with self._lock:
            self._in_flight.pop(future, None)
            if self._closed:  # close() has reported what did not get through
                return
            if error is None:
                resumed = self._note_success()
                warning = None
            else:
                resumed = None
                warning = (self._note_rejection(error, chunk) if _store_answered(error)
                           else self._note_failure(error, chunk))
            sent = self._send_held() if error is None and self._held else []
        self._watch(sent)
        if resumed:
            log.warning(resumed)
        if warning:
            self._warn(warning)

    def _note_success(self) -> str | None:
        """The message that ends an outage, if this success ended one. Caller holds the lock."""
        if not self._down:
            return None
        self._down = False
        return (f"MLflow metric logging to run {self.run_id} resumed; sending "
                f"{len(self._held)} held values")

    def _note_failure(self, error: BaseException, chunk: list[Metric]) -> str | None:
        """Keep the batch for the next probe; the warning, if this failure starts an outage.
        Caller holds the lock."""
        self._hold(chunk, first=True)
        self._last_error = _root_cause(error)
        self._next_probe = time.monotonic() + self.retry_every_s
        if self._down:
            return None
        self._down = True
        return (f"MLflow metric logging to run {self.run_id} at {self.client.tracking_uri} "
                f"failed ({self._last_error}); training goes on, the metrics are kept (up to "
                f"{self.max_held} values) and sent when the tracking store answers again")

    def _note_rejection(self, error: BaseException, chunk: list[Metric]) -> str | None:
        """Drop a batch the store refused; the warning, the first time. Caller holds the
        lock."""
        self._dropped += len(chunk)
        self._last_error = _root_cause(error)
        if self._rejection_warned:
            return None
        self._rejection_warned = True
        return (f"MLflow rejected {len(chunk)} metric values of run {self.run_id}, dropped: "
                f"{self._last_error}")

    def _warn(self, message: str) -> None:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        log.warning(message)


def _root_cause(error: BaseException) -> str:
    """``Type: message`` of the innermost cause: MLflow wraps a refused connection in three
    layers whose messages repeat the URL, and the reason would be cut off behind them."""
    inner, seen = error, {id(error)}
    while (nested := inner.__cause__ or inner.__context__) is not None and id(nested) not in seen:
        inner = nested
        seen.add(id(inner))
    return f"{type(inner).__name__}: {brief_error(inner)}"


def _store_answered(error: BaseException) -> bool:
    """True when the store answered and refused (4xx but 429): sending again cannot help.

    No answer at all (connection refused, timeout) and 5xx/429 after MLflow's HTTP retries
    arrive as an :class:`MlflowException` with a 5xx code, or as a non-MLflow error.
    """
    if not isinstance(error, MlflowException):
        return False
    status = error.get_http_status_code()
    return 400 <= status < 500 and status != 429


class _QuietFailuresOf(logging.Filter):
    """Drops MLflow's per-batch ERROR line for one run: :class:`MLflowLogger` reports the
    run's failures itself, once per outage instead of once per batch."""

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.prefix = f"Run Id {run_id}: Failed to log run data"

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)
