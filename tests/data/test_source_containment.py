"""Sources never reach outside themselves; a fetch never writes outside its inventory folder.

Local folders with links, names that would climb out of ``raw_dir`` (``..``, ``/``, empty
parts), and inventory folders holding links to elsewhere; S3 cases run against the real
SeaweedFS server. Every test also checks that nothing already saved outside changed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pilamim.config import DataParams
from pilamim.data.errors import DataError
from pilamim.data.fetch_report import FETCH_REPORT
from pilamim.data.inventory import INVENTORY
from pilamim.data.local_source import LINK_BROKEN, LINK_FOLDER, LINK_OUTSIDE
from pilamim.data.s3_source import RESERVED, _list_objects
from pilamim.data.source_files import open_files
from pilamim.data.sources import image_root, materialize
from tests.data.helpers import listing, make_tree, snapshot, upload_tree


def _linked_source(tmp_path: Path) -> tuple[Path, Path]:
    """``imgs/{cat,dog}`` plus ``secret/`` beside it, and links from inside ``imgs``:

    ``cat/leak.png`` -> ``secret/secret.png`` (a file outside), ``bird`` -> ``secret`` (a
    folder outside), ``dog/again.png`` -> ``cat/img_000.png`` (a file inside) and
    ``dog/gone.png`` -> nothing.
    """
    root = make_tree(tmp_path / "imgs", {"cat": 3, "dog": 3})
    secret = make_tree(tmp_path / "secret", {"x": 1}) / "x"
    (secret / "img_000.png").rename(secret / "secret.png")
    (root / "cat" / "leak.png").symlink_to(secret / "secret.png")
    (root / "bird").symlink_to(secret, target_is_directory=True)
    (root / "dog" / "again.png").symlink_to(Path("..") / "cat" / "img_000.png")
    (root / "dog" / "gone.png").symlink_to(root / "dog" / "no-such-file.png")
    return root, secret


def test_links_leading_outside_a_local_source_are_left_out_and_listed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, secret = _linked_source(tmp_path)
    outside = snapshot(secret)
    params = DataParams(source=str(root), raw_dir=str(tmp_path / "raw"))
    with caplog.at_level(logging.WARNING):
        inventory_dir = materialize(params)
    files = open_files(params)

    assert listing(files) == {"cat": ["cat/img_000.png", "cat/img_001.png", "cat/img_002.png"],
                              "dog": ["dog/again.png", "dog/img_000.png", "dog/img_001.png",
                                      "dog/img_002.png"]}
    # a link whose target stays inside is read as its target, never followed at read time
    assert files.read("dog/again.png") == (root / "cat" / "img_000.png").read_bytes()
    (root / "dog" / "again.png").unlink()
    (root / "dog" / "again.png").symlink_to(secret / "secret.png")
    assert files.read("dog/again.png") == (root / "cat" / "img_000.png").read_bytes()
    for rel in ("cat/leak.png", "bird/secret.png"):
        with pytest.raises(DataError, match="is not in"):
            files.read(rel)
    assert "secret" not in (inventory_dir / INVENTORY).read_text()
    assert (secret / "secret.png").stat().st_nlink == 1, "outside file hard-linked into raw"

    skipped = [{"path": "bird", "reason": LINK_FOLDER},
               {"path": "cat/leak.png", "reason": LINK_OUTSIDE},
               {"path": "dog/gone.png", "reason": LINK_BROKEN}]
    assert files.report().skipped == skipped
    assert json.loads((inventory_dir / FETCH_REPORT).read_text())["skipped"] == skipped
    assert "cat/leak.png" in caplog.text and "outside the source folder" in caplog.text
    assert snapshot(secret) == outside


@pytest.mark.parametrize("source", [
    "/", "{tmp}/imgs/..", "s3://bucket/sets/../..", "s3://bucket/..", "s3://../x",
    "s3://bucket//etc", "s3://bucket/sets//pets", "s3://bucket/./pets",
])
def test_names_that_would_leave_raw_dir_are_refused(tmp_path: Path, source: str) -> None:
    source = source.format(tmp=tmp_path)
    with pytest.raises(DataError) as err:
        image_root(DataParams(source=source, raw_dir=str(tmp_path / "raw")))
    message = str(err.value)
    assert repr(source) in message and "outside" in message
    assert "e.g." in message  # says what to write instead


def test_local_source_ending_in_dotdot_touches_nothing(tmp_path: Path) -> None:
    """``<folder>/..`` would make ``raw_dir`` itself (or its parent) the inventory folder."""
    raw = tmp_path / "raw"
    make_tree(raw / "local" / "other", {"a": 1})
    make_tree(tmp_path / "imgs", {"cat": 1})
    before = snapshot(raw)
    source = str(tmp_path / "imgs" / "cat" / "..")
    with pytest.raises(DataError, match="has a '..' part") as err:
        materialize(DataParams(source=source, raw_dir=str(raw)))
    assert repr(source) in str(err.value)
    assert snapshot(raw) == before


def test_local_source_holding_raw_dir_or_inside_it_is_refused(tmp_path: Path) -> None:
    make_tree(tmp_path / "project" / "cat", {"x": 1})
    raw = tmp_path / "project" / "data" / "raw"
    make_tree(raw / "local" / "old", {"a": 1})
    before = snapshot(tmp_path / "project")
    with pytest.raises(DataError, match="overlaps its inventory folder"):
        materialize(DataParams(source=str(tmp_path / "project"), raw_dir=str(raw)))
    with pytest.raises(DataError, match="overlaps its inventory folder"):
        materialize(DataParams(source=str(raw / "local" / "old"), raw_dir=str(raw)))
    assert snapshot(tmp_path / "project") == before


def _plant_links(inventory_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Links to elsewhere where a fetch writes (its two files) and where a mirror used to
    (a class folder); returns the outside folder and the file the links point at."""
    outside = make_tree(tmp_path / "elsewhere", {"x": 2}, seed=5) / "x"  # has img_000.png too
    inventory_dir.mkdir(parents=True)
    (inventory_dir / "cat").symlink_to(outside, target_is_directory=True)
    for name in (INVENTORY, FETCH_REPORT):
        (inventory_dir / name).symlink_to(outside / "img_000.png")
    return outside, outside / "img_000.png"


