"""Which data, encoder and protocol a stage's numbers belong to, and the checks that keep them
together.

A metric means something only next to what it measured: the data version (``dataset.json``'s
digest), the encoder (the sha256 of its weights) and the evaluation protocol (the stage's
params, paths and devices left out). Probe and fine-tune write these three into their
metrics files as ``lineage``; ``register`` refuses files that disagree with the encoder and
data on disk (stale or mixed metrics), and the promotion gate compares a version with the
champion only when both were measured on the same data and protocol.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pilamim.config import identity_values
from pilamim.io import file_sha256

LINEAGE_KEY = "lineage"
# Where a stage reads and writes, and on what hardware: not part of what a number means.
NOT_PROTOCOL = frozenset({"data_dir", "encoder_dir", "out_dir", "metrics_path", "plots_path",
                          "device", "num_workers", "seed"})


class LineageError(ValueError):
    """A stage's inputs come from different data, encoders or channel counts."""


def encoder_sha256(encoder_dir: str | Path) -> str:
    """The identity of an exported encoder: the hash of its weights file."""
    from pilamim.model.export import WEIGHTS

    return file_sha256(Path(encoder_dir) / WEIGHTS)


def eval_protocol(stage: str, group: BaseModel) -> str:
    """``<stage>:<12 hex>``: a hash of the params that change what the stage measures.

    Seeds are left out: a protocol says how a number is measured, not which random draw; so
    are options added later while at the value that reproduces the code before them
    (:data:`pilamim.config.ADDED_NEUTRAL`), so an upgrade keeps versions comparable.
    """
    values = {k: v for k, v in identity_values(stage, group.model_dump(mode="json")).items()
              if k not in NOT_PROTOCOL}
    text = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return f"{stage}:{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def eval_lineage(stage: str, group: BaseModel, dataset_digest: str,
                 encoder_dir: str | Path) -> dict[str, str]:
    """The ``lineage`` block an evaluation stage writes next to its numbers."""
    return {"dataset_digest": dataset_digest, "encoder_sha256": encoder_sha256(encoder_dir),
            "protocol": eval_protocol(stage, group)}


def check_encoder_fits_data(spec: Mapping[str, Any], encoder_dir: str | Path,
                            data_digest: str, channels: int, data_dir: str | Path,
                            stage: str) -> None:
    """Stop ``stage`` when the encoder was pretrained on other data or other channels.

    Evaluating an encoder on data it was not pretrained on is a different experiment (a
    transfer study), not this pipeline's numbers; rerunning pretrain makes them agree.
    """
    in_chans = int(spec["in_chans"])
    if in_chans != channels:
        raise LineageError(
            f"`pilamim {stage}`: the encoder in {encoder_dir} takes {in_chans}-channel images "
            f"but {data_dir} holds {channels}-channel images; rerun `pilamim pretrain` on this "
            f"data (or point {stage}.encoder_dir at an encoder trained on it)")
    trained_on = spec.get("dataset_digest")
    if trained_on != data_digest:
        raise LineageError(
            f"`pilamim {stage}`: the encoder in {encoder_dir} was pretrained on data "
            f"{_short(trained_on)} but {data_dir} holds data {_short(data_digest)}; rerun "
            f"`pilamim pretrain` (or `pilamim prepare` if the data changed by mistake)")


def check_metrics_lineage(path: str | Path, metrics: Mapping[str, Any], stage: str,
                          data_digest: str, encoder_sha: str) -> dict[str, str]:
    """The metrics file's lineage, after checking it measured this data and this encoder."""
    lineage = metrics.get(LINEAGE_KEY)
    if not isinstance(lineage, Mapping) or not {"dataset_digest", "encoder_sha256",
                                                "protocol"} <= set(lineage):
        raise LineageError(f"{path} does not say which data and encoder it measured (no "
                           f"{LINEAGE_KEY!r} block: written by an older version or by hand); "
                           f"rerun `pilamim {stage}`")
    if lineage["dataset_digest"] != data_digest:
        raise LineageError(
            f"{path} was measured on data {_short(lineage['dataset_digest'])} but the prepared "
            f"data is {_short(data_digest)}; rerun `pilamim {stage}`")
    if lineage["encoder_sha256"] != encoder_sha:
        raise LineageError(
            f"{path} was measured on encoder {_short(lineage['encoder_sha256'])} but the "
            f"exported encoder is {_short(encoder_sha)}; rerun `pilamim {stage}`")
    return dict(lineage)


def _short(digest: Any) -> str:
    return "(unknown)" if not digest else str(digest)[:12]
