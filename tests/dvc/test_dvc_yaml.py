"""``dvc.yaml`` agrees with the code: stage names, params files, the default output paths and
the code each stage runs.

dvc.yaml cannot read paths from params/ (the files share key names) nor see which modules a
stage imports, so these checks are what keeps the two in step.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pilamim.config import GROUPS, DataParams, Params
from pilamim.data.embedded import SUBSET_PATH
from pilamim.stages import STAGE_GROUPS, STAGES
from pilamim.stages.code_deps import (
    CLI,
    CLI_NON_STAGE_IMPORTS,
    PACKAGES,
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
        elif name == "prepare":  # all of data; of the model only the input size (statistics)
            assert params == {"params/data.yaml": None, "params/model.yaml": ["img_size"]}
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


def _is_code(dep: str) -> bool:
    """A dep in a project package that is a ``.py`` file or a folder (a data file, such as the
    bundled Fashion-MNIST subset, is not code)."""
    return dep.split("/")[0] in PACKAGES and (dep.endswith(".py") or (REPO_ROOT / dep).is_dir())


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
    assert {"pilamim/promotion.py", "pilamim/model_logging.py", "pilamim/data_lineage.py",
            "pilamim/tracking.py"} <= deps["register"]
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
    assert CLI_NON_STAGE_IMPORTS <= imported_names(path, CLI)
    assert not CLI_NON_STAGE_IMPORTS & imported_names(path, CLI, lazy=False)


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
