"""Small builders for test data: image folders, broken images, IDX files."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

IDX_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """Write ``array`` in IDX format (big-endian for multi-byte types)."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = bytes([0, 0, IDX_TYPE_CODES[dtype], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(dtype).tobytes()
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def random_image(rng: np.random.Generator, mode: str = "L", size=(20, 24)) -> np.ndarray:
    """A random uint8 image of ``size`` (height, width); 3 channels for RGB."""
    shape = size if mode == "L" else (*size, 3)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def make_tree(
    root: Path,
    per_class: dict[str, int],
    mode: str = "L",
    seed: int = 0,
    size=(20, 24),
    suffix: str = ".png",
) -> Path:
    """``root/<class>/img_<i>.png`` with random pixels; returns ``root``."""
    rng = np.random.default_rng(seed)
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = Image.fromarray(random_image(rng, mode, size))
            image.save(root / name / f"img_{i:03d}{suffix}")
    return root


def add_broken_images(folder: Path) -> tuple[Path, Path]:
    """Put one undecodable and one truncated PNG into ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(b"this is not an image at all" * 10)
    truncated = folder / "truncated.png"
    whole = png_bytes(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8))
    truncated.write_bytes(whole[: len(whole) // 2])
    return corrupt, truncated


def huge_blank_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 8-bit gray PNG of ``width`` x ``height`` that is tiny on disk.

    Written row by row through one zlib stream, so even a decompression bomb (90 megapixels)
    takes a fraction of a second and a few kilobytes of memory to make.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then black pixels
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
                     + chunk(b"IEND", b""))
    return path


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every entry below ``folder`` (links not followed) -> (kind or content hash, mtime_ns).

    Comparing two snapshots shows whether anything there was written, deleted or replaced.
    """
    found = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            what = f"link->{os.readlink(path)}"
        elif path.is_dir():
            what = "dir"
        else:
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        found[path.relative_to(folder).as_posix()] = (what, st.st_mtime_ns)
    return found


def upload_tree(client, bucket: str, prefix: str, tree: Path) -> list[str]:
    """Put every file below ``tree`` into ``bucket`` as ``<prefix>/<relative path>``."""
    keys = []
    for path in sorted(p for p in tree.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(tree).as_posix()}"
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        keys.append(key)
    return keys


def read_all(files) -> dict[str, str]:
    """sha256 of every file a :class:`~pilamim.data.source_files.SourceFiles` lists, read through
    it (module level: a spawned worker process runs it on the unpickled object)."""
    return {rel: hashlib.sha256(files.read(rel)).hexdigest()
            for name in files.classes() for rel in files.files(name)}


def listing(files) -> dict[str, list[str]]:
    """class -> its files, as a :class:`~pilamim.data.source_files.SourceFiles` lists them."""
    return {name: files.files(name) for name in files.classes()}
