"""One function per step: each runs its work as a child process and returns its line's fields.

A step raises to fail (the CLI turns that into ``ok: false`` and a non-zero exit) and returns
``{"skipped": "why"}`` when what it measures does not exist yet in the project (a params key
the data rewrite has not added), which is not a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.data_scale_parts import project as proj
from benchmarks.data_scale_parts.common import REPO_ROOT, Measured, child_command, measure

TRAIN_SHARE = 0.7  # the default split's train share: loaders read about the train split's size
STAGE_PATTERN = re.compile(r"Running stage '([^']+)'")


class StepError(RuntimeError):
    """A step's work failed; the message says what ran and how it ended."""


@dataclass
class Bench:
    """What the steps share: the flags, the workdir's layout, the lines so far, the server."""

    args: argparse.Namespace
    workdir: Path
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    stack: ExitStack = field(default_factory=ExitStack)
    _s3: Any = None

    @property
    def images_dir(self) -> Path:
        return self.workdir / "images"

    @property
    def project(self) -> Path:
        return self.workdir / "project"

    @property
    def project_s3(self) -> Path:
        return self.workdir / "project-s3"

    @property
    def loader_count(self) -> int:
        return max(1, min(self.args.loader_images, int(self.args.images * TRAIN_SHARE)))

    def s3(self):
        """The loopback SeaweedFS, started on first use and stopped when the run ends."""
        if self._s3 is None:
            from benchmarks.data_scale_parts.s3 import seaweedfs_s3

            # empty, also in a reused --workdir: objects left there would make pushes no-ops
            shutil.rmtree(self.workdir / "s3", ignore_errors=True)
            self._s3 = self.stack.enter_context(seaweedfs_s3(self.workdir / "s3"))
        return self._s3

    def env(self, s3: bool = False) -> dict[str, str]:
        return proj.project_env(self.project, self.workdir, self.s3().env() if s3 else None)

    def run(self, name: str, cmd: list[str], cwd: Path,
            env: dict[str, str] | None = None) -> Measured:
        """Run and time one command; raise :class:`StepError` if it fails."""
        done = measure(cmd, cwd, env or dict(os.environ), self.args.step_timeout,
                       self.workdir / "logs", name)
        if done.failure():
            raise StepError(done.failure())
        return done

    def child(self, name: str, step: str, config: dict[str, Any], cwd: Path = REPO_ROOT,
              env: dict[str, str] | None = None) -> tuple[Measured, dict[str, Any]]:
        """Run an in-Python step in a fresh process of this benchmark; its result line."""
        if self.args.fail_step == name:
            config = {**config, "fail": True}
        done = self.run(name, child_command(step, config), cwd, env)
        return done, done.result_line()

    def pilamim(self, name: str, stage: str, project: Path, env: dict[str, str],
                *extra: str) -> Measured:
        cmd = [str(proj.VENV_BIN / "pilamim"), stage, *extra]
        return self.run(name, cmd, project, env)

    def dvc(self, name: str, *args: str, env: dict[str, str] | None = None) -> Measured:
        return self.run(name, [str(proj.VENV_BIN / "dvc"), *args], self.project,
                        env or self.env())


def per(images: int | None, seconds: float | None) -> float | None:
    return images / seconds if images and seconds else None


def timed(done: Measured, images: int | None, **extra: Any) -> dict[str, Any]:
    """The common fields of a step that is one command: its wall and CPU time are the step's
    (the command's start, imports included)."""
    return {"subcommand": done.command, "wall_s": done.wall_s, "images": images,
            "img_per_s": per(images, done.wall_s), "cpu_s": done.cpu_s,
            "img_per_cpu_s": per(images, done.cpu_s), "peak_rss_mb": done.peak_rss_mb,
            "peak_tree_rss_mb": done.peak_tree_rss_mb, **extra}


