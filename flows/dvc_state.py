"""Ask DVC whether a stage is up to date, and record a stage that ran, through DVC's Python API.

The Prefect flow runs the same stage code as ``dvc repro`` (``pilamim <stage>``), so the two
entrances share one cache: the flow skips a stage when ``dvc status`` has nothing to say about
it, and after running one it writes the stage's ``dvc.lock`` entry the way ``dvc repro`` does
(``dvc commit``: hash deps, params and outs, store outs in ``.dvc/cache``). Then neither
entrance redoes what the other has done.

DVC allows one operation per workspace at a time (``.dvc/tmp/lock``) and its ``Repo`` is not
meant to be shared between threads, while Prefect runs ``probe`` and ``finetune`` in threads at
once. So every call takes a process-wide lock and opens its own ``Repo``; when another process
(a ``dvc`` command in a terminal) holds DVC's lock, the call waits and retries for a while
before giving up with DVC's own "Unable to acquire lock" error.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from dvc.repo import Repo

log = logging.getLogger(__name__)

PROJECT_FILE = "dvc.yaml"
LOCK_ATTEMPTS = 10  # each attempt already waits ~3 s inside DVC before raising LockError
LOCK_RETRY_DELAY_S = 1.0

_lock = threading.Lock()
T = TypeVar("T")


def is_dvc_repo(root: str | Path = ".") -> bool:
    """True when ``root`` itself is a DVC repo (has ``.dvc/``) with a ``dvc.yaml`` pipeline."""
    root = Path(root)
    return (root / ".dvc").is_dir() and (root / PROJECT_FILE).is_file()


def stage_up_to_date(stage: str, root: str | Path = ".") -> bool:
    """True when ``dvc status`` reports nothing for ``stage``: its deps, params, command and
    outs all match ``dvc.lock``. False outside a DVC repo or for a stage not in ``dvc.yaml``."""
    from dvc.stage.exceptions import StageFileDoesNotExistError, StageNotFound

    if not is_dvc_repo(root):
        return False

    def check(repo: Repo) -> bool:
        try:
            return not repo.status(targets=[_target(repo, stage)])
        except (StageNotFound, StageFileDoesNotExistError):
            return False

    return _with_repo(root, check)


def commit_stage(stage: str, root: str | Path = ".") -> None:
    """Record ``stage``'s deps, params and outs in ``dvc.lock`` and its outs in the DVC cache,
    as ``dvc repro`` does after running it (``dvc commit --force <stage>``). No-op outside a
    DVC repo; a stage that is not in ``dvc.yaml`` is logged and skipped.

    Like the ``dvc`` command, it must run in the repo (DVC's run cache resolves paths against
    the working directory); the stages' own relative paths need that anyway.
    """
    from dvc.stage.exceptions import StageNotFound

    if not is_dvc_repo(root):
        return
    if Path(root).resolve() != Path.cwd().resolve():
        raise ValueError(f"commit_stage({stage!r}): run it from the repo root {root}, "
                         f"not {Path.cwd()}: DVC and the stages resolve paths from there")

    def commit(repo: Repo) -> None:
        try:
            # relink=False: the workspace files already are what was cached; re-copying
            # thousands of raw images from the cache only costs time
            repo.commit(_target(repo, stage), force=True, relink=False)
        except StageNotFound:
            log.warning("stage %r is not in %s: nothing recorded in dvc.lock", stage,
                        PROJECT_FILE)

    _with_repo(root, commit)


def _target(repo: Repo, stage: str) -> str:
    # absolute, so the answer does not depend on the process's working directory
    return f"{Path(repo.root_dir) / PROJECT_FILE}:{stage}"


@contextlib.contextmanager
def _dvc_quiet() -> Iterator[None]:
    """DVC's INFO lines ("Updating lock file 'dvc.lock'"), once per stage and printed twice (by
    DVC's own handler and by Prefect's), say nothing the task's own "finished" line does not."""
    dvc_log = logging.getLogger("dvc")
    level = dvc_log.level
    dvc_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        dvc_log.setLevel(level)


def _with_repo(root: str | Path, fn: Callable[[Repo], T]) -> T:
    """``fn(Repo(root))`` under the process-wide lock, retrying while DVC's lock is taken."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    for attempt in range(1, LOCK_ATTEMPTS + 1):
        with _lock:
            try:
                with Repo(str(root)) as repo, _dvc_quiet():
                    return fn(repo)
            except LockError:
                if attempt == LOCK_ATTEMPTS:
                    raise
                log.info("DVC repo %s is locked by another process; retry %d/%d", root,
                         attempt, LOCK_ATTEMPTS - 1)
        time.sleep(LOCK_RETRY_DELAY_S)
    raise AssertionError("unreachable")
