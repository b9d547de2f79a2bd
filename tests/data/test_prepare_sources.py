"""prepare() reads every kind of source from the fetch's inventory: what the fetch left out is
reported (or refused), and a file that changed since the fetch is named, never sharded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pilamim.config import DataParams
from pilamim.data.errors import DataError
from pilamim.data.local_source import LINK_BROKEN, LINK_FOLDER, LINK_OUTSIDE
from pilamim.data.prepare import prepare
from pilamim.data.sources import materialize
from tests.data.helpers import make_tree, png_bytes, snapshot, upload_tree
from tests.data.test_source_containment import _linked_source


def test_what_the_fetch_left_out_is_listed(tmp_path: Path) -> None:
    root, _ = _linked_source(tmp_path)
    params = DataParams(source=str(root), raw_dir=str(tmp_path / "raw"),
                        out_dir=str(tmp_path / "out"))
    prepared = prepare(params)
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["skipped"] == [{"path": "bird", "reason": LINK_FOLDER},
                               {"path": "cat/leak.png", "reason": LINK_OUTSIDE},
                               {"path": "dog/gone.png", "reason": LINK_BROKEN}]
    paths = {r.path for r in prepared.records}
    assert "cat/leak.png" not in paths and "dog/again.png" in paths


def test_what_the_fetch_left_out_fails_a_strict_run(tmp_path: Path) -> None:
    root, secret = _linked_source(tmp_path)
    outside = snapshot(secret)
    params = DataParams(source=str(root), raw_dir=str(tmp_path / "raw"),
                        out_dir=str(tmp_path / "out"), bad_images="fail")
    with pytest.raises(DataError, match="data.bad_images: fail") as err:
        prepare(params)
    assert "cat/leak.png: symbolic link pointing outside the source folder" in str(err.value)
    assert "bird: symbolic link to a folder" in str(err.value)
    assert not (tmp_path / "out").exists()
    assert snapshot(secret) == outside


def test_a_local_image_changed_after_fetch_is_named(tmp_path: Path) -> None:
    check_a_changed_local_image_is_named(tmp_path)


def check_a_changed_local_image_is_named(tmp_path: Path, **changes) -> None:
    """A file changed between fetch and prepare stops prepare (run with ``changes`` to the
    params, e.g. on a Dask cluster), naming the file, with nothing written."""
    root = make_tree(tmp_path / "imgs", {"a": 4, "b": 4})
    params = DataParams(source=str(root), raw_dir=str(tmp_path / "raw"),
                        out_dir=str(tmp_path / "out"), **changes)
    materialize(params)
    changed = root / "b" / "img_002.png"
    changed.write_bytes(png_bytes(np.full((20, 24), 9, np.uint8)))
    os.utime(changed, ns=(1, 1))
    with pytest.raises(DataError, match="pilamim fetch") as err:
        prepare(params, fetch=False)
    assert "b/img_002.png" in str(err.value)
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_an_s3_source_prepares_without_a_copy_and_names_a_changed_object(
        s3_env, tmp_path: Path) -> None:
    client = s3_env.client()
    client.create_bucket(Bucket="pilamim-prep-s3")
    upload_tree(client, "pilamim-prep-s3", "pets",
                make_tree(tmp_path / "t", {"cat": 3, "dog": 3}, mode="RGB"))
    client.put_object(Bucket="pilamim-prep-s3", Key="pets/bird/", Body=b"")
    params = DataParams(source="s3://pilamim-prep-s3/pets", raw_dir=str(tmp_path / "raw"),
                        out_dir=str(tmp_path / "out"))
    prepared = prepare(params)
    assert prepared.classes == ["cat", "dog"] and prepared.channels == 3
    assert len(prepared.records) == 6
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["empty_classes"] == ["bird"]
    assert not list((tmp_path / "raw").rglob("*.png"))  # the fetch copied no image

    client.put_object(Bucket="pilamim-prep-s3", Key="pets/dog/img_001.png",
                      Body=png_bytes(np.full((8, 8, 3), 7, np.uint8)))
    with pytest.raises(DataError, match="pilamim fetch") as err:
        prepare(params, fetch=False)
    assert "s3://pilamim-prep-s3/pets/dog/img_001.png" in str(err.value)
