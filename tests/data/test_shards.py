"""Shards from prepare: resumable by shard, byte-identical, verified before anyone trains."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pilamim.config import DataParams
from pilamim.data.dataset import ManifestDataset
from pilamim.data.errors import DataError
from pilamim.data.prepare import WORK_DIR, prepare
from pilamim.data.prepared import load_prepared
from pilamim.data.shard_reader import verify_shards


def _params(embedded: dict, out: Path, **changes) -> DataParams:
    return DataParams(raw_dir=str(embedded["raw_dir"]), out_dir=str(out),
                      max_images_per_class=30, shard_mb=0.004, **changes)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_killed_prepare_redoes_only_the_missing_shards(embedded: dict, tmp_path: Path) -> None:
    reference = prepare(_params(embedded, tmp_path / "ref" / "p", workers=1)).out_dir
    out = tmp_path / "run" / "p"
    params = _params(embedded, out, workers=1)
    code = (f"from pilamim.config import DataParams; from pilamim.data.prepare import prepare; "
            f"prepare(DataParams(**{params.model_dump()!r}))")
    child = subprocess.Popen([sys.executable, "-c", code])
    tasks = out.parent / WORK_DIR
    deadline = time.monotonic() + 120
    while len(list(tasks.glob("*/tasks/*.json"))) < 5:
        assert child.poll() is None, "prepare finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (out / "dataset.json").exists()  # nothing half-written looks complete
    finished = {}  # chunk (split/file) -> mtime, for every task the kill let finish
    for result in tasks.glob("*/tasks/*.json"):
        split, index = result.stem.split("-")
        chunk = result.parent.parent / "shards" / split / f"chunk-{int(index)}-0.bin"
        finished[f"{split}/{chunk.name}"] = chunk.stat().st_mtime_ns
    assert len(finished) >= 5

    subprocess.run([sys.executable, "-c", code], check=True)
    assert _tree(out) == _tree(reference)
    assert not tasks.exists() or not any(tasks.iterdir())  # the work folder is cleaned up
    for chunk, mtime in finished.items():  # finished shards were moved into place, not redone
        assert (out / "shards" / chunk).stat().st_mtime_ns == mtime, chunk
    total = sum(len(s["chunks"]) for s in load_prepared(out).shards.values())
    assert total > len(finished)  # the kill left shards to do


def test_truncated_changed_or_missing_shards_fail_before_training(
        embedded: dict, tmp_path: Path) -> None:
    prepared = prepare(_params(embedded, tmp_path / "p"))
    verify_shards(prepared)
    chunk = prepared.shards["train"]["chunks"][1]
    path = prepared.out_dir / "shards" / "train" / chunk["file"]
    original = path.read_bytes()

    path.write_bytes(original[:-10])
    with pytest.raises(DataError, match="truncated or changed") as err:
        verify_shards(prepared)
    assert str(path) in str(err.value) and "pilamim prepare" in str(err.value)

    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(DataError, match="sha256 differs"):
        verify_shards(prepared)

    path.unlink()
    with pytest.raises(DataError, match="is missing"):
        verify_shards(prepared)

    path.write_bytes(original)
    verify_shards(prepared)


def test_loader_images_are_the_prepared_files(embedded: dict, tmp_path: Path) -> None:
    """The shards hold each file's bytes as it was hashed, in manifest order."""
    import hashlib

    prepared = prepare(_params(embedded, tmp_path / "p"))
    for split in ("train", "val", "test"):
        dataset = ManifestDataset(prepared, split)
        records = prepared.split(split)
        assert len(dataset) == len(records) == prepared.shards[split]["items"]
        for i in (0, len(records) // 2, len(records) - 1):
            item = dataset.shards.item(i)
            assert item["path"] == records[i].path and item["label"] == records[i].label
            assert hashlib.sha256(item["image"]).hexdigest() == records[i].sha256


def test_without_a_terminal_progress_is_a_line_with_rate_and_eta(capsys) -> None:
    from pilamim.data.progress import Progress

    with Progress(total=100, done=20, what="preparing images", every_s=0.0) as progress:
        progress.update(30)
        progress.update(50)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("preparing images: 50/100 (50%), ") and "img/s, ETA" in lines[0]
    assert lines[-1].startswith("preparing images: 100/100 (100%)")
