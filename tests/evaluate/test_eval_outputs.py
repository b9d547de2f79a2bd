"""An evaluation stage's outputs appear together or not at all (#13 item 9).

Real files, the real writers: the first save succeeds, then ``metrics/`` cannot be written
(a plain file stands where the folder was: that stops root too, unlike chmod) and the second
save must fail without touching what the first one left.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_helpers import CLASSES, ENCODER_KWARGS, make_encoder

from pilamim.evaluate.metrics import classification_metrics, save_eval_outputs
from pilamim.io import OutputBatch
from pilamim.loggers import MemoryLogger
from pilamim.model.export import export_encoder

MODEL_NAME = "vit_tiny_patch16_224"


def _metrics(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(40) % len(CLASSES)
    return {split: classification_metrics(torch.randn(40, len(CLASSES), generator=gen), labels,
                                          CLASSES)
            for split in ("val", "test")}


def _paths(root: Path) -> dict[str, Path]:
    return {"out_dir": root / "models" / "probe", "metrics_path": root / "metrics" / "probe.json",
            "plots_path": root / "plots" / "probe.csv"}


def _saved(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _save(root: Path, seed: int, logger: MemoryLogger, batch: OutputBatch | None = None) -> None:
    save_eval_outputs(_metrics(seed), CLASSES, f"digest-{seed}", logger=logger, batch=batch,
                      **_paths(root))


def _export(root: Path, seed: int, batch: OutputBatch | None = None) -> None:
    export_encoder(make_encoder(seed), MODEL_NAME, ENCODER_KWARGS, _paths(root)["out_dir"],
                   stem="classifier", extra={"classes": CLASSES}, batch=batch)


def _block_metrics(root: Path) -> Path:
    """A file where ``metrics/`` should be; the folder waits beside it."""
    folder = root / "metrics"
    folder.rename(root / "metrics.moved")
    folder.write_text("not a folder\n")
    return folder


def _unblock_metrics(root: Path) -> None:
    (root / "metrics").unlink()
    (root / "metrics.moved").rename(root / "metrics")


def test_failed_metrics_write_leaves_the_previous_eval_outputs(tmp_path):
    first = MemoryLogger()
    _save(tmp_path, 0, first)
    assert {p.name for p in first.artifacts} >= {"confusion_matrix.png", "report.json",
                                                 "probe.json"}
    before = _saved(tmp_path)

    _block_metrics(tmp_path)
    second = MemoryLogger()
    try:
        with pytest.raises(OSError):
            _save(tmp_path, 1, second)
    finally:
        _unblock_metrics(tmp_path)
    assert _saved(tmp_path) == before  # no new report or figure beside the old metrics
    assert second.artifacts == []  # nothing half-written was logged either
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]

    _save(tmp_path, 1, MemoryLogger())  # and with the folder back, everything is replaced
    after = _saved(tmp_path)
    assert all(after[k] != before[k] for k in ("models/probe/report.json",
                                               "metrics/probe.json"))


def test_model_files_commit_with_the_metrics(tmp_path):
    """Fine-tune's pattern: the classifier export is staged in the same batch as the reports,
    so a metrics write that fails leaves the previous classifier, not one newer than its
    metrics."""
    with OutputBatch() as batch:
        _export(tmp_path, 0, batch)
        _save(tmp_path, 0, MemoryLogger(), batch)
    before = _saved(tmp_path)
    assert {"models/probe/classifier.safetensors", "models/probe/classifier.json"} <= set(before)

    _block_metrics(tmp_path)
    try:
        with pytest.raises(OSError), OutputBatch() as batch:
            _export(tmp_path, 1, batch)
            _save(tmp_path, 1, MemoryLogger(), batch)
    finally:
        _unblock_metrics(tmp_path)
    assert _saved(tmp_path) == before
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]

    with OutputBatch() as batch:
        _export(tmp_path, 1, batch)
        _save(tmp_path, 1, MemoryLogger(), batch)
    after = _saved(tmp_path)
    assert after["models/probe/classifier.safetensors"] != \
        before["models/probe/classifier.safetensors"]
    assert after["metrics/probe.json"] != before["metrics/probe.json"]


def test_export_without_a_batch_still_writes_both_files(tmp_path):
    _export(tmp_path, 0)
    out = _paths(tmp_path)["out_dir"]
    assert sorted(p.name for p in out.iterdir()) == ["classifier.json", "classifier.safetensors"]
