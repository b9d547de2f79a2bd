"""materialize(): bundled subset, full IDX files, local folders, S3 (real SeaweedFS)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from botocore.exceptions import ClientError
from PIL import Image

from pilamim.config import DataParams
from pilamim.data.errors import DataError
from pilamim.data.fetch_report import FETCH_REPORT
from pilamim.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES
from pilamim.data.prepare import prepare
from pilamim.data.s3_source import S3_STATE
from pilamim.data.sources import MARKER, _atomic_folder, encode_gray_png, materialize
from tests.data.helpers import make_tree, png_bytes, upload_tree, write_idx

# ----------------------------------------------------------------------------- embedded


def test_embedded_writes_every_class(embedded: dict) -> None:
    root = embedded["root"]
    assert root == embedded["raw_dir"] / "fashion-mnist"
    per_class = {d.name: len(list(d.glob("*.png"))) for d in root.iterdir() if d.is_dir()}
    assert per_class == {name: 1200 for name in FASHION_MNIST_CLASSES}
    assert len(list((root / "Bag").glob("train_*.png"))) == 1000
    marker = json.loads((root / MARKER).read_text())
    assert marker["count"] == 12_000
    assert not list(root.parent.glob(".*tmp*")), "temp folders left behind"


def test_embedded_second_call_is_a_no_op(embedded: dict) -> None:
    root = embedded["root"]
    before = {p: p.stat().st_mtime_ns for p in (root / "Bag").iterdir()}
    again = materialize(DataParams(raw_dir=str(embedded["raw_dir"])))
    assert again == root
    assert {p: p.stat().st_mtime_ns for p in (root / "Bag").iterdir()} == before


def test_atomic_folder_never_leaves_half_a_folder(tmp_path: Path) -> None:
    target = tmp_path / "set"

    def dies(folder: Path) -> int:
        (folder / "a").mkdir()
        (folder / "a" / "x.png").write_bytes(b"1")
        raise KeyboardInterrupt  # a killed run

    with pytest.raises(KeyboardInterrupt):
        _atomic_folder(target, {"v": 1}, dies)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []

    def fill(n: int):
        def write(folder: Path) -> int:
            (folder / "a").mkdir()
            for i in range(n):
                (folder / "a" / f"{i}.png").write_bytes(b"1")
            return n
        return write

    _atomic_folder(target, {"v": 1}, fill(2))
    assert target.stat().st_mode & 0o777 == 0o755
    _atomic_folder(target, {"v": 2}, fill(3))  # new fingerprint: replaced as a whole
    assert sorted(p.name for p in (target / "a").iterdir()) == ["0.png", "1.png", "2.png"]
    (target / "a" / "2.png").unlink()  # damaged by hand: rebuilt
    _atomic_folder(target, {"v": 2}, fill(3))
    assert len(list((target / "a").iterdir())) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


def test_embedded_idx_dir_uses_the_full_files(tmp_path: Path) -> None:
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 5)):
        images_name, labels_name = FASHION_MNIST_FILES[split]
        write_idx(idx_dir / images_name, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(idx_dir / labels_name, (np.arange(n) % 10).astype(np.uint8))
    params = DataParams(raw_dir=str(tmp_path / "raw"), embedded_idx_dir=str(idx_dir))
    root = materialize(params)
    assert root == tmp_path / "raw" / "fashion-mnist-full"
    assert len(list(root.glob("*/*.png"))) == 17
    assert sorted(p.name for p in (root / "T-shirt_top").iterdir()) == [
        "test_00000.png", "train_00000.png", "train_00010.png"]


def test_embedded_idx_dir_without_files_is_a_clear_error(tmp_path: Path) -> None:
    params = DataParams(raw_dir=str(tmp_path / "raw"), embedded_idx_dir=str(tmp_path))
    with pytest.raises(DataError, match="four Fashion-MNIST gzip IDX files"):
        materialize(params)


# ----------------------------------------------------------------------------- local


def test_local_folder_is_mirrored_under_raw_dir_by_hard_links(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imgs", {"cat": 2, "dog": 1})
    params = DataParams(source=str(root), raw_dir=str(tmp_path / "raw"))
    mirror = materialize(params)
    assert mirror == tmp_path / "raw" / "local" / "imgs"
    files = sorted(p.relative_to(mirror) for p in mirror.rglob("*")
                   if p.is_file() and p.name != FETCH_REPORT)
    assert files == sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert json.loads((mirror / FETCH_REPORT).read_text()) == {"empty_classes": [],
                                                               "skipped": []}
    first = next(p for p in sorted(mirror.rglob("*.png")) if p.is_file())
    assert first.stat().st_ino == (root / first.relative_to(mirror)).stat().st_ino
    # a file removed at the source disappears from the mirror on the next fetch
    (root / first.relative_to(mirror)).unlink()
    materialize(params)
    assert not first.exists()


def test_local_folder_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        materialize(DataParams(source=str(tmp_path / "nope")))


def test_local_folder_without_class_folders_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        materialize(DataParams(source=str(tmp_path / "empty")))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(png_bytes(np.zeros((4, 4), np.uint8)))
    with pytest.raises(DataError, match="no class subfolders"):
        materialize(DataParams(source=str(tmp_path / "flat")))
    with pytest.raises(DataError, match="not a folder"):
        materialize(DataParams(source=str(tmp_path / "flat" / "a.png")))


# ----------------------------------------------------------------------------- S3


def test_seaweedfs_rejects_wrong_credentials(s3_server) -> None:
    s3_server.client().list_buckets()
    for key, secret in ((s3_server.access_key, "wrong-secret"), ("NOSUCHKEY", "x")):
        with pytest.raises(ClientError) as err:
            s3_server.client(key, secret).list_buckets()
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_s3_source_downloads_syncs_and_prepares(s3_env, tmp_path: Path) -> None:
    client = s3_env.client()
    client.create_bucket(Bucket="pilamim-images")
    tree = make_tree(tmp_path / "tree", {"cat": 4, "dog": 3}, mode="RGB")
    upload_tree(client, "pilamim-images", "sets/pets", tree)
    client.put_object(Bucket="pilamim-images", Key="sets/pets2/cat/other.png", Body=b"x")
    raw = tmp_path / "raw"
    params = DataParams(source="s3://pilamim-images/sets/pets", raw_dir=str(raw),
                        out_dir=str(tmp_path / "prepared"))

    root = materialize(params)
    assert root == raw / "s3" / "pilamim-images" / "sets" / "pets"
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")) == sorted(
        p.relative_to(tree).as_posix() for p in tree.rglob("*.png"))
    assert (root / "cat" / "img_000.png").read_bytes() == (tree / "cat/img_000.png").read_bytes()
    assert len(json.loads((root / S3_STATE).read_text())) == 7

    # Rerun: unchanged files are not rewritten; a changed object is; a deleted one goes.
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    new_dog = png_bytes(np.full((8, 8, 3), 7, np.uint8))
    client.put_object(Bucket="pilamim-images", Key="sets/pets/dog/img_000.png", Body=new_dog)
    client.delete_object(Bucket="pilamim-images", Key="sets/pets/cat/img_003.png")
    materialize(params)
    assert (root / "dog" / "img_000.png").read_bytes() == new_dog
    assert not (root / "cat" / "img_003.png").exists()
    for path, stamp in stamps.items():
        if path.name != "img_000.png" or path.parent.name != "dog":
            assert not path.exists() or path.stat().st_mtime_ns == stamp, path

    prepared = prepare(params)
    assert prepared.classes == ["cat", "dog"]
    assert prepared.channels == 3 and len(prepared.records) == 6


def test_s3_wrong_credentials_name_the_endpoint(s3_env, tmp_path, monkeypatch) -> None:
    s3_env.client().create_bucket(Bucket="pilamim-creds")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    params = DataParams(source="s3://pilamim-creds/x", raw_dir=str(tmp_path))
    with pytest.raises(DataError, match="rejected the credentials") as err:
        materialize(params)
    assert s3_env.endpoint_url in str(err.value)


def test_s3_missing_bucket_and_empty_prefix(s3_env, tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist") as err:
        materialize(DataParams(source="s3://no-such-bucket/x", raw_dir=str(tmp_path)))
    assert s3_env.endpoint_url in str(err.value)
    s3_env.client().create_bucket(Bucket="pilamim-empty")
    with pytest.raises(DataError, match="no objects under s3://pilamim-empty/nothing"):
        materialize(DataParams(source="s3://pilamim-empty/nothing", raw_dir=str(tmp_path)))


@pytest.mark.parametrize("shape", [(28, 28), (1, 5), (7, 3)])
def test_encode_gray_png_decodes_to_the_same_pixels(shape) -> None:
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    with Image.open(io.BytesIO(encode_gray_png(array))) as img:
        img.load()
        assert img.mode == "L"
        np.testing.assert_array_equal(np.asarray(img), array)
    with pytest.raises(ValueError, match="2-D uint8"):
        encode_gray_png(array.astype(np.int16))
