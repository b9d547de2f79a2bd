"""The :class:`pilamim.callbacks.Logger` a stage plugs into the library: metrics to MLflow."""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pilamim.tracking.server import brief_error

log = logging.getLogger(__name__)


class MLflowLogger:
    """:class:`pilamim.callbacks.Logger` that batches metrics into few ``log_batch`` calls.

    Metrics are buffered and sent when ``flush_every_s`` has passed since the last send or the
    buffer holds ``max_buffer`` values (MLflow takes at most 1000 per batch), and on
    :meth:`flush`/:meth:`close`. So a training loop may call :meth:`log_metrics` every step
    without waiting on the tracking store. If the store fails mid-run the logger warns once
    and drops further metrics: training output matters more than its curves.
    """

    def __init__(self, run_id: str, client: MlflowClient | None = None, *,
                 flush_every_s: float = 5.0, max_buffer: int = 1000,
                 artifact_dirs: Mapping[str, str] | None = None) -> None:
        self.run_id = run_id
        self.client = client or MlflowClient()
        self.flush_every_s = flush_every_s
        self.max_buffer = min(max_buffer, 1000)
        # File suffix -> artifact sub folder, so figures and JSON land in tidy places.
        self.artifact_dirs = dict(artifact_dirs or {".png": "figures", ".jpg": "figures",
                                                     ".json": "metrics", ".csv": "curves"})
        self._buffer: list[Metric] = []
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._broken = False

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now_ms = int(time.time() * 1000)
        with self._lock:
            if self._broken:
                return
            for key, value in metrics.items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                self._buffer.append(Metric(key=key, value=number, timestamp=now_ms,
                                           step=int(step)))
            due = time.monotonic() - self._last_flush >= self.flush_every_s
            if due or len(self._buffer) >= self.max_buffer:
                self._flush_locked()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if artifact_path is None:
            artifact_path = self.artifact_dirs.get(path.suffix.lower())
        try:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as err:  # noqa: BLE001 - see class docstring
            self._warn(f"could not log artifact {path}: {brief_error(err)}")

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def close(self) -> None:
        self.flush()

    def _flush_locked(self) -> None:
        self._last_flush = time.monotonic()
        while self._buffer and not self._broken:
            chunk, self._buffer = self._buffer[:self.max_buffer], self._buffer[self.max_buffer:]
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as err:  # noqa: BLE001 - see class docstring
                self._broken = True
                self._buffer.clear()
                self._warn(f"MLflow metric logging failed, further metrics of run {self.run_id} "
                           f"are not sent (the stage's CSV/JSON outputs still are): "
                           f"{brief_error(err)}")

    def _warn(self, message: str) -> None:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        log.warning(message)
