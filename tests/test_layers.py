"""Layers of the ``pilamim`` package, read from the sources with :mod:`ast` (nothing imported).

* Imports point down the layers (:data:`LAYERS`): the method library (model, data, train,
  evaluate and the small helpers beside them) imports neither MLflow's layer (tracking,
  registry) nor the pipeline (stages, CLI); tracking and registry do not import the pipeline.
* Orchestration stays out of the package: no module under ``pilamim/`` imports Prefect, and the
  only way into :mod:`pilamim_flows` (which does) is the CLI's lazy import for ``pilamim run``.
  Tracking gets Prefect's run ids from the flow (``extra_tags``), not by asking Prefect.
* No import cycle among ``pilamim`` modules. An edge A -> B is an import statement in A naming B
  (``from x import y`` names ``x.y`` when that is a module file, else ``x``), at module level
  or inside a function: lazy imports here defer heavy libraries (MLflow, torch), they are not
  licences for two modules to need each other, so a cycle through one still counts. The
  packages Python runs on the way to a submodule (``pilamim/model/__init__.py`` before
  ``pilamim.model.masking``) are not edges: a package ``__init__`` re-exporting its submodules
  would otherwise "cycle" with every submodule that imports a sibling, although neither needs
  the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pilamim.stages.code_deps import PROJECT_ROOT, imported_names, module_file

PACKAGE = "pilamim"
CLI = "pilamim.cli"
# Bottom to top; a module may import its own layer and those below. Modules not listed (the
# helpers directly under pilamim/: config, io, device, callbacks, schedules, recipes) are library.
LAYERS = (
    ("library", ()),
    ("mlflow", ("pilamim.tracking", "pilamim.registry")),
    ("pipeline", ("pilamim.stages", "pilamim.cli", "pilamim.checkout_lock",
                  "pilamim.params_files")),
)


def package_modules(root: Path = PROJECT_ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` under ``root``: dotted name -> file (``__init__`` = package)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def imports_of(modules: dict[str, Path], top: str, *, lazy: bool = True) -> dict[str, set[str]]:
    """Module -> the names it imports from the top-level package ``top`` (e.g. ``prefect``)."""
    found = {}
    for module, path in modules.items():
        names = {n for n in imported_names(path, module, lazy=lazy) if _top(n) == top}
        if names:
            found[module] = names
    return found


def _deepest_module(name: str, root: Path, package: str) -> str | None:
    """The longest prefix of ``name`` that is a module file of ``package`` (None: not ours)."""
    parts = name.split(".")
    if parts[0] != package:
        return None
    found = None
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        if module_file(prefix, root) is None:
            break
        found = prefix
    return found


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """``from <node.module> import ...`` with ``.``/``..`` resolved against ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def named_imports(path: Path, module: str) -> set[str]:
    """What each import statement of ``path`` names, at any depth (functions included):
    ``import a.b`` -> ``a.b``; ``from x import y`` -> ``x.y`` (resolved by the caller to ``x``
    when ``y`` is only a name in ``x``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, path.name == "__init__.py")
            names.update(f"{base}.{alias.name}" if alias.name != "*" else base
                         for alias in node.names)
    return names


def import_graph(modules: dict[str, Path], root: Path = PROJECT_ROOT,
                 package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules its import statements name, lazy imports included."""
    graph = {}
    for module, path in modules.items():
        targets = {_deepest_module(n, root, package) for n in named_imports(path, module)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, sorted order)."""
    state: dict[str, str] = {}        # "open" while on the current path, then "done"
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


# ----------------------------------------------------------------------------- the package


def layer(module: str) -> int:
    """Index in :data:`LAYERS` of the layer ``module`` belongs to."""
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return 0


def test_the_files_are_read():
    modules = package_modules()
    assert {"pilamim.tracking.runs", "pilamim.stages.runner", CLI, "pilamim.stages"} <= set(
        modules)
    graph = import_graph(modules)
    assert "pilamim.config" in graph["pilamim.tracking.runs"]            # module-level import
    assert "pilamim.tracking.runs" in graph["pilamim.stages.runner"]     # a lazy one


def test_imports_point_down_the_layers():
    upward = {(module, target) for module, targets in import_graph(package_modules()).items()
              for target in targets if layer(target) > layer(module)}
    assert not upward, "imports of a higher layer: " + ", ".join(
        f"{m} ({LAYERS[layer(m)][0]}) -> {t} ({LAYERS[layer(t)][0]})" for m, t in sorted(upward))


def test_mlflow_is_imported_only_by_its_layer():
    mlflow_users = set(imports_of(package_modules(), "mlflow"))
    assert mlflow_users and all(LAYERS[layer(m)][0] == "mlflow" for m in mlflow_users), (
        sorted(m for m in mlflow_users if LAYERS[layer(m)][0] != "mlflow"))


def test_no_pilamim_module_imports_prefect():
    assert imports_of(package_modules(), "prefect") == {}


def test_only_the_cli_reaches_the_flows_and_only_lazily():
    modules = package_modules()
    assert set(imports_of(modules, "pilamim_flows")) == {CLI}
    assert imports_of({CLI: modules[CLI]}, "pilamim_flows", lazy=False) == {}


def test_the_runner_imports_tracking_only_when_it_tracks():
    """MLflow costs seconds to import: an untracked stage must not pay for it."""
    runner = "pilamim.stages.runner"
    modules = package_modules()
    eager = imported_names(modules[runner], runner, lazy=False)
    assert not any(n == "pilamim.tracking" or n.startswith("pilamim.tracking.") for n in eager)


def test_no_import_cycle_among_pilamim_modules():
    cycle = find_cycle(import_graph(package_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# ----------------------------------------------------------------------------- the checks


@pytest.fixture
def toy(tmp_path) -> Path:
    """A package ``pilamim`` in tmp_path: a package __init__ re-exporting a submodule that
    imports a sibling, plus a lazy import of Prefect."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pilamim.sub.a import f\n")
    (pkg / "sub" / "a.py").write_text("from pilamim.sub.b import g\n\ndef f():\n    return g\n")
    (pkg / "sub" / "b.py").write_text("def g():\n    import prefect.runtime\n")
    return tmp_path


def test_a_package_reexporting_its_submodules_is_no_cycle_but_lazy_prefect_is_found(toy):
    modules = package_modules(toy)
    assert find_cycle(import_graph(modules, toy)) is None
    assert imports_of(modules, "prefect") == {"pilamim.sub.b": {"prefect.runtime"}}
    assert imports_of(modules, "prefect", lazy=False) == {}


def test_a_cycle_through_a_lazy_import_is_found(toy):
    (toy / PACKAGE / "sub" / "b.py").write_text("def g():\n    from pilamim.sub import a\n")
    cycle = find_cycle(import_graph(package_modules(toy), toy))
    assert cycle == ["pilamim.sub.a", "pilamim.sub.b", "pilamim.sub.a"]
