"""``pilamim <command>``: one command per stage, the whole pipeline, and the model registry.

Params come from ``params/`` plus ``--set`` overrides. Errors a user can cause end with one
message saying what to do; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pilamim.checkout_lock import EXIT_BUSY, CheckoutBusyError, hold_checkout
from pilamim.config import GROUPS, ParamsError
from pilamim.params_files import load_params
from pilamim.stages import TABLE, Stage, waves
from pilamim.stages.runner import TrackingRequiredError


def _no_track_help(stage: Stage) -> str:
    """Every stage command takes ``--no-track``, so scripts can pass it alike; a stage that
    writes to MLflow anyway (register) refuses it with a reason instead of argparse's bare
    "unrecognized arguments"."""
    if stage.writes_registry:
        return "refused (exit code 2): this stage writes to the MLflow Model Registry"
    return "do not record an MLflow run (default: record one)"


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


def _params_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params", metavar="DIR",
                        help="directory holding <group>.yaml files (default: params)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="GROUP.KEY=VALUE", help="override one param (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pilamim", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    for stage in TABLE:
        p = sub.add_parser(stage.name, help=stage.doc, description=stage.doc,
                           epilog=_params_help(stage.groups), formatter_class=raw)
        _params_args(p)
        p.add_argument("--no-track", action="store_true", help=_no_track_help(stage))
    p = sub.add_parser("run", help="the whole DAG as the Prefect flow `pilamim-pipeline`",
                       description=" -> ".join(" + ".join(w) for w in waves()) +
                       ", skipping stages DVC reports up to date.", epilog=_params_help(GROUPS),
                       formatter_class=raw)
    _params_args(p)
    p.add_argument("--force", action="store_true", help="rerun stages even when up to date")
    p = sub.add_parser("promote", help="point @champion at a registered version")
    p.add_argument("name", help="registered model name (params/register.yaml: model_name)")
    p.add_argument("version", help="version number")
    p = sub.add_parser("models", help="list registered versions, aliases and metrics")
    p.add_argument("name", nargs="?", help="registered model name (default: all)")
    return parser


def _dispatch(args: argparse.Namespace) -> dict | None:
    if args.command == "promote":
        from pilamim.registry import store

        mv = store.promote(args.name, args.version)
        print(f"{args.name} version {mv.version} is now @champion")
        return None
    if args.command == "models":
        from pilamim.registry import store

        print(format_models(store.list_models(args.name)))
        return None
    params = load_params(args.params, args.overrides)
    if args.command == "run":
        with hold_checkout():  # before Prefect starts: a busy checkout is refused at once
            from pilamim_flows.pipeline import pilamim_pipeline
            from pilamim_flows.prefect_api import check_prefect_api

            check_prefect_api()

            return pilamim_pipeline(params=params, params_dir=args.params, force=args.force)
    from pilamim.stages.runner import execute

    return execute(args.command, params, track=not args.no_track)


def format_models(rows: list[dict]) -> str:
    """A plain-text table of :func:`pilamim.registry.store.list_models` rows."""
    if not rows:
        return "no registered model versions"
    keys = sorted({k for r in rows for k in r["metrics"]})
    header = ["name", "version", "aliases", *keys, "decision"]
    table = [header] + [
        [r["name"], str(r["version"]), ",".join(r["aliases"]) or "-",
         *(f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "-" for k in keys),
         r["decision"] or "-"] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in table)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = _dispatch(args)
    except ParamsError as err:
        print(f"pilamim {args.command}: invalid params:\n{err}", file=sys.stderr)
        return 2
    except TrackingRequiredError as err:  # a usage error, like bad params; nothing written
        print(f"pilamim {args.command}: error: {err}", file=sys.stderr)
        return 2
    except CheckoutBusyError as err:  # not a bug: no traceback, even with --debug
        print(f"pilamim {args.command}: {err}", file=sys.stderr)
        return EXIT_BUSY
    except (FileNotFoundError, ValueError, RuntimeError, PermissionError, LookupError) as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, LookupError) and err.args else err
        print(f"pilamim {args.command}: error: {message}", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(_brief(result), indent=2, sort_keys=True, default=str))
    return 0


def _brief(result: dict) -> dict:
    """What the terminal shows: scalars, plus the pipeline's metrics table; per-class tables
    and matrices stay in the JSON files."""
    brief = {k: v for k, v in result.items() if isinstance(v, str | int | float | bool)}
    if isinstance(result.get("metrics"), dict):
        brief["metrics"] = result["metrics"]
    return brief


if __name__ == "__main__":
    sys.exit(main())
