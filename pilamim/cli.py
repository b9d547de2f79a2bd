"""``pilamim <command>``: one command per stage, the whole pipeline, and the model registry.

Params come from ``params/`` plus ``--set`` overrides. Errors a user can cause end with one
message saying what to do; ``--debug`` shows the traceback.

Exit codes say what kind of failure it was, so a script (or the Prefect flow) can act on it
without reading messages: 0 done; 1 failed (a bug, or bad input the message names); 2 bad
params or usage; :data:`EXIT_TRANSIENT` (69) a server, the network or a lock failed, and the same
command may well work a minute later; :data:`~pilamim.checkout_lock.EXIT_BUSY` (75) another run
holds this checkout. With env ``PILAMIM_REPORT_FILE`` set (the flow sets it for the stage
commands DVC runs for it), the command writes its outcome there as JSON instead of printing the
result: ``{"exit_code": 0, "result": {...}}`` or ``{"exit_code": N, "error": "..."}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from pilamim.allocator import keep_freed_memory
from pilamim.checkout_lock import EXIT_BUSY, CheckoutBusyError, hold_checkout
from pilamim.config import GROUPS, ParamsError
from pilamim.io import atomic_write_text
from pilamim.params_files import load_params
from pilamim.stages import TABLE, Stage, waves
from pilamim.stages.runner import TrackingRequiredError

# sysexits EX_UNAVAILABLE, "a service is unavailable". Not EX_BUSY's 75: a busy checkout is
# another run, likely hours long, where retrying in a minute only wastes the retries.
EXIT_TRANSIENT = 69
ENV_REPORT_FILE = "PILAMIM_REPORT_FILE"
# Failures of something outside the stage, worth another try: (module, class). Only modules
# already imported can have raised them, so none is imported to check.
TRANSIENT_TYPES = (
    ("pilamim.tracking.server", "TrackingUnavailable"),
    ("requests.exceptions", "ConnectionError"), ("requests.exceptions", "Timeout"),
    ("requests.exceptions", "RetryError"),  # the server kept answering 429/5xx
    ("urllib3.exceptions", "NewConnectionError"), ("urllib3.exceptions", "MaxRetryError"),
    ("urllib3.exceptions", "ProtocolError"), ("urllib3.exceptions", "TimeoutError"),
    ("botocore.exceptions", "ConnectionError"), ("botocore.exceptions", "ReadTimeoutError"),
    ("dvc.lock", "LockError"),
)
# MLflow wraps HTTP failures without ``raise ... from`` (``mlflow.utils.rest_utils``): for these
# the error being handled (``__context__``) counts as a cause too.
IMPLICIT_WRAPPERS = (("mlflow.exceptions", "MlflowException"),)
USER_ERRORS = (FileNotFoundError, ValueError, RuntimeError, PermissionError, LookupError)


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


def _loaded(names: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
    return tuple(getattr(sys.modules[module], name) for module, name in names
                 if module in sys.modules and hasattr(sys.modules[module], name))


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and what it was raised from (``raise ... from``), and for MLflow's wrappers the
    error they were raised while handling."""
    implicit = _loaded(IMPLICIT_WRAPPERS)
    seen: set[int] = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or (link.__context__ if isinstance(link, implicit) else None)


def is_transient(err: BaseException) -> bool:
    """True when ``err`` (or what it wraps) is a failure of a server, the network or a lock —
    the same command may work a minute later — decided by type, never by message: the tracking
    server's :class:`~pilamim.tracking.server.TrackingUnavailable`, connection errors and
    timeouts (builtin, requests, urllib3, botocore), DVC's lock, SQLite's "busy"/"locked"."""
    transient = (ConnectionError, TimeoutError, *_loaded(TRANSIENT_TYPES))
    for link in _causes(err):
        if isinstance(link, transient):
            return True
        code = getattr(link, "sqlite_errorcode", None)  # extended codes keep the primary in 0xff
        if isinstance(link, sqlite3.OperationalError) and code is not None and (
                (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)):
            return True
    return False


def failure(err: Exception) -> tuple[int, str | None]:
    """``(exit code, message for the user)`` of an error; the message is None for an error
    nobody foresaw (a bug: its traceback is the message)."""
    if isinstance(err, ParamsError):
        return 2, f"invalid params:\n{err}"
    if isinstance(err, TrackingRequiredError):  # a usage error, like bad params; nothing written
        return 2, f"error: {err}"
    if isinstance(err, CheckoutBusyError):  # not a bug: no traceback, even with --debug
        return EXIT_BUSY, str(err)
    message = err.args[0] if isinstance(err, LookupError) and err.args else err
    if is_transient(err):
        return EXIT_TRANSIENT, (f"error: {message}\n(a server, the network or a lock failed: "
                                f"run it again later; what is saved is kept)")
    if isinstance(err, USER_ERRORS):
        return 1, f"error: {message}"
    return 1, None


def report(outcome: dict[str, Any]) -> bool:
    """Write ``outcome`` to env ``PILAMIM_REPORT_FILE`` if set (atomically); True if written."""
    path = os.environ.get(ENV_REPORT_FILE)
    if path:
        atomic_write_text(path, json.dumps(outcome, sort_keys=True, default=str))
    return bool(path)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # every stage: CPU steps stop paying page faults (pilamim.allocator)
    try:
        result = _dispatch(args)
    except Exception as err:  # noqa: BLE001 - every failure ends in one exit code and message
        code, message = failure(err)
        if message is None or (args.debug and code in (1, EXIT_TRANSIENT)):
            traceback.print_exc()
        if message is not None:
            print(f"pilamim {args.command}: {message}", file=sys.stderr)
        report({"exit_code": code, "error": message or f"{type(err).__name__}: {err}"})
        return code
    brief = _brief(result) if result is not None else None
    if not report({"exit_code": 0, "result": brief}) and brief is not None:
        print(json.dumps(brief, indent=2, sort_keys=True, default=str))
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
