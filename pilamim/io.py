"""Atomic file writes: a killed process leaves the old file or the new one, never half.

Three levels, each for a reason:

* :func:`atomic_write` and friends: one file, temp beside it then ``os.replace``.
* :class:`OutputBatch`: a stage's outputs (model files, reports, metrics JSON) appear together
  or not at all. Each is written to a temp name beside its target first; only when every one
  is written does :meth:`OutputBatch.commit` rename them into place, in the order they were
  added. A failure while writing (disk full, a read-only folder) leaves every previous output
  as it was. A set of renames cannot be atomic as a whole, so callers add the metrics JSON
  last: DVC and the next stages read it, and they must never see new metrics beside old models.
* :func:`ensure_writable`: a stage checks it can write its output folders before it trains,
  so a read-only ``metrics/`` is an error in seconds, not after hours of training.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any


class OutputNotWritableError(PermissionError):
    """A stage cannot write one of its output folders (a PermissionError: the CLI reports it)."""


def _write_temp(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a hidden temp file beside ``path`` (same file system, so the final
    rename is atomic), fsynced; the temp file is removed if anything fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, _json_text(obj))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


class OutputBatch:
    """Outputs written to temp names now and renamed into place together by :meth:`commit`.

    As a context manager it commits when the block ends normally; an exception instead removes
    the temp files and leaves every target as it was::

        with OutputBatch() as batch:
            batch.write(weights_path, save)
            batch.write_json(metrics_path, metrics)  # last: readers look at metrics first
    """

    def __init__(self) -> None:
        self._renames: list[tuple[Path, Path, bool]] = []  # (source, target, source is a temp)

    def write(self, path: str | Path, write: Callable[[Path], None]) -> Path:
        """Stage ``path``: ``write(tmp)`` writes it to a temp name now; commit renames it."""
        path = Path(path)
        self._renames.append((_write_temp(path, write), path, True))
        return path

    def write_json(self, path: str | Path, obj: Any) -> Path:
        text = _json_text(obj)
        return self.write(path, lambda tmp: tmp.write_text(text))

    def move(self, source: str | Path, target: str | Path) -> Path:
        """Rename an existing file at commit, in order with the others (never deleted here)."""
        self._renames.append((Path(source), Path(target), False))
        return Path(target)

    @property
    def targets(self) -> list[Path]:
        return [target for _, target, _ in self._renames]

    def commit(self) -> list[Path]:
        """Rename everything into place, in the order it was added; returns the targets."""
        targets = self.targets
        while self._renames:
            source, target, _ = self._renames[0]
            os.replace(source, target)
            self._renames.pop(0)
        return targets

    def discard(self) -> None:
        """Remove the temp files not committed yet; files staged by :meth:`move` stay put."""
        for source, _, temp in self._renames:
            if temp:
                source.unlink(missing_ok=True)
        self._renames.clear()

    def __enter__(self) -> OutputBatch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def ensure_writable(folders: Iterable[str | Path]) -> None:
    """Create each output folder and prove a file can be created in it, before any work.

    A permission check (``os.access``) is not enough: it says yes to root on a read-only
    mount, and nothing about a file standing where the folder should be. So this creates and
    removes a real temp file, the same way the atomic writes will.
    """
    for folder in dict.fromkeys(Path(f) for f in folders):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise OutputNotWritableError(
                f"cannot write to the output folder {folder} ({err.strerror or err}); make it a "
                "writable folder (fix its permissions, or move away a file with its name) or "
                "point the params at another path (checked before any work)") from err


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in blocks (shards and model weights can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
