"""pylock.toml against pyproject.toml, the checkout and the running venv.

pyproject.toml keeps ranges (users bring their own torch); pylock.toml pins the versions CI,
`.ci/setup` and the Docker image install. These tests fail when the two drift apart (a
dependency added or its range changed without `bash .ci/setup --lock`), when the lock names
a file on some machine's disk, and when this venv no longer holds the locked versions.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
RELOCK = "run `bash .ci/setup --lock` (docs/DEPENDENCIES.md)"


def declared_requirements() -> list[Requirement]:
    """Runtime dependencies and every extra's (dev, server): all of them are locked."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines.extend(extra)
    return [Requirement(line) for line in lines]


def locked_versions() -> dict[str, Version]:
    lock = tomllib.loads((ROOT / "pylock.toml").read_text())
    return {canonicalize_name(p["name"]): Version(p["version"]) for p in lock["packages"]}


def lock_files() -> list[dict]:
    """Every file entry of the lock (wheels and sdists), with the package it belongs to."""
    lock = tomllib.loads((ROOT / "pylock.toml").read_text())
    files = []
    for package in lock["packages"]:
        entries = package.get("wheels", []) + [package[k] for k in ("sdist",) if k in package]
        files.extend({"package": package["name"], **entry} for entry in entries)
    return files


def test_every_declared_dependency_is_locked_within_its_range():
    locked = locked_versions()
    missing, outside = [], []
    for req in declared_requirements():
        name = canonicalize_name(req.name)
        if name not in locked:
            missing.append(str(req))
        elif not req.specifier.contains(locked[name], prereleases=True):
            outside.append(f"{req} (locked {locked[name]})")
    assert not (missing or outside), (
        f"not in pylock.toml: {missing}; locked outside pyproject's range: {outside}; {RELOCK}")


def test_lock_names_public_files_only():
    """A lock written with local wheel folders would name paths of one machine's disk."""
    files = lock_files()
    assert files
    local = [f"{f['package']}: {f.get('url') or f.get('path')}" for f in files
             if not str(f.get("url", "")).startswith("https://")]
    assert not local, f"files without a public https URL in pylock.toml: {local}; {RELOCK}"
    assert all(f.get("hashes", {}).get("sha256") for f in files), "every file needs a sha256"


def test_installed_direct_dependencies_are_the_locked_versions():
    """This venv was set up from the lock. torch from the PyTorch index carries a build label
    (2.14.1+cpu): the public version is what the lock pins."""
    locked = locked_versions()
    differ = []
    for req in declared_requirements():
        name = canonicalize_name(req.name)
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            differ.append(f"{name}: locked {locked.get(name)}, not installed")
            continue
        if Version(installed.public) != locked.get(name):
            differ.append(f"{name}: locked {locked.get(name)}, installed {installed}")
    assert not differ, f"this venv differs from pylock.toml: {differ}; run `bash .ci/setup`"


def test_torch_is_locked_at_the_build_the_image_and_setup_name():
    """The image installs torch from the PyTorch index at its TORCH_VERSION and the lock
    refresh holds torch at .ci/setup's LOCK_TORCH: both must be the locked versions."""
    locked = locked_versions()
    setup = (ROOT / ".ci" / "setup").read_text()
    pins = re.search(r'^LOCK_TORCH="([^"]+)"', setup, re.MULTILINE)
    assert pins, ".ci/setup lost its LOCK_TORCH line"
    for pin in pins.group(1).split():
        req = Requirement(pin)
        assert req.specifier.contains(locked[canonicalize_name(req.name)]), (
            f".ci/setup pins {pin}, the lock has {locked[canonicalize_name(req.name)]}")
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (TORCH_VERSION|TORCHVISION_VERSION)=(\S+)", dockerfile,
                           re.MULTILINE))
    if not args:
        pytest.skip("docker/Dockerfile no longer sets TORCH_VERSION: nothing to compare")
    for arg, package in (("TORCH_VERSION", "torch"), ("TORCHVISION_VERSION", "torchvision")):
        if arg in args:
            assert Version(args[arg]) == locked[package], (
                f"docker/Dockerfile {arg}={args[arg]}, pylock.toml {package}=={locked[package]}")
