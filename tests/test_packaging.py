"""What ``pip install`` ships: every package folder, and the orchestration under its own name.

pyproject.toml lists its packages by hand, because flows/ installs as ``pilamim_flows`` (a
top-level ``flows`` would collide in site-packages) and setuptools' finder cannot rename; a
package folder missing from the list would be missing from every non-editable install.
"""

from __future__ import annotations

import tomllib

from pilamim.stages.code_deps import PACKAGE_DIRS, PROJECT_ROOT

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def _package_folders() -> set[str]:
    found = set()
    for name, folder in PACKAGE_DIRS.items():
        for init in (PROJECT_ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(PROJECT_ROOT / folder).parts
            found.add(".".join((name, *parts)))
    return found


def test_every_package_folder_is_listed():
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == _package_folders()


def test_flows_install_as_pilamim_flows():
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"pilamim_flows": "flows"}
    assert "flows" not in PYPROJECT["tool"]["setuptools"]["packages"]
    import pilamim_flows.pipeline

    assert pilamim_flows.pipeline.__file__.endswith("flows/pipeline.py")
