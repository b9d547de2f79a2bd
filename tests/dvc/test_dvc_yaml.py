"""``dvc.yaml`` agrees with the stage table (:mod:`pilamim.stages`): stage names and order,
params files and keys, inputs, outputs, metrics, plots and the code each stage runs.

dvc.yaml cannot read paths from params/ (the files share key names) nor see which modules a
stage imports, so these checks are what keeps the file and the table in step; the table's paths
are evaluated with the shipped params/ (the code defaults equal them: tests/test_config.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pilamim.config import GROUPS, Params
from pilamim.data.embedded import SUBSET_PATH
from pilamim.stages import STAGES, TABLE, Stage
from pilamim.stages.code_deps import (
    CLI,
    CLI_NON_STAGE_IMPORTS,
    PACKAGE_DIRS,
    import_closure,
    imported_names,
    module_file,
    stage_code_deps,
)
from tests.dvc.conftest import REPO_ROOT

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DVC_YAML = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())


def _paths(entries: list) -> list[str]:
    """``[path, {path: options}, ...]`` -> the paths."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def _options(entries: list) -> dict[str, dict]:
    return {next(iter(e)): next(iter(e.values())) or {} for e in entries or []
            if isinstance(e, dict)}


def test_stages_are_the_table_in_order_and_the_cli_commands():
    stages = DVC_YAML["stages"]
    assert tuple(stages) == STAGES
    for name, stage in stages.items():
        assert stage["cmd"] == f"pilamim {name}"


@pytest.mark.parametrize("spec", TABLE, ids=STAGES)
def test_each_stage_depends_on_the_params_the_table_names(spec: Stage):
    entries = DVC_YAML["stages"][spec.name]["params"]
    params = {next(iter(e)): next(iter(e.values())) for e in entries}
    expected = {f"params/{group}.yaml": list(keys) if keys else None
                for group, keys in spec.params.items()}
    assert params == expected


def test_every_params_group_is_read_by_a_stage():
    assert set(GROUPS) == {g for spec in TABLE for g in spec.groups}


@pytest.mark.parametrize("spec", TABLE, ids=STAGES)
def test_deps_outs_metrics_and_plots_are_the_tables(spec: Stage):
    p, stage = Params(), DVC_YAML["stages"][spec.name]
    data_deps = [d for d in _paths(stage["deps"]) if not _is_code(d)]
    assert data_deps == [*spec.package_files, *spec.input_paths(p)]
    assert _paths(stage.get("outs")) == list(spec.outputs(p))
    metrics = [spec.metrics_file(p)] if spec.metrics_in_dvc and spec.metrics_file(p) else []
    assert _paths(stage.get("metrics")) == metrics
    assert _paths(stage.get("plots")) == list(spec.plots(p))
    persist = [_options(stage.get("outs")).get(o, {}).get("persist", False)
               for o in spec.outputs(p)]
    assert all(flag == spec.persist_outputs for flag in persist)


def test_the_gate_metrics_are_the_tables():
    """``register.gate_metric`` accepts exactly the metrics the table marks as gate metrics."""
    from typing import get_args

    from pilamim.config import GateMetric

    assert set(get_args(GateMetric)) == {m.name for s in TABLE for m in s.metrics if m.gate}


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


def _is_code(dep: str) -> bool:
    """A dep in a project package that is a ``.py`` file or a folder (a data file, such as the
    bundled Fashion-MNIST subset, is not code)."""
    top = dep.split("/")[0]
    return top in PACKAGE_DIRS.values() and (dep.endswith(".py") or (REPO_ROOT / dep).is_dir())


