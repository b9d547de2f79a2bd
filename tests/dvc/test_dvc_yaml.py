"""``dvc.yaml`` agrees with the code: stage names, params files and the default output paths.

dvc.yaml cannot read paths from params/ (the files share key names), so these checks are what
keeps the two in step.
"""

from __future__ import annotations

import shutil

import pytest
import yaml

from pilamim.config import GROUPS, DataParams, Params
from pilamim.stages import STAGE_GROUPS, STAGES
from tests.dvc.conftest import REPO_ROOT

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DVC_YAML = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())


def _paths(entries: list) -> list[str]:
    """``[path, {path: options}, ...]`` -> the paths."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def _options(entries: list) -> dict[str, dict]:
    return {next(iter(e)): next(iter(e.values())) or {} for e in entries or []
            if isinstance(e, dict)}


def test_stages_are_the_cli_commands_in_order():
    stages = DVC_YAML["stages"]
    assert tuple(stages) == STAGES
    for name, stage in stages.items():
        assert stage["cmd"] == f"pilamim {name}"


def test_each_stage_depends_on_its_params_files():
    for name, stage in DVC_YAML["stages"].items():
        params = {next(iter(e)): next(iter(e.values())) for e in stage["params"]}
        assert set(params) == {f"params/{g}.yaml" for g in STAGE_GROUPS[name]}, name
        if name == "fetch":  # only the keys that decide the raw images
            assert set(params["params/data.yaml"]) <= set(DataParams.model_fields)
            assert "val_fraction" not in params["params/data.yaml"]
        else:  # whole files: every key of the group
            assert all(keys is None for keys in params.values()), name
    assert set(GROUPS) == {g for groups in STAGE_GROUPS.values() for g in groups}


def test_outputs_are_the_default_params_paths():
    p, stages = Params(), DVC_YAML["stages"]
    outs = {name: _paths(stage.get("outs")) for name, stage in stages.items()}
    assert outs == {"fetch": [p.data.raw_dir], "prepare": [p.data.out_dir],
                    "pretrain": [p.pretrain.out_dir], "probe": [p.probe.out_dir],
                    "finetune": [p.finetune.out_dir], "register": []}
    for group in ("pretrain", "probe", "finetune", "register"):
        assert _paths(stages[group]["metrics"]) == [getattr(p, group).metrics_path]
    assert _paths(stages["pretrain"]["plots"]) == [p.pretrain.plots_path,
                                                   p.pretrain.knn_plots_path]
    for group in ("probe", "finetune"):
        assert _paths(stages[group]["plots"]) == [getattr(p, group).plots_path]
    for group in ("probe", "finetune"):
        assert getattr(p, group).data_dir == p.data.out_dir
        assert getattr(p, group).encoder_dir == p.pretrain.out_dir
    assert {p.register.probe_metrics, p.register.finetune_metrics} <= set(
        stages["register"]["deps"])


def test_metrics_and_plots_live_in_git_and_pretrain_persists():
    stages = DVC_YAML["stages"]
    for stage in stages.values():
        for kind in ("metrics", "plots"):
            for options in _options(stage.get(kind)).values():
                assert options["cache"] is False
    assert _options(stages["pretrain"]["outs"])["models/pretrain"]["persist"] is True
    for curve in ("plots/pretrain.csv", "plots/pretrain_knn.csv"):
        assert _options(stages["pretrain"]["plots"])[curve]["persist"] is True


def test_dvc_builds_the_graph(tmp_path):
    """DVC itself loads the file: no overlapping outputs, a DAG in the stage order."""
    import networkx as nx
    from dvc.repo import Repo

    shutil.copy(REPO_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    Repo.init(str(tmp_path), no_scm=True)
    with Repo(str(tmp_path)) as repo:
        repo.index.check_graph()
        graph = repo.index.graph
        order = [s.name for s in reversed(list(nx.topological_sort(graph)))]
    assert order.index("fetch") < order.index("prepare") < order.index("pretrain")
    assert order.index("pretrain") < min(order.index("probe"), order.index("finetune"))
    assert order[-1] == "register"
