"""The inventory file: deterministic bytes, per-class blocks, and refused once replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pilamim.config import DataParams
from pilamim.data.errors import DataError
from pilamim.data.inventory import INVENTORY, load_inventory, read_header, write_inventory
from pilamim.data.source_files import open_files
from pilamim.data.sources import materialize
from tests.data.helpers import make_tree

ROWS = [["dog/b.png", 3, '"e2"'], ["a-b/x.png", 1, '"e0"'], ["dog/a.png", 2, '"e1"'],
        ["cat/\u00e9t\u00e9 \"1\".png", 4, '"e3"']]
HEADER = {"kind": "s3", "bucket": "b", "prefix": "", "classes": ["a-b", "cat", "dog"]}


def test_same_rows_any_order_give_the_same_bytes_once(tmp_path: Path) -> None:
    assert write_inventory(tmp_path, HEADER, ROWS)
    path = tmp_path / INVENTORY
    first, mtime = path.read_bytes(), path.stat().st_mtime_ns
    assert not write_inventory(tmp_path, HEADER, list(reversed(ROWS)))
    assert path.read_bytes() == first and path.stat().st_mtime_ns == mtime
    assert first.isascii() and b"time" not in first
    lines = first.decode().splitlines()
    assert [json.loads(line)[0] for line in lines[1:]] == sorted(r[0] for r in ROWS)


def test_blocks_hold_exactly_each_class_lines(tmp_path: Path) -> None:
    write_inventory(tmp_path, HEADER, ROWS)
    stamp, header = read_header(tmp_path / INVENTORY)
    assert set(header["blocks"]) == {"a-b", "cat", "dog"}
    inventory = load_inventory(tmp_path / INVENTORY, stamp)
    assert inventory.entries("dog") == {"dog/a.png": (2, '"e1"'), "dog/b.png": (3, '"e2"')}
    assert inventory.entries("cat") == {"cat/\u00e9t\u00e9 \"1\".png": (4, '"e3"')}
    assert inventory.entries("bird") == {}


def test_an_inventory_replaced_while_in_use_is_refused(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imgs", {"cat": 2, "dog": 1})
    params = DataParams(source=str(root), raw_dir=str(tmp_path / "raw"))
    materialize(params)
    files = open_files(params)
    (root / "dog" / "new.png").write_bytes(b"new")
    materialize(params)  # a new listing: the open one no longer describes the file on disk
    with pytest.raises(DataError, match="replaced or removed while in use"):
        files.files("cat")
    assert open_files(params).files("dog") == ["dog/img_000.png", "dog/new.png"]


def test_an_inventory_of_another_source_is_refused(tmp_path: Path) -> None:
    for name in ("a", "b"):
        make_tree(tmp_path / name / "imgs", {"cat": 1})
    raw = str(tmp_path / "raw")
    materialize(DataParams(source=str(tmp_path / "a" / "imgs"), raw_dir=raw))
    with pytest.raises(DataError, match="run `pilamim fetch` again"):
        open_files(DataParams(source=str(tmp_path / "b" / "imgs"), raw_dir=raw))
