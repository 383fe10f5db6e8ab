"""IPython magics: ``%%cluster`` and ``%nbproc``.

Each magic is a thin layer over :mod:`nbproc.api`: it parses its line with ``magic_arguments``
(so ``%%cluster?`` shows the options), gathers the functions, and calls the same function a
script would. Errors are one-line ``UsageError``\\ s and leave the processor as it was.
"""

from __future__ import annotations

import ast
import shlex
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import (
    MagicArgumentParser,
    argument,
    magic_arguments,
    parse_argstring,
)

from . import api
from .client import CoreUnavailable
from .cluster import DEFAULT_MODULE, FUNCTION_ROLES, ClusterDefinitionError
from .protocol import CoreError

# Set by ``python -m nbproc serve`` while it executes a notebook: operator actions in the
# notebook (run, cancel, panel ...) are for the interactive session, not for serving.
SERVING_HEADLESS = False


def _assigned_names(source: str) -> set[str]:
    """Top-level names a cell binds (def, async def, class, assignment, import)."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _metadata(pairs: list[str]) -> dict[str, str]:
    metadata = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--meta expects key=value, got {pair!r}")
        metadata[key] = value
    return metadata


def _run_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"a run id is a number, got {text!r}") from None


@magics_class
class NbprocMagics(Magics):
    # -- %%cluster ----------------------------------------------------------------------------------
    @magic_arguments()
    @argument("name", help="the cluster's name")
    @argument(
        "--module",
        default=DEFAULT_MODULE,
        help=f"module to register it in (default {DEFAULT_MODULE})",
    )
    @argument(
        "--mode", default="Batch", help="Batch (run on request) or Stream (runs until stopped)"
    )
    @argument(
        "--on-load",
        default="WaitAndPush",
        help="CompleteAndPush (load each item) or WaitAndPush (load one DataFrame)",
    )
    @argument("--on-crash", default="DoNothing", help="DoNothing or Restart")
    @argument("--t-functions", type=int, default=1, help="transform workers to start with")
    @argument("--l-functions", type=int, default=1, help="load workers to start with")
    @argument(
        "--t-threshold",
        type=int,
        default=2,
        help="extract->transform channel size that grows the transform stage",
    )
    @argument("--t-growth", type=int, default=2, help="transform stage growth factor")
    @argument(
        "--l-threshold",
        type=int,
        default=2,
        help="transform->load channel size that grows the load stage",
    )
    @argument("--l-growth", type=int, default=2, help="load stage growth factor")
    @argument("--no-mount", action="store_true", help="register unmounted (an operator mounts it)")
    @argument("--version", default="0.1.0", help="the module version to register")
    @argument(
        "--extract",
        default=None,
        metavar="NAME",
        help="use this function as extract (default: `extract`)",
    )
    @argument("--transform", default=None, metavar="NAME", help="use this function as transform")
    @argument("--load", default=None, metavar="NAME", help="use this function as load")
    @argument("--setup", default=None, metavar="NAME", help="use this function as setup")
    @argument("--teardown", default=None, metavar="NAME", help="use this function as teardown")
    @cell_magic
    def cluster(self, line: str, cell: str) -> None:
        """Run the cell, then make the functions it defines cluster NAME and register it.

        The cell's ``extract(h, m, out)`` (required), ``transform(h, m, item)``,
        ``load(h, m, item_or_batch)``, ``setup(h, m)``, ``teardown(h, m)``, ``verify_et(item)``
        and ``verify_tl(item)`` become the cluster; running the cell again redefines it
        (runs already going keep their functions). Same as ``nbproc.define(NAME, ...)``.
        """
        args = parse_argstring(self.cluster, line)
        picked = {role: getattr(args, role, None) for role in FUNCTION_ROLES}
        try:
            defined = _assigned_names(self.shell.transform_cell(cell))
        except SyntaxError:
            defined = set()  # let IPython report the syntax error itself
        result = self.shell.run_cell(cell)
        if not result.success:
            raise UsageError(
                f"cluster {args.name!r} not registered: the cell raised an error (see above)"
            )
        functions = self._functions(picked, defined)
        options: dict[str, Any] = {
            "mode": args.mode,
            "on_load": args.on_load,
            "on_crash": args.on_crash,
            "t_functions": args.t_functions,
            "l_functions": args.l_functions,
            "t_threshold": args.t_threshold,
            "t_growth": args.t_growth,
            "l_threshold": args.l_threshold,
            "l_growth": args.l_growth,
            "mount": not args.no_mount,
            "version": args.version,
        }
        try:
            defined_cluster = api.define(args.name, module=args.module, **functions, **options)
        except ClusterDefinitionError as exc:
            raise UsageError(f"cluster {args.name!r} not registered: {exc}") from None
        roles = ", ".join(r for r in FUNCTION_ROLES if getattr(defined_cluster, r) is not None)
        print(f"cluster {defined_cluster.module}/{defined_cluster.name} registered ({roles})")

    def _functions(self, picked: dict[str, str | None], defined: set[str]) -> dict[str, Any]:
        """The cell's functions by role: an explicit ``--role NAME`` from the namespace, else the
        role's own name if this cell bound it (a stale ``transform`` from another cell is not
        picked up by accident)."""
        namespace = self.shell.user_ns
        functions: dict[str, Any] = {}
        for role, name in picked.items():
            if name is not None:
                if name not in namespace:
                    raise UsageError(f"--{role} {name}: no such name in the notebook")
                functions[role] = namespace[name]
            elif role in defined and role in namespace:
                functions[role] = namespace[role]
        if "extract" not in functions:
            raise UsageError(
                "the cell defines no extract(h, m, out) function (or pass --extract NAME)"
            )
        return functions

    # -- %nbproc --------------------------------------------------------------------------------------
    @line_magic
    def nbproc(self, line: str) -> Any:
        args = _nbproc_parser().parse_args(shlex.split(line) or ["status"])
        if SERVING_HEADLESS and args.sub not in ("status", "connect"):
            print(f"%nbproc {args.sub}: skipped while serving headless")
            return None
        try:
            return getattr(self, f"_nbproc_{args.sub}")(args)
        except (KeyError, TypeError, ValueError, CoreError, CoreUnavailable, TimeoutError) as exc:
            text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise UsageError(f"%nbproc {args.sub}: {text}") from None

    def _nbproc_status(self, args: Any) -> dict[str, Any]:
        return api.status()

    def _nbproc_connect(self, args: Any) -> None:
        proc = api.connect(args.url, args.core_client)
        print(proc.describe())

    def _nbproc_disconnect(self, args: Any) -> None:
        api.disconnect()
        print("nbproc: disconnected from the core")

    def _nbproc_run(self, args: Any) -> Any:
        outcome = api.run(
            args.name,
            module=args.module,
            config=args.config,
            metadata=_metadata(args.meta),
            wait=args.wait,
            timeout=args.timeout,
        )
        if not args.wait:
            print(f"run {outcome} provisioned through the core")
            return outcome
        print(f"run {outcome.run_id}: {outcome.status}")
        return outcome

    def _nbproc_cancel(self, args: Any) -> None:
        if not api.cancel(_run_id(args.id)):
            raise UsageError(f"run {args.id} is not running on this processor")
        print(f"run {args.id}: cancelling")

    def _nbproc_mount(self, args: Any) -> None:
        api.mount(args.module, args.cluster)

    def _nbproc_unmount(self, args: Any) -> None:
        api.unmount(args.module, args.cluster)

    def _nbproc_result(self, args: Any) -> Any:
        return self._with_run(args.id, api.result)

    def _nbproc_logs(self, args: Any) -> None:
        for stamp, level, message in self._with_run(args.id, api.logs):
            clock = (
                time.strftime("%H:%M:%S", time.localtime(stamp)) + f".{int(stamp % 1 * 1000):03d}"
            )
            print(f"{clock} {level:7} {message}")

    def _nbproc_runs(self, args: Any) -> Any:
        return api.runs()

    def _nbproc_panel(self, args: Any) -> Any:
        api.panel()
        return None

    def _nbproc_stop(self, args: Any) -> None:
        api.stop()
        print("nbproc: processor stopped")

    def _with_run(self, text: str, fn: Any) -> Any:
        try:
            return fn(_run_id(text))
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from None


def _nbproc_parser() -> MagicArgumentParser:
    # IPython's help formatter puts the "%" in front of prog itself
    parser = MagicArgumentParser(prog="nbproc", description="Drive this notebook's processor.")
    sub = parser.add_subparsers(dest="sub", metavar="COMMAND")
    sub.add_parser("status", help="processor, core and connection state")
    connect = sub.add_parser("connect", help="connect to a core by URL (its processor endpoint)")
    connect.add_argument("url")
    connect.add_argument(
        "--core-client", default=None, help="its client endpoint (default: port 8136)"
    )
    sub.add_parser("disconnect", help="deregister from the core")
    run = sub.add_parser("run", help="provision a cluster through the core")
    run.add_argument("name")
    run.add_argument("--module", default=None)
    run.add_argument("--config", default=None, help="a named config (default: the cluster's)")
    run.add_argument("--meta", nargs="*", default=[], metavar="KEY=VALUE", help="run metadata")
    run.add_argument("--wait", action="store_true", help="wait for the run to end")
    run.add_argument("--timeout", type=float, default=None)
    cancel = sub.add_parser("cancel", help="cancel a run")
    cancel.add_argument("id")
    for verb in ("mount", "unmount"):
        p = sub.add_parser(verb, help=f"{verb} a module (or one of its clusters) at the core")
        p.add_argument("module", nargs="?", default=DEFAULT_MODULE)
        p.add_argument("cluster", nargs="?", default=None)
    for verb, text in (("result", "a run's result (a DataFrame)"), ("logs", "a run's log lines")):
        sub.add_parser(verb, help=text).add_argument("id")
    sub.add_parser("runs", help="this processor's runs as a DataFrame")
    sub.add_parser("panel", help="show the monitoring panel")
    sub.add_parser("stop", help="stop the processor")
    return parser


NbprocMagics.nbproc.__doc__ = _nbproc_parser().format_help()
# magic_arguments writes the usage as a line magic's; this one is a cell magic
NbprocMagics.cluster.__doc__ = NbprocMagics.cluster.__doc__.replace("%cluster", "%%cluster", 1)