def test_local_fetch_never_writes_through_a_link(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imgs", {"cat": 2})
    inventory_dir = tmp_path / "raw" / "local" / "imgs"
    outside, _ = _plant_links(inventory_dir, tmp_path)
    before = snapshot(outside)
    params = DataParams(source=str(root), raw_dir=str(tmp_path / "raw"))
    materialize(params)
    assert snapshot(outside) == before
    assert not (inventory_dir / INVENTORY).is_symlink()
    assert not (inventory_dir / FETCH_REPORT).is_symlink()
    assert open_files(params).files("cat") == ["cat/img_000.png", "cat/img_001.png"]


# ----------------------------------------------------------------------------- S3


def test_s3_prefix_with_dotdot_is_refused_before_anything_is_written(
        s3_env, tmp_path: Path) -> None:
    client = s3_env.client()
    client.create_bucket(Bucket="pilamim-dotdot")
    upload_tree(client, "pilamim-dotdot", "sets/pets", make_tree(tmp_path / "t", {"cat": 2}))
    raw = tmp_path / "raw"
    make_tree(raw / "s3" / "other-bucket", {"cat": 1})
    make_tree(raw / "local" / "imgs", {"dog": 1})
    before = snapshot(raw)
    source = "s3://pilamim-dotdot/sets/pets/../../.."
    with pytest.raises(DataError, match="has a '..' part") as err:
        materialize(DataParams(source=source, raw_dir=str(raw)))
    assert repr(source) in str(err.value)
    assert snapshot(raw) == before


def test_s3_fetch_never_writes_through_a_link(s3_env, tmp_path: Path) -> None:
    client = s3_env.client()
    client.create_bucket(Bucket="pilamim-linked")
    upload_tree(client, "pilamim-linked", "pets", make_tree(tmp_path / "t", {"cat": 2}))
    inventory_dir = tmp_path / "raw" / "s3" / "pilamim-linked" / "pets"
    outside, _ = _plant_links(inventory_dir, tmp_path)
    before = snapshot(outside)
    materialize(DataParams(source="s3://pilamim-linked/pets", raw_dir=str(tmp_path / "raw")))
    assert snapshot(outside) == before
    assert not (inventory_dir / INVENTORY).is_symlink()


def test_s3_object_named_like_a_bookkeeping_file_is_refused(s3_env, tmp_path: Path) -> None:
    client = s3_env.client()
    client.create_bucket(Bucket="pilamim-reserved")
    upload_tree(client, "pilamim-reserved", "pets", make_tree(tmp_path / "t", {"cat": 1}))
    raw = tmp_path / "raw"
    for name in sorted(RESERVED):
        client.put_object(Bucket="pilamim-reserved", Key=f"pets/{name}", Body=b"{}")
        with pytest.raises(DataError, match="bookkeeping file"):
            materialize(DataParams(source="s3://pilamim-reserved/pets", raw_dir=str(raw)))
        assert not (raw / "s3").exists()
        client.delete_object(Bucket="pilamim-reserved", Key=f"pets/{name}")


class _Listing:
    """A stand-in S3 client that lists the given keys: SeaweedFS refuses keys with ``.`` and
    ``..`` parts (InvalidRequest) and folds ``//``, but AWS S3 stores them as they are."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def get_paginator(self, name: str):
        return self

    def paginate(self, Bucket: str, Prefix: str):  # noqa: N803 - boto3's spelling
        return [{"Contents": [{"Key": k, "ETag": "e", "Size": 1} for k in self.keys
                              if k.startswith(Prefix)]}]


@pytest.mark.parametrize("key", [
    "sets/pets/../../escape.png", "sets/pets/cat/./x.png", "sets/pets//abs.png",
    "sets/pets/cat//x.png", "sets/pets/..",
])
def test_s3_keys_that_are_not_plain_paths_are_refused(key: str) -> None:
    client = _Listing(["sets/pets/cat/ok.png", key])
    with pytest.raises(DataError, match="rename or delete that object") as err:
        _list_objects(client, "b", "sets/pets/", frozenset())
    assert repr(key.removeprefix("sets/pets/")) in str(err.value)


def test_s3_empty_class_folder_is_reported(s3_env, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    client = s3_env.client()
    client.create_bucket(Bucket="pilamim-emptyclass")
    upload_tree(client, "pilamim-emptyclass", "pets",
                make_tree(tmp_path / "t", {"cat": 3, "dog": 3}))
    client.put_object(Bucket="pilamim-emptyclass", Key="pets/bird/", Body=b"")
    params = DataParams(source="s3://pilamim-emptyclass/pets", raw_dir=str(tmp_path / "raw"))
    with caplog.at_level(logging.WARNING):
        inventory_dir = materialize(params)
    files = open_files(params)
    assert files.classes() == ["cat", "dog"]
    assert files.report().empty_classes == ["bird"]
    assert "bird" in caplog.text
    assert json.loads((inventory_dir / FETCH_REPORT).read_text())["empty_classes"] == ["bird"]
