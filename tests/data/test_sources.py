"""fetch writes an inventory, never a copy, and open_files reads each file through it: bundled
subset, full IDX files, local folders, S3 (real SeaweedFS)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from botocore.exceptions import ClientError
from PIL import Image

from pilamim.config import DataParams
from pilamim.data import s3_source
from pilamim.data.embedded import SUBSET_PATH
from pilamim.data.errors import DataError
from pilamim.data.fetch_report import FETCH_REPORT
from pilamim.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES
from pilamim.data.inventory import INVENTORY
from pilamim.data.source_files import open_files
from pilamim.data.sources import encode_gray_png, materialize
from tests.data.helpers import listing, make_tree, png_bytes, read_all, upload_tree, write_idx
from tests.servers.seaweedfs import free_ports


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def stamp(path: Path) -> tuple[bytes, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_ino, st.st_mtime_ns


# ----------------------------------------------------------------------------- embedded


def test_embedded_writes_only_an_inventory(embedded: dict) -> None:
    root, raw = embedded["root"], embedded["raw_dir"]
    assert root == raw / "fashion-mnist"
    assert files_under(raw) == [f"fashion-mnist/{INVENTORY}"]
    files = open_files(DataParams(raw_dir=str(raw)))
    found = listing(files)
    assert list(found) == sorted(FASHION_MNIST_CLASSES)
    assert {name: len(rels) for name, rels in found.items()} == {
        name: 1200 for name in FASHION_MNIST_CLASSES}
    assert sum(rel.startswith("Bag/train_") for rel in found["Bag"]) == 1000
    assert found["Bag"] == sorted(found["Bag"])
    assert files.report().skipped == [] and files.report().empty_classes == []


def test_embedded_refetch_rewrites_nothing(embedded: dict) -> None:
    inventory = embedded["root"] / INVENTORY
    before = stamp(inventory)
    assert materialize(DataParams(raw_dir=str(embedded["raw_dir"]))) == embedded["root"]
    assert stamp(inventory) == before


def test_embedded_read_gives_the_png_files_fetch_used_to_write(embedded: dict) -> None:
    files = open_files(DataParams(raw_dir=str(embedded["raw_dir"])))
    with np.load(SUBSET_PATH) as z:
        classes = [str(c) for c in z["classes"]]
        for split in ("train", "test"):
            images, labels, index = (z[f"{split}_{k}"] for k in ("images", "labels", "index"))
            for row in (0, 7, len(labels) - 1):
                rel = f"{classes[labels[row]]}/{split}_{int(index[row]):05d}.png"
                expected = encode_gray_png(images[row])
                assert files.read(rel) == expected
                assert files.size(rel) == len(expected)
                with Image.open(io.BytesIO(files.read(rel))) as img:
                    np.testing.assert_array_equal(np.asarray(img), images[row])
    with pytest.raises(DataError, match="is not in"):
        files.read("Bag/train_99999.png")


def _idx_dir(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 5)):
        images_name, labels_name = FASHION_MNIST_FILES[split]
        write_idx(folder / images_name, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / labels_name, (np.arange(n) % 10).astype(np.uint8))
    return folder


def test_embedded_idx_dir_uses_the_full_files(tmp_path: Path) -> None:
    idx_dir = _idx_dir(tmp_path / "idx")
    params = DataParams(raw_dir=str(tmp_path / "raw"), embedded_idx_dir=str(idx_dir))
    root = materialize(params)
    assert root == tmp_path / "raw" / "fashion-mnist-full"
    files = open_files(params)
    assert sum(len(rels) for rels in listing(files).values()) == 17
    assert files.files("T-shirt_top") == [
        "T-shirt_top/test_00000.png", "T-shirt_top/train_00000.png", "T-shirt_top/train_00010.png"]
    with Image.open(io.BytesIO(files.read("Trouser/train_00011.png"))) as img:
        assert img.size == (28, 28) and img.mode == "L"
    # The bundled subset's inventory is another folder: switching keeps each.
    with pytest.raises(FileNotFoundError, match="run `pilamim fetch` first"):
        open_files(DataParams(raw_dir=str(tmp_path / "raw")))


def test_embedded_idx_files_changed_after_fetch_are_refused(tmp_path: Path) -> None:
    idx_dir = _idx_dir(tmp_path / "idx")
    params = DataParams(raw_dir=str(tmp_path / "raw"), embedded_idx_dir=str(idx_dir))
    materialize(params)
    images_name = FASHION_MNIST_FILES["train"][0]
    write_idx(idx_dir / images_name, np.zeros((12, 28, 28), np.uint8))
    with pytest.raises(DataError, match="changed since `pilamim fetch`") as err:
        open_files(params).read("Trouser/train_00001.png")
    assert "run `pilamim fetch` again" in str(err.value)
    materialize(params)
    assert open_files(params).read("Trouser/train_00001.png") == encode_gray_png(
        np.zeros((28, 28), np.uint8))


def test_embedded_idx_dir_without_files_is_a_clear_error(tmp_path: Path) -> None:
    params = DataParams(raw_dir=str(tmp_path / "raw"), embedded_idx_dir=str(tmp_path))
    with pytest.raises(DataError, match="four Fashion-MNIST gzip IDX files"):
        materialize(params)


# ----------------------------------------------------------------------------- local


def test_local_folder_is_listed_not_copied(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imgs", {"cat": 2, "dog": 1})
    (root / "cat" / "sub").mkdir()
    (root / "cat" / "sub" / "deep.png").write_bytes(b"deep")
    for hidden in ("cat/.DS_Store", "cat/.cache/x.png", ".hidden/x.png"):
        (root / hidden).parent.mkdir(parents=True, exist_ok=True)
        (root / hidden).write_bytes(b"h")
    (root / "notes.txt").write_text("top level: in no class")
    (root / "bird").mkdir()
    (root / "bird" / ".keep").write_bytes(b"")  # a class folder with hidden files only
    params = DataParams(source=str(root), raw_dir=str(tmp_path / "raw"))
    inventory_dir = materialize(params)
    assert inventory_dir == tmp_path / "raw" / "local" / "imgs"
    assert files_under(tmp_path / "raw") == [f"local/imgs/{name}"
                                             for name in (FETCH_REPORT, INVENTORY)]
    assert all(p.stat().st_nlink == 1 for p in root.rglob("*") if p.is_file())

    files = open_files(params)
    assert listing(files) == {
        "bird": [], "cat": ["cat/img_000.png", "cat/img_001.png", "cat/sub/deep.png"],
        "dog": ["dog/img_000.png"]}
    for rel in ("cat/img_001.png", "cat/sub/deep.png"):
        assert files.read(rel) == (root / rel).read_bytes()
        assert files.size(rel) == (root / rel).stat().st_size
    assert json.loads((inventory_dir / FETCH_REPORT).read_text()) == {"empty_classes": [],
                                                                      "skipped": []}
    before = stamp(inventory_dir / INVENTORY)
    materialize(params)
    assert stamp(inventory_dir / INVENTORY) == before


def test_local_file_changed_after_fetch_is_refused(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imgs", {"cat": 3})
    params = DataParams(source=str(root), raw_dir=str(tmp_path / "raw"))
    materialize(params)
    files = open_files(params)
    changed, gone, linked = (root / "cat" / f"img_00{i}.png" for i in range(3))
    changed.write_bytes(changed.read_bytes()[::-1])  # same size, new bytes and mtime
    gone.unlink()
    original = linked.read_bytes()
    linked.unlink()
    (tmp_path / "elsewhere.png").write_bytes(original)
    os.utime(tmp_path / "elsewhere.png", ns=(0, 0))
    linked.symlink_to(tmp_path / "elsewhere.png")
    for path, why in ((changed, "changed since"), (gone, "gone"), (linked, "no longer a plain")):
        with pytest.raises(DataError, match=why) as err:
            files.read(path.relative_to(root).as_posix())
        assert str(path) in str(err.value) and "run `pilamim fetch` again" in str(err.value)
    materialize(params)
    assert listing(open_files(params)) == {"cat": ["cat/img_000.png"]}
    assert open_files(params).read("cat/img_000.png") == changed.read_bytes()


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
    (tmp_path / "hollow" / "cat").mkdir(parents=True)  # class folders, but not one file
    with pytest.raises(DataError, match="no class subfolders"):
        materialize(DataParams(source=str(tmp_path / "hollow"), raw_dir=str(tmp_path / "raw")))


def test_never_fetched_names_the_fix(tmp_path: Path) -> None:
    params = DataParams(source=str(tmp_path / "imgs"), raw_dir=str(tmp_path / "raw"))
    with pytest.raises(FileNotFoundError, match="run `pilamim fetch` first"):
        open_files(params)


# ----------------------------------------------------------------------------- S3


def test_seaweedfs_rejects_wrong_credentials(s3_server) -> None:
    s3_server.client().list_buckets()
    for key, secret in ((s3_server.access_key, "wrong-secret"), ("NOSUCHKEY", "x")):
        with pytest.raises(ClientError) as err:
            s3_server.client(key, secret).list_buckets()
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_s3_source_is_listed_and_read_without_downloading(s3_env, tmp_path: Path) -> None:
    client = s3_env.client()
    client.create_bucket(Bucket="pilamim-images")
    tree = make_tree(tmp_path / "tree", {"cat": 4, "dog": 3}, mode="RGB")
    upload_tree(client, "pilamim-images", "sets/pets", tree)
    client.put_object(Bucket="pilamim-images", Key="sets/pets2/cat/other.png", Body=b"x")
    client.put_object(Bucket="pilamim-images", Key="sets/pets/cat/.hidden.png", Body=b"x")
    raw = tmp_path / "raw"
    params = DataParams(source="s3://pilamim-images/sets/pets", raw_dir=str(raw))

    root = materialize(params)
    assert root == raw / "s3" / "pilamim-images" / "sets" / "pets"
    assert files_under(raw) == [f"s3/pilamim-images/sets/pets/{name}"
                                for name in (FETCH_REPORT, INVENTORY)]
    files = open_files(params)
    assert listing(files) == {name: sorted(p.relative_to(tree).as_posix()
                                           for p in (tree / name).iterdir())
                              for name in ("cat", "dog")}
    assert files.read("cat/img_000.png") == (tree / "cat/img_000.png").read_bytes()
    assert files.size("dog/img_002.png") == (tree / "dog/img_002.png").stat().st_size
    before = stamp(root / INVENTORY)
    materialize(params)
    assert stamp(root / INVENTORY) == before

    # Overwritten or deleted after the fetch: refused, naming the object; a fetch picks it up.
    new_dog = png_bytes(np.full((8, 8, 3), 7, np.uint8))
    client.put_object(Bucket="pilamim-images", Key="sets/pets/dog/img_000.png", Body=new_dog)
    client.delete_object(Bucket="pilamim-images", Key="sets/pets/cat/img_003.png")
    for rel, why in (("dog/img_000.png", "changed since"), ("cat/img_003.png", "is gone")):
        with pytest.raises(DataError, match=why) as err:
            files.read(rel)
        assert f"s3://pilamim-images/sets/pets/{rel}" in str(err.value)
        assert "run `pilamim fetch` again" in str(err.value)
    materialize(params)
    assert stamp(root / INVENTORY)[0] != before[0]
    again = open_files(params)
    assert again.read("dog/img_000.png") == new_dog
    assert "cat/img_003.png" not in again.files("cat")


def test_sources_pickle_into_a_spawned_process(s3_env, embedded: dict, tmp_path: Path) -> None:
    client = s3_env.client()
    client.create_bucket(Bucket="pilamim-pickle")
    tree = make_tree(tmp_path / "tree", {"cat": 2, "dog": 2})
    upload_tree(client, "pilamim-pickle", "pets", tree)
    expected = {p.relative_to(tree).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in tree.rglob("*.png")}
    subset = DataParams(raw_dir=str(embedded["raw_dir"]))
    sources = [DataParams(source="s3://pilamim-pickle/pets", raw_dir=str(tmp_path / "raw")),
               DataParams(source=str(tree), raw_dir=str(tmp_path / "raw"))]
    for params in sources:
        materialize(params)
    opened = [open_files(p) for p in (*sources, subset)]
    for files in opened:  # a live client and a parsed listing stay in this process
        files.read(files.files("cat" if files is not opened[-1] else "Bag")[0])
    assert all(len(pickle.dumps(files)) < 2000 for files in opened)
    copies = [pickle.loads(pickle.dumps(files)) for files in opened]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        s3_read, local_read, subset_read = pool.map(read_all, copies)
    assert s3_read == expected and local_read == expected
    assert len(subset_read) == 12_000 and subset_read == read_all(open_files(subset))


def test_s3_wrong_credentials_name_the_endpoint(s3_env, tmp_path, monkeypatch) -> None:
    client = s3_env.client()
    client.create_bucket(Bucket="pilamim-creds")
    upload_tree(client, "pilamim-creds", "x", make_tree(tmp_path / "t", {"cat": 1}))
    params = DataParams(source="s3://pilamim-creds/x", raw_dir=str(tmp_path / "raw"))
    materialize(params)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(DataError, match="rejected the credentials") as err:
        materialize(params)
    assert s3_env.endpoint_url in str(err.value)
    with pytest.raises(DataError, match="rejected the credentials") as err:
        open_files(params).read("cat/img_000.png")
    assert s3_env.endpoint_url in str(err.value)
    assert "not-the-secret" not in str(err.value) and s3_env.secret_key not in str(err.value)


def test_s3_unreachable_endpoint_is_retried_then_named(s3_env, tmp_path, monkeypatch,
                                                       caplog) -> None:
    client = s3_env.client()
    client.create_bucket(Bucket="pilamim-down")
    upload_tree(client, "pilamim-down", "x", make_tree(tmp_path / "t", {"cat": 1}))
    params = DataParams(source="s3://pilamim-down/x", raw_dir=str(tmp_path / "raw"))
    materialize(params)
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setattr(s3_source, "BACKOFF_S", 0.0)
    with caplog.at_level(logging.WARNING), pytest.raises(DataError) as err:
        open_files(params).read("cat/img_000.png")
    assert dead in str(err.value) and f"{s3_source.READ_TRIES} tries" in str(err.value)
    assert caplog.text.count("trying again") == s3_source.READ_TRIES - 1


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
