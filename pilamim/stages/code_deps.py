"""The project files a stage's code imports: what ``dvc.yaml`` must list as the stage's deps.

DVC reruns a stage only when a listed dep changes, so a module the stage runs but ``dvc.yaml``
does not list (the promotion gate, the lr schedule) can change without ``dvc status`` noticing,
and the DAG is no longer reproducible. The list is worked out here by reading the sources with
:mod:`ast` rather than importing them: no torch or MLflow import, and lazy imports inside
functions count too (the runner imports :mod:`pilamim.tracking` only when it tracks).
``tests/dvc/test_dvc_yaml.py`` checks ``dvc.yaml`` against it; ``python -m
pilamim.stages.code_deps STAGE`` prints the lines to paste.

What ``pilamim STAGE`` runs is :mod:`pilamim.cli` with what it imports (``params_files``,
``config``, ...), :mod:`pilamim.stages.runner` (including the tracking modules it imports
lazily), and ``pilamim.stages.STAGE``. Two things need a rule:

- The runner loads the stage with ``importlib.import_module``, which no static reading can
  follow, so the stage module is a root of its own.
- The CLI also serves commands that are not stages: ``pilamim run`` lazily imports
  :mod:`pilamim_flows` and ``promote`` / ``models`` lazily import :mod:`pilamim.registry`. Those
  imports (:data:`CLI_NON_STAGE_IMPORTS`) are not followed from the CLI, so editing the
  Prefect flow does not rerun every stage; a module they name still counts when the stage
  itself reaches it (register imports the registry). Any other CLI import is followed, so a new
  one is a dep until someone decides otherwise here.

The closure over-approximates on purpose: an import under ``if TYPE_CHECKING`` or in a branch
the stage never takes still counts, as a needless rerun is cheap next to a stale result.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

from pilamim.stages import STAGES
from pilamim.stages import stage as stage_spec

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Importable name -> its folder in the repository (pyproject.toml: flows/ installs as
# pilamim_flows, a name that cannot collide with another distribution's top-level package).
PACKAGE_DIRS = {"pilamim": "pilamim", "pilamim_flows": "flows"}
PACKAGES = tuple(PACKAGE_DIRS)
CLI = "pilamim.cli"
# Imported by pilamim/cli.py (inside functions) only for `run`, `promote` and `models`.
CLI_NON_STAGE_IMPORTS = frozenset({"pilamim_flows", "pilamim.registry"})

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def module_file(module: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The file Python runs for ``module`` under ``root`` (a package's ``__init__.py``), if any."""
    top, *rest = module.split(".")
    base = root.joinpath(PACKAGE_DIRS.get(top, top), *rest)
    for path in (base / "__init__.py", base.with_name(base.name + ".py")):
        if path.is_file():
            return path
    return None


def _import_nodes(tree: ast.AST, lazy: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements at any depth; without ``lazy``, none inside a function body."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(child for child in ast.iter_child_nodes(node)
                     if lazy or not isinstance(child, _FUNCTIONS))


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute name of ``from <node.module> import ...``, resolving ``.`` and ``..``."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 >= len(package):
        raise ValueError(f"{module}: relative import beyond the top-level package")
    package = package[:len(package) - (node.level - 1)]
    return ".".join([*package, node.module] if node.module else package)


def imported_names(path: Path, module: str, *, lazy: bool = True) -> set[str]:
    """Every dotted name ``path`` (the file of ``module``) imports.

    ``from x import y`` gives ``x`` and ``x.y``: y may be a submodule or just a name in x, and
    only the files on disk can tell (:func:`import_closure` keeps what resolves).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in _import_nodes(tree, lazy):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        base = _absolute(node, module, path.name == "__init__.py")
        names.add(base)
        names.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return names


def _modules_of(name: str, root: Path, packages: tuple[str, ...]) -> list[tuple[str, Path]]:
    """The project modules importing ``name`` runs: each package on the way, then the module.

    Stops at the first part that is not a file (``pilamim.config.Params`` is a class).
    """
    parts = name.split(".")
    if parts[0] not in packages:
        return []
    found = []
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        path = module_file(prefix, root)
        if path is None:
            break
        found.append((prefix, path))
    return found


def _closure(names: set[str], root: Path, packages: tuple[str, ...],
             seen: dict[str, Path] | None = None) -> set[Path]:
    """Follow ``names`` to files; a module already in ``seen`` is not read again."""
    seen = dict(seen or {})
    todo = list(names)
    while todo:
        for name, path in _modules_of(todo.pop(), root, packages):
            if name not in seen:
                seen[name] = path
                todo.extend(imported_names(path, name))
    return {path.relative_to(root) for path in seen.values()}


def _require(module: str, root: Path) -> Path:
    path = module_file(module, root)
    if path is None:
        raise ValueError(f"no module {module!r} under {root}")
    return path


def import_closure(module: str, root: Path = PROJECT_ROOT,
                   packages: tuple[str, ...] = PACKAGES) -> set[Path]:
    """The files (relative to ``root``) of ``module`` and every project module it imports,
    transitively, lazy imports and package ``__init__.py`` files included."""
    _require(module, root)
    return _closure({module}, root, packages)


def _non_stage(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in CLI_NON_STAGE_IMPORTS)


def stage_code_deps(stage: str, root: Path = PROJECT_ROOT) -> list[str]:
    """The sorted POSIX paths of every project file ``pilamim <stage>`` runs (module docstring)."""
    stage_module = stage_spec(stage).module
    _require(stage_module, root)
    cli_path = _require(CLI, root)
    roots = {stage_module, *(n for n in imported_names(cli_path, CLI) if not _non_stage(n))}
    # the CLI counts as seen: its own imports are the filtered roots, not all of them
    files = _closure(roots, root, PACKAGES, seen={CLI: cli_path})
    return sorted(path.as_posix() for path in files)


def main(argv: list[str]) -> int:
    """Print each named stage's (default: every stage's) code deps as ``dvc.yaml`` lines."""
    for stage in argv or STAGES:
        print(f"  {stage}:")
        print("\n".join(f"      - {path}" for path in stage_code_deps(stage)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
