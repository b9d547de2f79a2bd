"""How long-running library code reports progress without knowing who listens.

The library (training, evaluation) calls a :class:`Logger`; stages plug MLflow in, tests plug
in a list, and :class:`CSVLogger` writes the curves DVC plots read.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol


class Logger(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar metrics at a step (global optimizer step or epoch, per caller)."""

    def log_artifact(self, path: Path) -> None:
        """Record a produced file (figure, JSON)."""


class NullLogger:
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass


class MemoryLogger:
    """Keeps everything in lists; for tests and for summaries at the end of a run."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.artifacts: list[Path] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: Path) -> None:
        self.artifacts.append(Path(path))

    def series(self, key: str) -> list[float]:
        return [m[key] for _, m in self.metrics if key in m]


class CSVLogger:
    """Appends rows with a fixed set of columns (the ones DVC plots draw) to a CSV file.

    Metric ``prefix + column`` fills ``column``. The file is started fresh unless
    ``resume_from_step`` (the checkpoint's step) is set; then rows past that step are dropped:
    the checkpoint holds the work up to and including its step, so a resumed run logs from the
    next step on and neither loses nor duplicates a row.
    """

    def __init__(self, path: str | Path, columns: Iterable[str], step_name: str = "step",
                 resume_from_step: int | None = None, prefix: str = "") -> None:
        self.path = Path(path)
        self.prefix = prefix
        self.columns = [step_name, *columns]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, str]] = []
        if resume_from_step is not None and self.path.exists():
            with open(self.path, newline="") as handle:
                kept = [r for r in csv.DictReader(handle) if int(r[step_name]) <= resume_from_step]
        with open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(kept)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = {c: metrics.get(self.prefix + c, "") for c in self.columns[1:]}
        if values[self.columns[1]] == "":  # the first column keys a row: no value, no row
            return
        row = {self.columns[0]: step, **values}
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns).writerow(row)

    def log_artifact(self, path: Path) -> None:
        pass


class MultiLogger:
    """Fans one call out to several loggers."""

    def __init__(self, *loggers: Logger) -> None:
        self.loggers = loggers

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step)

    def log_artifact(self, path: Path) -> None:
        for logger in self.loggers:
            logger.log_artifact(path)
