"""Params folders <-> :class:`pilamim.config.Params`: read, override, validate, write back.

``<dir>/<group>.yaml`` per group, as DVC reads them; ``--set GROUP.KEY=VALUE`` overrides are
parsed as YAML, so ``--set pretrain.betas=[0.9,0.95]`` works as in the file. Every error is a
:class:`~pilamim.config.ParamsError` naming the file, key and value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pilamim.config import GROUPS, Params, ParamsError
from pilamim.io import atomic_write_text


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ParamsError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it "
                          "as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    if raw is None:  # an empty file would silently mean "all defaults", not what it held
        raise ParamsError(f"{path}: the file is empty; restore its keys (git checkout {path}) "
                          "or write `{}` in it to use the code's defaults")
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of key: value, got {type(raw).__name__}")
    return raw


def _apply_override(raw: dict[str, dict[str, Any]], override: str) -> str:
    """Apply one ``--set``; returns the key of its group that it set, so that a bad value is
    blamed on the --set, not on the group's file."""
    key, sep, value = override.partition("=")
    group, dot, path = key.strip().partition(".")
    if not sep or not dot or not path:
        raise ParamsError(f"--set {override!r}: expected GROUP.KEY=VALUE, e.g. pretrain.epochs=5")
    if group not in raw:
        raise ParamsError(f"--set {override!r}: unknown group {group!r}; one of {sorted(raw)}")
    node = raw[group]
    *parents, leaf = path.split(".")
    for depth, part in enumerate(parents, 1):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            where = ".".join([group, *parents[:depth]])
            raise ParamsError(f"--set {override!r}: {where} is {node!r}, not a group of keys; "
                              f"set it directly, e.g. --set {where}=VALUE")
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ParamsError(f"--set {override!r}: value is not valid YAML: {err}") from err
    return path.split(".")[0]


def _explain(err: ValidationError, source: str, blame: dict[str, str] | None = None) -> str:
    """One line per problem; a key set by ``--set`` is blamed on that --set (``blame``)."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(file)"
        first = str(e["loc"][0]) if e["loc"] else ""
        if blame and first in blame:
            source_of = f"--set {blame[first]!r}"
        elif blame and not e["loc"]:  # a rule across keys: the file and the --set together
            source_of = f"{source} with " + ", ".join(f"--set {o!r}" for o in blame.values())
        else:
            source_of = source
        lines.append(_problem(e, key, source_of))
    return "\n".join(lines)


def _problem(e: dict[str, Any], key: str, source: str) -> str:
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}' — remove it or check its spelling"
    got = f" (got {e['input']!r})" if e["type"] != "missing" else ""
    return f"{source}: key '{key}'{got}: {e['msg']}"


def validate_group(group: str, raw: dict[str, Any], source: str | None = None,
                   blame: dict[str, str] | None = None) -> BaseModel:
    """Validate one group's mapping, turning pydantic's error into a :class:`ParamsError`."""
    try:
        return GROUPS[group].model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_explain(err, source or f"params group '{group}'", blame)) from None


def load_params(params_dir: str | Path = "params", overrides: list[str] | None = None) -> Params:
    """Read ``<params_dir>/<group>.yaml`` for every group; each must exist.

    A missing file is an error, not "defaults": a folder that lost a file (a typo in
    ``--params``, a half-copied preset) would otherwise run on values nobody chose for it.
    A file holding ``{}`` asks for the code's defaults (the shipped ``params/`` values)
    explicitly.
    """
    root = Path(params_dir)
    if not root.is_dir():
        raise ParamsError(f"params directory {root} does not exist; pass --params DIR")
    missing = [str(root / f"{g}.yaml") for g in GROUPS if not (root / f"{g}.yaml").is_file()]
    if missing:
        raise ParamsError(f"{', '.join(missing)}: no such file; every params group needs its "
                          f"file (restore it, e.g. `git checkout {missing[0]}`, or write `{{}}` "
                          "in it to use the code's defaults)")
    raw = {g: _read_yaml(root / f"{g}.yaml") for g in GROUPS}
    blame: dict[str, dict[str, str]] = {g: {} for g in GROUPS}
    for override in overrides or []:
        key = _apply_override(raw, override)  # raises first on a malformed --set
        blame[override.partition(".")[0].strip()][key] = override
    groups = {}
    for group, values in raw.items():
        source = str(root / f"{group}.yaml")
        groups[group] = validate_group(group, values, source, blame[group])
    return Params(**groups)


def dump_params(params: Params, params_dir: str | Path) -> None:
    """Write each group back as ``<group>.yaml`` (the effective params of a run)."""
    root = Path(params_dir)
    root.mkdir(parents=True, exist_ok=True)
    for group in GROUPS:
        values = getattr(params, group).model_dump(mode="json")
        atomic_write_text(root / f"{group}.yaml", yaml.safe_dump(values, sort_keys=False))
