"""`pilamim models` and `pilamim promote` as a person sees them, on a real SQLite store.

What is checked is what the terminal shows and what the registry holds afterwards: the
table's rows (version, aliases, metric values, the gate's decision), promote's one line and
the alias it moved, and errors as one line naming what exists. The commands run through
:func:`pilamim.cli.main`, which the ``pilamim`` console script calls (one test runs the script
itself, for its exit code and the absence of a traceback).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pilamim import cli
from pilamim.config import Params
from pilamim.registry.promotion import CHALLENGER, CHAMPION
from pilamim.stages import register as register_step
from tests.mlflow_store import export_tiny_encoder, write_metrics, write_prepared

NAME = Params().register.model_name
METRICS = {"finetune_top1": "0.7000", "finetune_top5": "0.9500", "knn_top1": "0.4000",
           "probe_top5": "0.9000"}                   # probe_top1 (the gate) differs per version


def _register(tmp_path: Path, params: Params, top1: float, seed: int) -> dict:
    """Register new weights (``seed``) whose probe top-1 is ``top1``."""
    export_tiny_encoder(tmp_path / "models" / "pretrain", seed=seed)
    write_metrics(tmp_path / "metrics" / "probe.json", top1=top1, top5=0.9, knn_top1=0.4)
    write_metrics(tmp_path / "metrics" / "finetune.json", top1=0.7, top5=0.95)
    return register_step.register(params)


@pytest.fixture
def two_versions(tmp_path, params) -> None:
    """Version 1 (probe top-1 0.50) is @champion; version 2 (0.45) lost the gate: @challenger."""
    write_prepared(tmp_path / "data" / "prepared")
    assert _register(tmp_path, params, 0.50, seed=0)["action"] == CHAMPION
    assert _register(tmp_path, params, 0.45, seed=1)["action"] == CHALLENGER


def pilamim(capsys, *argv: str) -> tuple[int, str, str]:
    """``pilamim ARGV``: its exit code, stdout and stderr."""
    code = cli.main(list(argv))
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def table(text: str) -> list[dict[str, str]]:
    """The rows of ``pilamim models``' table, each keyed by the header's column names."""
    header, *rows = (line.split() for line in text.splitlines())
    return [dict(zip(header, row, strict=True)) for row in rows]


def row(version: str, aliases: str, probe_top1: str, decision: str) -> dict[str, str]:
    return {"name": NAME, "version": version, "aliases": aliases, **METRICS,
            "probe_top1": probe_top1, "decision": decision}


def champion_version() -> str | None:
    version = MlflowClient().get_registered_model(NAME).aliases.get(CHAMPION)
    return None if version is None else str(version)


def test_models_lists_every_version_with_aliases_metrics_and_decision(two_versions, capsys):
    code, out, err = pilamim(capsys, "models")
    assert (code, err) == (0, "")
    assert out.splitlines()[0].split() == ["name", "version", "aliases", "finetune_top1",
                                           "finetune_top5", "knn_top1", "probe_top1",
                                           "probe_top5", "decision"]
    assert table(out) == [row("1", CHAMPION, "0.5000", CHAMPION),
                          row("2", CHALLENGER, "0.4500", CHALLENGER)]
    assert pilamim(capsys, "models", NAME) == (0, out, "")


def test_promote_moves_champion_records_why_and_says_so(two_versions, capsys):
    assert pilamim(capsys, "promote", NAME, "2") == (0, f"{NAME} version 2 is now @champion\n",
                                                     "")
    assert champion_version() == "2"
    tags = MlflowClient().get_model_version(NAME, "2").tags
    assert tags["decision"] == CHAMPION
    assert tags["decision_reason"] == ("promoted by hand (`pilamim promote`) "
                                       "(champion was version 1)")
    assert tags["gate_metric"] == "probe_top1"
    rows = {r["version"]: r for r in table(pilamim(capsys, "models")[1])}
    assert rows["1"]["aliases"] == "-"                     # the alias left version 1
    assert CHAMPION in rows["2"]["aliases"].split(",") and rows["2"]["decision"] == CHAMPION


@pytest.mark.parametrize(("argv", "error"), [
    (("promote", NAME, "7"),
     f"pilamim promote: error: model '{NAME}' has no version '7'; existing versions: 1, 2"),
    (("promote", "nope", "1"),
     f"pilamim promote: error: no registered model 'nope'; registered models: {NAME}"),
    (("models", "nope"),
     f"pilamim models: error: no registered model 'nope'; registered models: {NAME}"),
])
def test_a_wrong_name_or_version_is_one_line_naming_what_exists(two_versions, capsys, argv,
                                                                  error):
    assert pilamim(capsys, *argv) == (1, "", error + "\n")
    assert champion_version() == "1"                       # nothing moved


def test_an_empty_or_missing_store_says_so(tmp_path, monkeypatch, capsys):
    assert pilamim(capsys, "models") == (0, "no registered model versions\n", "")
    assert pilamim(capsys, "promote", NAME, "1") == (
        1, "", f"pilamim promote: error: no registered model '{NAME}'; registered models: "
               "(none)\n")
    uri = f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert pilamim(capsys, "models") == (
        1, "", f"pilamim models: error: no MLflow store at {uri} — run `pilamim register` (or "
               "the pipeline) first, or set MLFLOW_TRACKING_URI\n")


def test_the_console_script_exits_1_with_the_line_and_no_traceback(two_versions):
    script = Path(sys.executable).with_name("pilamim")
    done = subprocess.run([str(script), "promote", NAME, "7"], capture_output=True, text=True,
                          timeout=300)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.splitlines() == [
        f"pilamim promote: error: model '{NAME}' has no version '7'; existing versions: 1, 2"]
