"""Data lineage in MLflow: which prepared data version a run used.

Every stage run that reads prepared data logs its manifest as an MLflow dataset input and tags
the run with the data set's digest (from ``dataset.json``), so runs, registered versions and
``dvc.lock`` can be matched to one data version.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mlflow

from pilamim.tracking.runs import TAG_DATA_DIGEST


def read_data_digest(prepared_dir: str | Path) -> str | None:
    """``digest`` from ``<prepared_dir>/dataset.json``, None when the file is absent."""
    path = Path(prepared_dir) / "dataset.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("digest")


# MLflow stores a dataset digest in 36 characters at most; the full digest goes in a tag.
MAX_MLFLOW_DIGEST = 36


def log_dataset_input(prepared_dir: str | Path, name: str = "prepared",
                      context: str = "training") -> str:
    """Log ``<prepared_dir>/manifest.csv`` as the active run's dataset input; returns the digest.

    The dataset is the manifest (path, label, split, sha256 per image); its digest is
    ``dataset.json``'s ``digest`` (so every run of one data version shows the same one; MLflow
    keeps 36 characters, the full digest is in the input tag ``pilamim.full_digest`` and the
    run tag ``pilamim.data_digest``) and its source is the image root from ``dataset.json``.
    """
    import pandas as pd

    prepared = Path(prepared_dir)
    manifest, meta_path = prepared / "manifest.csv", prepared / "dataset.json"
    if not manifest.exists() or not meta_path.exists():
        raise FileNotFoundError(
            f"{prepared} has no manifest.csv/dataset.json — run `pilamim prepare` first"
        )
    meta = json.loads(meta_path.read_text())
    digest = str(meta["digest"])
    frame = pd.read_csv(manifest)
    root = meta.get("root") or str(prepared)
    source = root if "://" in str(root) else str(Path(root).resolve())
    with warnings.catch_warnings():
        # MLflow 3.17 registers its local-file source class twice and warns it is ambiguous.
        warnings.filterwarnings("ignore", message="The specified dataset source can be")
        dataset = mlflow.data.from_pandas(frame, source=source, name=name, targets="label",
                                          digest=digest[:MAX_MLFLOW_DIGEST])
    mlflow.log_input(dataset, context=context, tags={"pilamim.full_digest": digest})
    mlflow.set_tag(TAG_DATA_DIGEST, digest)
    return digest