def inner(done: Measured, result: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The common fields of an in-Python step: rates over its work, without the interpreter's
    start and imports (``process_wall_s`` / ``process_cpu_s`` include them)."""
    skip = ("seconds", "images", "img_per_s", "cpu_s")
    return {"subcommand": done.command, "wall_s": result.get("seconds"),
            "process_wall_s": done.wall_s, "images": result.get("images"),
            "img_per_s": result.get("img_per_s"), "cpu_s": result.get("cpu_s"),
            "img_per_cpu_s": per(result.get("images"), result.get("cpu_s")),
            "process_cpu_s": done.cpu_s, "peak_rss_mb": done.peak_rss_mb,
            "peak_tree_rss_mb": done.peak_tree_rss_mb, **extra,
            **{k: v for k, v in result.items() if k not in skip}}


def cli_result(done: Measured) -> dict[str, Any] | None:
    """The JSON summary a ``pilamim`` stage prints last, if any."""
    text = done.stdout
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        return None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


# --- local steps -------------------------------------------------------------------------


def make_images(b: Bench) -> dict[str, Any]:
    config = {"images_dir": str(b.images_dir), "count": b.args.images, "size": b.args.size,
              "seed": b.args.seed}
    return inner(*b.child("make_images", "make_images", config))


def decode_ceiling_1proc(b: Bench) -> dict[str, Any]:
    config = {"images_dir": str(b.images_dir), "processes": 1}
    return inner(*b.child("decode_ceiling_1proc", "decode", config))


def decode_ceiling_all_cores(b: Bench) -> dict[str, Any]:
    config = {"images_dir": str(b.images_dir), "processes": os.cpu_count() or 1}
    out = inner(*b.child("decode_ceiling_all_cores", "decode", config))
    one = b.done.get("decode_ceiling_1proc", {}).get("img_per_s")
    return {**out, "ratio_vs_1proc": ratio(out["img_per_s"], one)}


def fetch(b: Bench) -> dict[str, Any]:
    """``pilamim fetch`` in a fresh copy of the working tree (or ``--tree REV``) whose
    ``data.source`` is the synthetic folder (copy, git + DVC init and MLflow's store are
    set-up, not timed)."""
    files = proj.copy_tree(b.project, b.args.tree)
    env = b.env()
    proj.init_project(b.project, env)
    proj.set_param(b.project, "data", "source", str(b.images_dir))
    done = b.pilamim("fetch", "fetch", b.project, env)
    return timed(done, b.args.images, tree=b.args.tree or "working", tree_files=files,
                 result=cli_result(done))


def prepare(b: Bench) -> dict[str, Any]:
    """``pilamim prepare``; then once more on one worker process, if params have such a key,
    into a folder of its own (the DVC-tracked output stays the N-process one)."""
    env = b.env()
    done = b.pilamim("prepare", "prepare", b.project, env)
    out = timed(done, b.args.images, result=cli_result(done))
    keys = proj.params_of(b.project, "data")
    key = proj.find_key(keys, "workers")
    if key is None:
        return {**out, "workers_key": None, "one_process": None, "speedup_vs_1proc": None,
                "note": "params/data.yaml has no *workers* key: no 1-process run to compare"}
    one_dir = b.workdir / "prepared-1proc"
    one = b.pilamim("prepare_1proc", "prepare", b.project, env, "--set", f"data.{key}=1",
                    "--set", f"data.out_dir={one_dir}")
    shutil.rmtree(one_dir, ignore_errors=True)
    return {**out, "workers_key": key, "workers_param": keys[key],
            "one_process": timed(one, b.args.images),
            "speedup_vs_1proc": ratio(one.wall_s, done.wall_s)}


def dvc_commit(b: Bench) -> dict[str, Any]:
    """Record fetch's and prepare's outputs in ``dvc.lock`` (hashes every file, fills the
    cache) as ``dvc repro`` would after running them."""
    done = b.dvc("dvc_commit", "commit", "-f", "fetch", "prepare")
    return timed(done, b.args.images)


def dvc_entries(b: Bench) -> dict[str, Any]:
    return {"images": b.args.images, **proj.dvc_entries(b.project, b.args.images)}


def dvc_status(b: Bench) -> dict[str, Any]:
    done = b.dvc("dvc_status", "status", "--json")
    status = json.loads(done.stdout or "{}")
    stale = sorted(set(status) & {"fetch", "prepare"})
    if stale:
        raise StepError(f"dvc status after dvc commit: {stale} not up to date: {status}")
    return timed(done, b.args.images, img_per_s=None, img_per_cpu_s=None,
                 stale_later_stages=sorted(status))


def dvc_noop_repro(b: Bench) -> dict[str, Any]:
    done = b.dvc("dvc_noop_repro", "repro", "prepare")
    ran = STAGE_PATTERN.findall(done.stdout + done.stderr)
    if ran:
        raise StepError(f"`dvc repro prepare` was not a no-op: it ran {ran}")
    return timed(done, b.args.images, img_per_s=None, img_per_cpu_s=None)


def loader_per_file(b: Bench) -> dict[str, Any]:
    config = {"images_dir": str(b.images_dir), "count": b.loader_count,
              "workers": b.args.loader_workers}
    return inner(*b.child("loader_per_file", "loader_per_file", config))


def _project_loader(b: Bench, name: str, project: Path, env: dict[str, str],
                    cold: bool = False) -> dict[str, Any]:
    """The project's loader, run in the copy (its ``pilamim``, its prepared data). An error
    from a loader API in mid-change is the line's ``error``."""
    out_dir = Path(proj.params_of(project, "data").get("out_dir", "data/prepared"))
    cache_root = b.workdir / f"shard-cache-{name}"
    shutil.rmtree(cache_root, ignore_errors=True)
    config = {"prepared_dir": str(out_dir if out_dir.is_absolute() else project / out_dir),
              "project": str(project), "count": b.loader_count,
              "workers": b.args.loader_workers, "cold": cold, "cache_root": str(cache_root)}
    if not cold:
        return inner(*b.child(name, "loader_shards", config, env=env))
    return _cold_runs(b, name, config, env)


def _cold_runs(b: Bench, name: str, config: dict[str, Any],
               env: dict[str, str]) -> dict[str, Any]:
    """One fresh process per worker count, nothing read before the workers fork, each on an
    empty cache: as a training run starts. (Reading S3 shards in a process and then forking
    loader workers on an empty cache hung in litdata: ChunkWaitTimeoutError, 2026-12-03.)"""
    lines = []
    for i, workers in enumerate(b.args.loader_workers):
        last = i == len(b.args.loader_workers) - 1
        run_config = {**config, "workers": [workers], "warmup": False, "bytes_only": last}
        lines.append(inner(*b.child(f"{name}-{workers}w", "loader_shards", run_config,
                                    env=env)))
    best = lines[-1]
    return {**best, "runs": [run for line in lines for run in line["runs"]],
            "subcommand": [line["subcommand"] for line in lines],
            "process_wall_s": sum(line["process_wall_s"] for line in lines),
            "process_cpu_s": sum(line["process_cpu_s"] for line in lines),
            "peak_rss_mb": max(line["peak_rss_mb"] for line in lines),
            "peak_tree_rss_mb": max(line["peak_tree_rss_mb"] or 0 for line in lines) or None}


def loader_shards(b: Bench) -> dict[str, Any]:
    return _project_loader(b, "loader_shards", b.project, b.env())


# --- S3 steps ----------------------------------------------------------------------------


def dvc_push(b: Bench) -> dict[str, Any]:
    from benchmarks.data_scale_parts.s3 import add_dvc_remote

    s3 = b.s3()
    s3.client().create_bucket(Bucket="dvc")
    env = b.env(s3=True)
    add_dvc_remote(b.project, env, s3, "s3://dvc/cache")
    files = proj.cache_files(b.project)
    mb = sum(p.stat().st_size for p in files) / 1e6
    done = b.dvc("dvc_push", "push", "fetch", "prepare", env=env)
    return timed(done, b.args.images, files=len(files), mb=mb, mb_per_s=mb / done.wall_s,
                 files_per_s=len(files) / done.wall_s)


def dvc_pull(b: Bench) -> dict[str, Any]:
    """Empty the cache and the outputs, then ``dvc pull`` them back from the remote."""
    env = b.env(s3=True)
    files = proj.cache_files(b.project)
    mb = sum(p.stat().st_size for p in files) / 1e6
    outs = proj.dvc_entries(b.project, b.args.images)["outs"]
    shutil.rmtree(b.project / ".dvc" / "cache", ignore_errors=True)
    for path in outs:
        shutil.rmtree(b.project / path, ignore_errors=True)
    done = b.dvc("dvc_pull", "pull", "fetch", "prepare", env=env)
    missing = [p for p in outs if not (b.project / p).exists()]
    if missing:
        raise StepError(f"dvc pull did not restore {missing}")
    return timed(done, b.args.images, files=len(files), mb=mb, mb_per_s=mb / done.wall_s,
                 files_per_s=len(files) / done.wall_s)


def boto3_copy(b: Bench) -> dict[str, Any]:
    """The same objects with plain boto3 (``upload_file`` / ``download_file``, one thread per
    transfer, DVC's default job count), against ``dvc push`` / ``dvc pull``."""
    from benchmarks.data_scale_parts.s3 import default_jobs

    cache = b.project / ".dvc" / "cache"
    config = {"cache_dir": str(cache / "files" if (cache / "files").is_dir() else cache),
              "bucket": "boto3-copy", "download_dir": str(b.workdir / "boto3-download"),
              "threads": default_jobs()}
    done, result = b.child("boto3_copy", "boto3_copy", config, env=b.env(s3=True))
    shutil.rmtree(b.workdir / "boto3-download", ignore_errors=True)
    push, pull = b.done.get("dvc_push", {}), b.done.get("dvc_pull", {})
    return {**inner(done, result), "images": b.args.images,
            "img_per_s": per(b.args.images, result["seconds"]),
            "img_per_cpu_s": per(b.args.images, result["cpu_s"]),
            "dvc_push_vs_boto3_upload": ratio(push.get("mb_per_s"), result["upload"]["mb_per_s"]),
            "dvc_pull_vs_boto3_download": ratio(pull.get("mb_per_s"),
                                                result["download"]["mb_per_s"])}


def prepare_s3(b: Bench) -> dict[str, Any]:
    """The source as S3 objects: upload it (boto3), then ``pilamim fetch`` + ``prepare`` in a
    second fresh copy with ``data.source: s3://source/images`` (and ``shards_uri`` on S3 too
    where params have that key)."""
    from benchmarks.data_scale_parts.s3 import default_jobs

    env = proj.project_env(b.project_s3, b.workdir, b.s3().env())
    upload_config = {"root": str(b.images_dir), "bucket": "source", "prefix": "images",
                     "threads": default_jobs()}
    up_done, upload = b.child("upload_source", "upload_source", upload_config, env=env)
    proj.copy_tree(b.project_s3, b.args.tree)
    proj.init_project(b.project_s3, env)
    proj.set_param(b.project_s3, "data", "source", "s3://source/images")
    shards_key = proj.find_key(proj.params_of(b.project_s3, "data"), "shards_uri")
    if shards_key:
        b.s3().client().create_bucket(Bucket="shards")
        proj.set_param(b.project_s3, "data", shards_key, "s3://shards/prepared")
    fetched = b.pilamim("prepare_s3_fetch", "fetch", b.project_s3, env)
    prepared = b.pilamim("prepare_s3", "prepare", b.project_s3, env)
    wall, cpu = fetched.wall_s + prepared.wall_s, fetched.cpu_s + prepared.cpu_s
    return {"subcommand": f"{fetched.command} && {prepared.command}", "images": b.args.images,
            "wall_s": wall, "img_per_s": b.args.images / wall, "cpu_s": cpu,
            "img_per_cpu_s": b.args.images / cpu,
            "peak_rss_mb": max(fetched.peak_rss_mb, prepared.peak_rss_mb),
            "peak_tree_rss_mb": max(fetched.peak_tree_rss_mb or 0,
                                    prepared.peak_tree_rss_mb or 0) or None,
            "upload": {**upload, "process_wall_s": up_done.wall_s},
            "fetch": timed(fetched, b.args.images), "prepare": timed(prepared, b.args.images),
            "shards_key": shards_key}


def loader_shards_s3_cold(b: Bench) -> dict[str, Any]:
    key = proj.find_key(proj.params_of(b.project_s3, "data"), "shards_uri")
    if key is None:
        return {"skipped": "params/data.yaml has no shards_uri key: the project cannot put "
                           "shards in S3 yet"}
    env = proj.project_env(b.project_s3, b.workdir, b.s3().env())
    return {**_project_loader(b, "loader_shards_s3_cold", b.project_s3, env, cold=True),
            "shards_key": key}


STEP_FUNCTIONS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    f.__name__: f for f in (make_images, decode_ceiling_1proc, decode_ceiling_all_cores, fetch,
                            prepare, dvc_commit, dvc_entries, dvc_status, dvc_noop_repro,
                            loader_per_file, loader_shards, dvc_push, dvc_pull, boto3_copy,
                            prepare_s3, loader_shards_s3_cold)}
