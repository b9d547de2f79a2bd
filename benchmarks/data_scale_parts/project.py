"""A fresh git + DVC checkout of this working tree, its params, and what DVC keeps of it.

The copy is the *working tree* (tracked files plus untracked, not ignored ones, as they are on
disk now), not a clone of a commit: uncommitted changes to the stages are what is being
measured (``--tree REV`` takes a commit's tree instead). Commands run there with
``PYTHONPATH`` set to the copy, so the ``pilamim`` the stages import is the copy DVC hashes as
their code deps, not the editable install's.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks.data_scale_parts.common import REPO_ROOT
from tests.fresh_checkout import FOREIGN_ENV

VENV_BIN = Path(sys.executable).parent
GIT_USER = ["-c", "user.name=pilamim benchmark", "-c", "user.email=bench@pilamim.invalid"]


def working_tree_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files of the repo, as git sees them now."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                         capture_output=True, check=True).stdout
    return sorted({name for name in out.decode().split("\0") if name})


def copy_tree(dest: Path, rev: str | None = None) -> int:
    """Copy the working tree (``rev`` None) or a commit's tree into ``dest``, fresh; the
    number of files. A commit serves while the working tree is mid-change and broken."""
    if dest.exists():
        shutil.rmtree(dest)
    if rev is None:
        return copy_working_tree(dest)
    archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=REPO_ROOT,
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        members = [m for m in tar.getmembers() if m.isfile() or m.isdir() or m.issym()]
        tar.extractall(dest, members=members, filter="data")
    return sum(1 for m in members if m.isfile())


def copy_working_tree(dest: Path) -> int:
    """Copy the working tree into ``dest``; files deleted on disk are left out."""
    copied = 0
    for name in working_tree_files():
        src = REPO_ROOT / name
        if not (src.is_file() or src.is_symlink()):
            continue  # deleted but still tracked, or a submodule folder
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)
        copied += 1
    return copied


def project_env(project: Path, workdir: Path, extra: dict[str, str] | None = None
                ) -> dict[str, str]:
    """The environment of every command in the copy: its own code, MLflow store, Prefect home,
    shard cache and DVC/git config; nothing pointing at someone else's servers or runs."""
    config = workdir / "dvc-config"
    env = {**os.environ,
           "PYTHONPATH": str(project),
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "PREFECT_HOME": str(workdir / ".prefect"),
           # shards read from S3 are cached here, not in ~/.cache (data.shards_uri)
           "PILAMIM_SHARD_CACHE_DIR": str(workdir / "shard-cache"),
           "DVC_NO_ANALYTICS": "1", "DVC_GLOBAL_CONFIG_DIR": str(config / "global"),
           "DVC_SYSTEM_CONFIG_DIR": str(config / "system"),
           "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
           **(extra or {})}
    for name in FOREIGN_ENV:
        env.pop(name, None)
    return env


def init_project(project: Path, env: dict[str, str]) -> None:
    """``git init`` + commit the copy; ``dvc init`` only if the tree has no ``.dvc/`` (it is
    tracked in this repo); MLflow's store created up front, so no stage pays its migration."""
    def run(*cmd: str) -> None:
        subprocess.run(list(cmd), cwd=project, env=env, check=True, capture_output=True)

    run("git", "init", "-q", "-b", "main")
    dvc = str(VENV_BIN / "dvc")
    if not (project / ".dvc" / "config").exists():
        run(dvc, "init", "-q")
    run(dvc, "config", "core.analytics", "false")
    run("git", "add", "-A")
    run("git", *GIT_USER, "commit", "-q", "-m", "working tree for benchmarks.data_scale")
    run(sys.executable, "-c", "import mlflow; mlflow.MlflowClient().search_experiments()")


def params_of(project: Path, group: str) -> dict[str, Any]:
    return yaml.safe_load((project / "params" / f"{group}.yaml").read_text()) or {}


def set_param(project: Path, group: str, key: str, value: str) -> None:
    """Set a top-level key of ``params/<group>.yaml`` in place, keeping the file's comments
    (the CLI's ``--set`` would not reach ``dvc repro``, which reads the file)."""
    path = project / "params" / f"{group}.yaml"
    text = path.read_text()
    line = re.compile(rf"^{re.escape(key)}:[^\n]*$", re.M)
    found = line.search(text)
    if not found:
        raise KeyError(f"{path} has no top-level key {key!r}")
    _, hash_, comment = found.group(0).partition("#")
    new = f"{key}: {value}" + (f"  #{comment}" if hash_ else "")
    path.write_text(text[:found.start()] + new + text[found.end():])


def find_key(keys: dict[str, Any], *needles: str) -> str | None:
    """The first key containing one of ``needles`` (the key names are changing as we write)."""
    for needle in needles:
        for key in keys:
            if needle in key:
                return key
    return None


def dvc_entries(project: Path, images: int) -> dict[str, Any]:
    """How many entries DVC keeps for the data: files under each out in ``dvc.lock`` (its
    ``nfiles``), ``.dir`` manifests and objects in the cache; per 1,000 images too."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = {}
    for stage, body in (lock.get("stages") or {}).items():
        for out in body.get("outs") or []:
            outs[out["path"]] = {"stage": stage, "nfiles": out.get("nfiles", 1),
                                 "size_mb": out.get("size", 0) / 1e6}
    objects = cache_files(project)
    manifests = sum(1 for p in objects if p.name.endswith(".dir"))
    files = sum(o["nfiles"] for o in outs.values())
    total = files + manifests
    return {"outs": outs, "tracked_files": files, "dir_manifests": manifests,
            "cache_objects": len(objects), "cache_mb": sum(p.stat().st_size for p in objects) / 1e6,
            "entries": total, "entries_per_1000_images": 1000 * total / images if images else None}


def cache_files(project: Path) -> list[Path]:
    """Every data object in the project's DVC cache (what ``dvc push`` sends; DVC 3 keeps them
    under ``files/``, beside its run cache)."""
    cache = project / ".dvc" / "cache"
    cache = cache / "files" if (cache / "files").is_dir() else cache
    return sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []
