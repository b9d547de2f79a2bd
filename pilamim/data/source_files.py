"""What ``prepare`` sees of a fetched source: class folders, their files, each file's bytes.

``prepare`` reads every image exactly once, in worker processes, one task per shard range; it
never needs the source as a local folder. So a source is a listing plus a ``read``: a local
image folder read in place, an ``s3://`` prefix read object by object, or the bundled subset
encoded on demand. The listing is the inventory ``pilamim fetch`` wrote
(:mod:`pilamim.data.inventory`), and ``read`` refuses a file that no longer matches it, so
``prepare`` never shards bytes the fetch (and DVC) did not see. Implementations are picklable
(they go to worker processes) and open clients and parse the listing lazily, once per process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pilamim.config import DataParams
from pilamim.data.embedded_source import EmbeddedFiles
from pilamim.data.errors import DataError
from pilamim.data.fetch_report import FetchReport
from pilamim.data.inventory import INVENTORY, read_header
from pilamim.data.local_source import LocalFiles
from pilamim.data.s3_source import S3Files
from pilamim.data.sources import image_root, source_kind


class SourceFiles(Protocol):
    """A fetched source, as ``prepare`` reads it."""

    source: str  # ``data.source``, named in messages

    def classes(self) -> list[str]:
        """Class folder names, sorted (hidden ones excluded)."""

    def files(self, class_name: str) -> list[str]:
        """Every non-hidden file below a class folder: sorted, root-relative POSIX paths."""

    def size(self, rel: str) -> int:
        """The file's size in bytes as the fetch recorded it (plans shard ranges by bytes)."""

    def read(self, rel: str) -> bytes:
        """The file's bytes. Raises :class:`DataError` naming ``rel`` when the file changed or
        went missing since the fetch (``prepare`` must never shard bytes the fetch did not see)."""

    def report(self) -> FetchReport:
        """What the fetch left out (links outside the source, empty class folders)."""


def open_files(params: DataParams) -> SourceFiles:
    """The fetched files of ``params.source``, from the inventory ``pilamim fetch`` wrote."""
    root = image_root(params)
    stamp, header = read_header(root / INVENTORY)
    kind = source_kind(params.source)
    if header.get("kind") != kind:
        raise DataError(f"{root / INVENTORY} lists a {header.get('kind')} source, not "
                        f"data.source {params.source!r}; run `pilamim fetch` again")
    if kind == "embedded":
        idx_dir = params.embedded_idx_dir
        return EmbeddedFiles(root, params.source, stamp, header,
                             Path(idx_dir).expanduser().absolute() if idx_dir else None)
    if kind == "s3":
        return S3Files(root, params.source, stamp, header)
    return LocalFiles(root, params.source, stamp, header)
