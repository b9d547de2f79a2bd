"""The package's import rules: import-linter's contracts (``pyproject.toml``,
``[tool.importlinter]``) and the two rules no contract can state.

* The contracts: imports point down the layers (method library < MLflow layer < pipeline);
  only ``pilamim.tracking`` and ``pilamim.registry`` import MLflow; no ``pilamim`` module
  imports Prefect; only the CLI imports :mod:`pilamim_flows`; no import cycle. The run here
  fails with import-linter's report, and each contract is broken once on a copy of the sources,
  so a contract that can no longer fail (a typo, a module left out) fails this file too.
* "Only lazily": grimp records an import inside a function like one at module level (its
  ``is_lazy`` means PEP 810's ``lazy import`` statement only), so that the CLI reaches the flow,
  and the runner MLflow's layer, only inside a function is read here with :mod:`ast`.
* Cycles through a package's own ``__init__``: ``acyclic_siblings`` ignores imports between a
  package and its children, so a module importing a name from its package whose ``__init__``
  imports that module again is checked here with grimp. A package ``__init__`` re-exporting
  its submodules while they import a sibling through it is no cycle: neither needs the other.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

from pilamim.stages.code_deps import PROJECT_ROOT, imported_names, module_file

PYPROJECT = PROJECT_ROOT / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def contract_ids() -> set[str]:
    """The ids of the contracts in ``pyproject.toml``."""
    config = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    return {c["id"] for c in config["tool"]["importlinter"]["contracts"]}


def lint_imports(*contracts: str, sources: Path | None = None) -> subprocess.CompletedProcess:
    """The venv's ``lint-imports`` on pyproject.toml's contracts (all, or ``contracts``).

    Uncached: a cache folder in the checkout would be one more thing to ignore, and the graph
    takes well under a second to build. ``sources``: a folder holding copies of ``pilamim``
    and ``pilamim_flows``, put ahead of the installed (editable) ones on ``PYTHONPATH``.
    """
    args = [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(PYPROJECT)]
    args += [f"--contract={c}" for c in contracts]
    env = {**os.environ, "PYTHONPATH": str(sources)} if sources else None
    return subprocess.run(args, cwd=sources or PROJECT_ROOT, capture_output=True, text=True,
                          env=env, timeout=120)


def test_the_contracts_are_kept():
    done = lint_imports()
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Contracts: {len(contract_ids())} kept, 0 broken." in done.stdout, done.stdout


# One or more ways to break each contract: (contract id, file, text appended to it, a line the
# report must hold). Several are lazy imports, which import-linter counts like any other.
LAZY = "\n\ndef _lazy():\n    {}\n"
NEW_MODULE = "pilamim/extra.py"                       # in no layer
BREAKS = [
    ("layers", "pilamim/model/masking.py", LAZY.format("from pilamim.tracking import runs"),
     "- pilamim.model.masking -> pilamim.tracking.runs"),
    ("layers", "pilamim/registry/promotion.py", "\nimport pilamim.stages\n",
     "- pilamim.registry.promotion -> pilamim.stages"),
    ("layers", NEW_MODULE, "", "- pilamim.extra"),              # exhaustive: unplaced
    ("root", "pilamim/__init__.py", "\nfrom pilamim.tracking import runs\n",
     "pilamim -> pilamim.tracking.runs"),
    ("mlflow", "pilamim/stages/probe.py", "\nimport mlflow\n", "- pilamim.stages.probe -> mlflow"),
    ("mlflow", "pilamim/train/loop.py", LAZY.format("import mlflow.pytorch"),
     "- pilamim.train.loop -> mlflow"),
    ("mlflow", "pilamim_flows/__init__.py", "\nimport mlflow\n",
     "- pilamim_flows -> mlflow"),
    ("prefect", "pilamim/tracking/runs.py", LAZY.format("from prefect.runtime import flow_run"),
     "pilamim.tracking.runs -> prefect"),
    ("flows", "pilamim/stages/runner.py", "\nimport pilamim_flows\n",
     "- pilamim.stages.runner -> pilamim_flows"),
    ("acyclic", "pilamim/config.py", LAZY.format("from pilamim.train import loop"),
     "- .config -> .train"),
    ("acyclic", "pilamim/model/masking.py", LAZY.format("from pilamim.model import pilamim"),
     "- .masking -> .pilamim"),
]


def copy_sources(dest: Path) -> Path:
    """``pilamim`` and ``pilamim_flows`` (from flows/) copied under ``dest``, as importable."""
    skip = shutil.ignore_patterns("__pycache__", "*.npz")
    shutil.copytree(PROJECT_ROOT / "pilamim", dest / "pilamim", ignore=skip)
    shutil.copytree(PROJECT_ROOT / "flows", dest / "pilamim_flows", ignore=skip)
    return dest


def test_every_contract_has_a_way_to_break_it():
    assert {contract for contract, *_ in BREAKS} == contract_ids()


@pytest.mark.parametrize(("contract", "file", "text", "reported"), BREAKS,
                         ids=[f"{b[0]}:{b[1]}" for b in BREAKS])
def test_a_contract_fails_on_an_import_it_forbids(tmp_path, contract, file, text, reported):
    sources = copy_sources(tmp_path)
    assert file == NEW_MODULE or (sources / file).is_file(), f"{file} is gone: break another"
    with open(sources / file, "a", encoding="utf-8") as f:
        f.write(text)
    done = lint_imports(contract, sources=sources)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Contracts: 0 kept, 1 broken." in done.stdout, done.stdout
    assert reported in done.stdout, done.stdout


# ----------------------------------------------------------------------------- only lazily


def imports_of(path: Path, module: str, package: str, *, lazy: bool) -> set[str]:
    """What ``path`` (the file of ``module``) imports from ``package`` or below it; without
    ``lazy``, only its imports outside functions (run whenever the module is imported)."""
    return {n for n in imported_names(path, module, lazy=lazy)
            if n == package or n.startswith(package + ".")}


# MLflow and Prefect cost seconds to import: a stage command (and an untracked stage) must not
# pay for the flow or MLflow's layer, so these imports stay inside the functions needing them.
ONLY_LAZILY = [("pilamim.cli", "pilamim_flows"), ("pilamim.stages.runner", "pilamim.tracking")]


@pytest.mark.parametrize(("module", "package"), ONLY_LAZILY)
def test_imported_only_inside_a_function(module, package):
    path = module_file(module)
    assert imports_of(path, module, package, lazy=True), f"{module} no longer imports {package}"
    eager = imports_of(path, module, package, lazy=False)
    assert not eager, f"{module} imports {sorted(eager)} at module level, not in a function"


def test_a_module_level_import_is_told_from_a_lazy_one(tmp_path):
    path = tmp_path / "cli.py"
    path.write_text("import pilamim_flows.pipeline\n\n"
                    "def run():\n    from pilamim_flows import retry\n")
    assert imports_of(path, "pilamim.cli", "pilamim_flows", lazy=False) == {
        "pilamim_flows.pipeline"}
    assert "pilamim_flows.retry" in imports_of(path, "pilamim.cli", "pilamim_flows", lazy=True)


# ----------------------------------------------------------- cycles through a package __init__


def cycles_through_own_package(graph: grimp.ImportGraph, root: str) -> list[tuple[str, str]]:
    """Imports ``module -> package`` where ``package`` contains ``module`` and imports it back
    (directly or not): the cycles ``acyclic_siblings`` does not look at."""
    return sorted((module, package) for module in graph.find_descendants(root)
                  for package in graph.find_modules_directly_imported_by(module)
                  if module.startswith(package + ".") and graph.chain_exists(package, module))


def test_no_module_imports_a_package_that_imports_it_back():
    graph = grimp.build_graph("pilamim", cache_dir=None)
    assert cycles_through_own_package(graph, "pilamim") == []


def test_a_reexporting_package_is_no_cycle_but_one_importing_back_is():
    graph = grimp.ImportGraph()
    for module in ("toy", "toy.sub", "toy.sub.a", "toy.sub.b"):
        graph.add_module(module)
    graph.add_import(importer="toy.sub", imported="toy.sub.a")      # __init__ re-exports a
    graph.add_import(importer="toy.sub.b", imported="toy.sub")      # b uses a name from it
    assert cycles_through_own_package(graph, "toy") == []
    graph.add_import(importer="toy.sub.a", imported="toy.sub.b")    # now the __init__ needs b
    assert cycles_through_own_package(graph, "toy") == [("toy.sub.b", "toy.sub")]
