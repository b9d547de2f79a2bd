"""data.max_side: large images are stored as JPEGs of that longer side, the rest unchanged."""

import io
import json

import numpy as np
from PIL import Image

from pilamim.data.reencode import fit_max_side


def _encoded(array, fmt, **options):
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt, **options)  # mode from shape and dtype
    return out.getvalue()


def _smooth(height, width, channels):
    y, x = np.mgrid[0:height, 0:width]
    planes = [(x * 255 // width), (y * 255 // height), ((x + y) * 127 // (width + height))]
    return np.stack(planes[:channels], axis=-1).astype(np.uint8).squeeze()


def test_an_image_within_the_bound_keeps_its_bytes():
    data = _encoded(_smooth(40, 64, 3), "JPEG", quality=95)
    assert fit_max_side(data, 64, 90) is data
    assert fit_max_side(data, None, 90) is data


def test_a_larger_image_becomes_a_jpeg_of_the_bound_the_same_every_time():
    data = _encoded(_smooth(300, 200, 3), "PNG")
    small = fit_max_side(data, 96, 90)
    assert small == fit_max_side(data, 96, 90)
    with Image.open(io.BytesIO(small)) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (64, 96))
        # the picture survives: it matches the original resized, up to JPEG error
        want = np.asarray(Image.open(io.BytesIO(data)).resize((64, 96)), dtype=np.float64)
        assert np.abs(np.asarray(img, dtype=np.float64) - want).mean() < 4
    assert len(fit_max_side(data, 96, 50)) < len(small)  # quality is used


def test_gray_sixteen_bit_and_alpha_images_become_8_bit_gray_and_rgb():
    deep = (_smooth(120, 90, 1).astype(np.uint16) * 257)
    with Image.open(io.BytesIO(fit_max_side(_encoded(deep, "PNG"), 60, 90))) as img:
        assert (img.mode, img.size) == ("L", (45, 60))
        assert 200 < np.asarray(img).max() <= 255  # scaled, not clipped white
    rgba = np.dstack([_smooth(80, 80, 3), np.full((80, 80), 128, np.uint8)])
    with Image.open(io.BytesIO(fit_max_side(_encoded(rgba, "PNG"), 40, 90))) as img:
        assert (img.mode, img.size) == ("RGB", (40, 40))


def test_prepare_stores_large_images_at_max_side_and_small_ones_unchanged(tmp_path):
    """Through prepare and the shard reader: what the loaders get, what is recorded."""
    from pilamim.config import DataParams
    from pilamim.data.prepare import prepare
    from pilamim.data.shard_reader import ShardReader, verify_shards
    from tests.data.helpers import make_tree

    source = make_tree(tmp_path / "src", {"a": 6, "b": 6}, mode="RGB", size=(90, 120))
    make_tree(source, {"a": 2, "b": 2}, mode="RGB", size=(30, 20), seed=1)  # img_000..001
    params = dict(source=str(source), raw_dir=str(tmp_path / "raw"), workers=1)
    plain = prepare(DataParams(out_dir=str(tmp_path / "plain"), **params))
    small = prepare(DataParams(out_dir=str(tmp_path / "small"), max_side=48, **params))
    again = prepare(DataParams(out_dir=str(tmp_path / "again"), max_side=48, **params))
    verify_shards(small)
    assert small.digest == again.digest != plain.digest
    assert small.records == plain.records  # the manifest names the source files and hashes
    info = json.loads((tmp_path / "small" / "dataset.json").read_text())["shards"]
    assert (info["max_side"], info["jpeg_quality"]) == (48, 90)
    kept = shrunk = 0
    for split in ("train", "val", "test"):
        reader = ShardReader(small, split)
        for index in range(len(reader)):
            item = reader.item(index)
            with Image.open(source / item["path"]) as original, \
                    Image.open(io.BytesIO(item["image"])) as stored:
                if max(original.size) <= 48:
                    assert item["image"] == (source / item["path"]).read_bytes()
                    kept += 1
                else:
                    assert (stored.format, max(stored.size)) == ("JPEG", 48)
                    shrunk += 1
    assert kept == 4 and shrunk == 8