def _files(dep: str) -> list[str]:
    """What DVC hashes for ``dep``: a folder means all its files (less what .dvcignore drops)."""
    path = REPO_ROOT / dep
    if not path.is_dir():
        return [dep]
    return sorted(p.relative_to(REPO_ROOT).as_posix() for p in path.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_exactly_the_code_the_stage_runs(stage):
    """Editing a module a stage imports must rerun it, and nothing else should.

    The rule: list the files, sorted, not folders. A folder would also cover any file later
    put in it (a tool script, a notebook) and rerun the stage for it, and one canonical list
    is what ``python -m pilamim.stages.code_deps STAGE`` prints to paste.
    """
    code = [d for d in _paths(DVC_YAML["stages"][stage]["deps"]) if _is_code(d)]
    listed = {f for d in code for f in _files(d)}
    expected = stage_code_deps(stage)
    missing, extra = sorted(set(expected) - listed), sorted(listed - set(expected))
    assert not missing and not extra, (
        f"dvc.yaml stage {stage!r}: its code deps are not what `pilamim {stage}` imports; "
        f"update dvc.yaml (python -m pilamim.stages.code_deps {stage} prints the list)\n"
        f"  missing: {missing}\n  extra: {extra}")
    assert code == expected, (f"dvc.yaml stage {stage!r}: list the code deps as files, sorted, "
                              f"not folders; update dvc.yaml to {expected}")


def test_the_stages_code_includes_what_dvc_yaml_used_to_miss():
    deps = {stage: set(stage_code_deps(stage)) for stage in STAGES}
    assert {"pilamim/registry/promotion.py", "pilamim/registry/model_logging.py",
            "pilamim/tracking/datasets.py", "pilamim/tracking/runs.py"} <= deps["register"]
    assert {"pilamim/schedules.py", "pilamim/data/pretrain_input.py",
            "pilamim/data/device_decode.py", "pilamim/data/prepared.py"} <= deps["pretrain"]
    for stage in STAGES:
        assert {"pilamim/config.py", "pilamim/cli.py", "pilamim/stages/runner.py",
                f"pilamim/stages/{stage}.py"} <= deps[stage], stage
        assert not any(d.startswith("flows/") for d in deps[stage]), stage  # `pilamim run` only
    assert "pilamim/schedules.py" in deps["probe"] & deps["finetune"]


def test_fetch_depends_on_the_bundled_subset():
    """The embedded source's images are a file inside the package: a data dep of fetch."""
    subset = SUBSET_PATH.relative_to(REPO_ROOT).as_posix()
    assert subset in DVC_YAML["stages"]["fetch"]["deps"]


def test_cli_imports_left_out_of_stages_are_lazy():
    """The imports stage_code_deps does not follow from the CLI are in functions (so a stage
    command never runs them) and still exist (a stale name would mislead)."""
    path = module_file(CLI)
    assert path is not None
    def under(prefix: str, names: set[str]) -> bool:
        return any(n == prefix or n.startswith(prefix + ".") for n in names)

    for prefix in CLI_NON_STAGE_IMPORTS:
        assert under(prefix, imported_names(path, CLI)), prefix
        assert not under(prefix, imported_names(path, CLI, lazy=False)), prefix


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_import_closure_follows_every_import_form(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": ("import os\n"
                     "import other.x\n"  # not a project package
                     "from . import b\n"  # relative, b is a submodule
                     "from .sub import c\n"  # a subpackage's module: its __init__ runs too
                     "def f():\n"
                     "    from pkg.lazy import thing\n"  # lazy, inside a function
                     "    return thing\n"),
        "pkg/b.py": "from pkg import d\n",  # absolute `from package import submodule`
        "pkg/d.py": "",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from ..e import X\n",  # two levels up; X is a name, e the module
        "pkg/e.py": "X = 1\n",
        "pkg/lazy.py": "thing = 1\n",
        "pkg/unused.py": "",
        "pkg/sub/unused.py": "",
        "other/__init__.py": "",
        "other/x.py": "",
    })
    closure = import_closure("pkg.a", root=tmp_path, packages=("pkg",))
    assert closure == {Path(p) for p in (
        "pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/d.py", "pkg/sub/__init__.py",
        "pkg/sub/c.py", "pkg/e.py", "pkg/lazy.py")}
    assert "pkg.lazy" not in imported_names(tmp_path / "pkg/a.py", "pkg.a", lazy=False)
    with pytest.raises(ValueError, match="no module"):
        import_closure("pkg.missing", root=tmp_path, packages=("pkg",))
