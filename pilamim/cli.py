"""``pilamim <stage>``: one command per stage, params from ``params/`` plus ``--set`` overrides.

Errors a user can cause end with one line saying what to do; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from pilamim.config import GROUPS, Params, ParamsError, load_params
from pilamim.stages import STAGE_GROUPS

_DOC = {
    "prepare": "Materialise the data source, validate images, split, write the manifest.",
    "pretrain": "PiLaMIM pretraining (resumes from models/pretrain/checkpoint.pt if present).",
    "probe": "Linear probe + kNN on the frozen pretrained encoder -> metrics/probe.json.",
    "finetune": "Fine-tune the pretrained encoder end to end -> metrics/finetune.json.",
}


def _params_help(groups: Sequence[str]) -> str:
    """List every key of the stage's params files with its default and meaning."""
    lines = []
    for group in groups:
        lines.append(f"params/{group}.yaml (override with --set {group}.KEY=VALUE):")
        for key, field in GROUPS[group].model_fields.items():
            default = json.dumps(field.default) if field.default is not None else "null"
            desc = f" — {field.description}" if field.description else ""
            lines.append(f"  {key} = {default}{desc}")
    return "\n".join(lines)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params", metavar="DIR",
                        help="directory holding <group>.yaml files (default: params)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="GROUP.KEY=VALUE", help="override one param (repeatable)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pilamim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for stage, groups in STAGE_GROUPS.items():
        p = sub.add_parser(stage, help=_DOC.get(stage, ""), description=_DOC.get(stage, ""),
                           epilog=_params_help(groups),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p)
    return parser


def run_stage(stage: str, params: Params) -> dict:
    module = importlib.import_module(f"pilamim.stages.{stage}")
    return module.run(params)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params, args.overrides)
        result = run_stage(args.command, params)
    except ParamsError as err:
        print(f"pilamim {args.command}: invalid params:\n{err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError, PermissionError) as err:
        if args.debug:
            raise
        print(f"pilamim {args.command}: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(_brief(result), indent=2, sort_keys=True, default=str))
    return 0


def _brief(result: dict) -> dict:
    """What the terminal shows: scalars only (per-class tables and matrices stay in the JSON)."""
    return {k: v for k, v in result.items() if isinstance(v, str | int | float | bool)}


if __name__ == "__main__":
    sys.exit(main())
