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
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of key: value, got {type(raw).__name__}")
    return raw


def _apply_override(raw: dict[str, dict[str, Any]], override: str) -> None:
    key, sep, value = override.partition("=")
    group, dot, path = key.strip().partition(".")
    if not sep or not dot or not path:
        raise ParamsError(f"--set {override!r}: expected GROUP.KEY=VALUE, e.g. pretrain.epochs=5")
    if group not in raw:
        raise ParamsError(f"--set {override!r}: unknown group {group!r}; one of {sorted(raw)}")
    node = raw[group]
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ParamsError(f"--set {override!r}: value is not valid YAML: {err}") from err


def _explain(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(file)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}' — remove it or check its spelling")
        else:
            got = f" (got {e['input']!r})" if e["type"] != "missing" else ""
            lines.append(f"{source}: key '{key}'{got}: {e['msg']}")
    return "\n".join(lines)


def validate_group(group: str, raw: dict[str, Any], source: str | None = None) -> BaseModel:
    """Validate one group's mapping, turning pydantic's error into a :class:`ParamsError`."""
    try:
        return GROUPS[group].model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_explain(err, source or f"params group '{group}'")) from None


def load_params(params_dir: str | Path = "params", overrides: list[str] | None = None) -> Params:
    """Read ``<params_dir>/<group>.yaml`` for every group (a missing file means defaults)."""
    root = Path(params_dir)
    if not root.is_dir():
        raise ParamsError(f"params directory {root} does not exist; pass --params DIR")
    raw = {g: _read_yaml(root / f"{g}.yaml") if (root / f"{g}.yaml").exists() else {}
           for g in GROUPS}
    for override in overrides or []:
        _apply_override(raw, override)
    groups = {}
    for group, values in raw.items():
        source = str(root / f"{group}.yaml")
        groups[group] = validate_group(group, values, source)
    return Params(**groups)


def dump_params(params: Params, params_dir: str | Path) -> None:
    """Write each group back as ``<group>.yaml`` (the effective params of a run)."""
    root = Path(params_dir)
    root.mkdir(parents=True, exist_ok=True)
    for group in GROUPS:
        values = getattr(params, group).model_dump(mode="json")
        atomic_write_text(root / f"{group}.yaml", yaml.safe_dump(values, sort_keys=False))
