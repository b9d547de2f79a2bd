"""prepare(): validation, deterministic stratified split, hashes, statistics, load_prepared."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pilamim.config import DataParams
from pilamim.data.errors import DataError
from pilamim.data.prepare import DEFAULT_IMG_SIZE, describe, prepare, split_sizes
from pilamim.data.prepared import data_digest, load_prepared
from tests.data.helpers import add_broken_images, make_tree


def _params(source: Path, out: Path, **changes) -> DataParams:
    changes.setdefault("raw_dir", str(out.parent / "raw"))
    return DataParams(source=str(source), out_dir=str(out), **changes)


def _rows(out_dir: Path) -> list[dict[str, str]]:
    with open(out_dir / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_broken_images_are_skipped_and_listed(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imgs", {"a": 6, "b": 5})
    add_broken_images(root / "b")
    prepared = prepare(_params(root, tmp_path / "out"))
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert [s["path"] for s in info["skipped"]] == ["b/corrupt.png", "b/truncated.png"]
    assert all(s["reason"] for s in info["skipped"])
    assert len(prepared.records) == 11
    assert "b/truncated.png" not in {r.path for r in prepared.records}
    assert info["num_images"]["total"] == 11


def test_broken_images_fail_the_run_when_asked(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imgs", {"a": 3})
    add_broken_images(root / "a")
    with pytest.raises(DataError, match="2 unusable file") as err:
        prepare(_params(root, tmp_path / "out", bad_images="fail"))
    assert "a/corrupt.png" in str(err.value) and "a/truncated.png" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_no_usable_images_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    add_broken_images(root / "a")
    with pytest.raises(DataError, match="no usable images"):
        prepare(_params(root, tmp_path / "out"))


def test_same_inputs_give_byte_identical_outputs(embedded: dict, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    outs = []
    # One process and a pool of two (also for these few bytes), with shards small enough for
    # several per split: the output must not depend on how the shard tasks were run.
    monkeypatch.setattr("pilamim.data.prepare.POOL_MIN_BYTES", 0)
    for name, workers in (("run1", 1), ("run2", 2)):
        params = DataParams(raw_dir=str(embedded["raw_dir"]), out_dir=str(tmp_path / name / "p"),
                            max_images_per_class=30, shard_mb=0.02, workers=workers)
        outs.append(prepare(params).out_dir)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".bin"]) > 3
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
    for file in files:
        assert (outs[0] / file).read_bytes() == (outs[1] / file).read_bytes(), file
    info = json.loads((outs[0] / "dataset.json").read_text())
    manifest = (outs[0] / "manifest.csv").read_text()
    assert info["digest"] == data_digest(manifest, info["shards"]["splits"])
    assert info["channels"] == 1 and len(info["mean"]) == 1
    assert info["num_images"] == {"train": 210, "val": 30, "test": 60, "total": 300}
    # Another seed gives another split of the same images.
    other = prepare(DataParams(raw_dir=str(embedded["raw_dir"]), out_dir=str(tmp_path / "s1"),
                               max_images_per_class=30, seed=1))
    assert other.digest != info["digest"]


def test_split_is_stratified_and_manifest_well_formed(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imgs", {"a": 50, "b": 40, "c": 20})
    prepared = prepare(_params(root, tmp_path / "out", test_fraction=0.2, val_fraction=0.1))
    rows = _rows(tmp_path / "out")
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    counts = {}
    for r in rows:
        counts[(r["label"], r["split"])] = counts.get((r["label"], r["split"]), 0) + 1
        assert hashlib.sha256((root / r["path"]).read_bytes()).hexdigest() == r["sha256"]
    assert counts == {("a", "test"): 10, ("a", "val"): 5, ("a", "train"): 35,
                      ("b", "test"): 8, ("b", "val"): 4, ("b", "train"): 28,
                      ("c", "test"): 4, ("c", "val"): 2, ("c", "train"): 14}
    assert prepared.counts["val"] == {"a": 5, "b": 4, "c": 2}
    assert "110 images, 3 classes" in describe(prepared)


def test_max_images_per_class_caps_every_class(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imgs", {"a": 12, "b": 3})
    prepared = prepare(_params(root, tmp_path / "out", max_images_per_class=5))
    per_class = {c: sum(r.label == c for r in prepared.records) for c in prepared.classes}
    assert per_class == {"a": 5, "b": 3}


@pytest.mark.parametrize(("n", "expected"), [
    (0, (0, 0)), (1, (0, 0)), (2, (1, 0)), (3, (1, 1)), (10, (2, 1)), (100, (20, 10)),
])
def test_split_sizes(n: int, expected: tuple[int, int]) -> None:
    assert split_sizes(n, 0.2, 0.1) == expected
    n_test, n_val = split_sizes(n, 0.2, 0.1)
    assert n == 0 or n - n_test - n_val >= 1


def test_mean_std_are_per_channel_on_the_train_split(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imgs", {"a": 6, "b": 6}, mode="RGB")
    prepared = prepare(_params(root, tmp_path / "out"))
    assert prepared.channels == 3
    size = (DEFAULT_IMG_SIZE, DEFAULT_IMG_SIZE)  # measured as the model sees the images
    pixels = np.concatenate([
        np.asarray(Image.open(root / r.path).resize(size, Image.Resampling.BICUBIC),
                   dtype=np.float64).reshape(-1, 3) / 255
        for r in prepared.split("train")
    ])
    np.testing.assert_allclose(prepared.mean, pixels.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(prepared.std, pixels.std(axis=0), atol=1e-6)


def test_mixed_gray_and_color_means_three_channels(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imgs", {"a": 3})
    make_tree(root, {"b": 3}, mode="RGB", seed=1)
    assert prepare(_params(root, tmp_path / "out")).channels == 3


def test_load_prepared_says_to_run_prepare(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run `pilamim prepare` first"):
        load_prepared(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "manifest.csv").write_text("path,label,split,sha256\n")
    with pytest.raises(FileNotFoundError, match="run `pilamim prepare` first"):
        load_prepared(tmp_path / "half")


def test_load_prepared_round_trip_and_digest_check(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imgs", {"a": 4, "b": 4})
    prepared = prepare(_params(root, tmp_path / "out"))
    again = load_prepared(tmp_path / "out")
    assert again.records == prepared.records and again.shards == prepared.shards
    assert again.num_classes == 2 and again.label_index(again.records[-1]) == 1
    assert {r.split for r in again.records} == {"train", "val", "test"}
    manifest = tmp_path / "out" / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(",train,", ",test,", 1))
    with pytest.raises(ValueError, match="does not match the digest"):
        load_prepared(tmp_path / "out")
