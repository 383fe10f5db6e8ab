"""``python -m nbproc``: run an embedded core, serve clusters headless, or run the demo.

``serve`` is how a user outgrows one kernel: the same ``.py`` file (or the notebook itself) that
defined clusters interactively becomes a processor process, and several of them can serve one core.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return int(args.command(args) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nbproc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nbproc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what nbproc does")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    core = sub.add_parser(
        "core", help="run nbproc's embedded core (a cluster.tools core for tests and demos)"
    )
    core.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)",
    )
    core.add_argument(
        "--client-port", type=int, default=8136, help="operators' endpoint (default 8136)"
    )
    core.add_argument(
        "--processor-port", type=int, default=8137, help="processors' endpoint (default 8137)"
    )
    core.set_defaults(command=_core)

    serve = sub.add_parser(
        "serve", help="serve the clusters defined in a .py file or .ipynb notebook"
    )
    serve.add_argument(
        "path",
        type=Path,
        help="a .py file using nbproc.define(...) or a notebook with %%%%cluster cells",
    )
    serve.add_argument(
        "--core",
        default=None,
        help="the core's processor endpoint URL (default: $NBPROC_CORE, else an embedded core)",
    )
    serve.add_argument(
        "--core-client",
        default=None,
        help="the core's client endpoint URL (default: same host, port 8136)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=0, help="port to bind (default: a free port)")
    serve.add_argument(
        "--advertise-host",
        default=None,
        help="host name the core should use to reach this processor",
    )
    serve.add_argument(
        "--max-active", type=int, default=24, help="runs at once before queueing (default 24)"
    )
    serve.set_defaults(command=_serve)

    demo = sub.add_parser("demo", help="run the NYC flights 2013 demo against an embedded core")
    demo.add_argument("--month", default="all", help="1-12, or 'all' (default)")
    demo.set_defaults(command=_demo)
    return parser


def _wait_for_signal() -> None:
    """Block until Ctrl-C or SIGTERM, so both end in the same clean shutdown."""
    done = threading.Event()

    def stop(signum: int, frame: object) -> None:
        done.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not done.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _core(args: argparse.Namespace) -> int:
    from .core import ThreadedCore

    try:
        core = ThreadedCore(
            host=args.host, client_port=args.client_port, processor_port=args.processor_port
        ).start()
    except (OSError, OverflowError) as exc:
        print(
            f"nbproc core: cannot listen on {args.host} ports {args.client_port}/{args.processor_port}: {exc}",
            file=sys.stderr,
        )
        return 2
    print(
        f"nbproc core: client endpoint {core.client_url}, processor endpoint {core.processor_url}",
        flush=True,
    )
    try:
        _wait_for_signal()
    finally:
        core.stop()
        print("nbproc core: stopped", flush=True)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from . import api
    from .notebook import NotebookError
    from .processor import Processor
    from .serve import ServeError, load_clusters

    path: Path = args.path
    if not path.exists():
        print(f"nbproc serve: {path} does not exist", file=sys.stderr)
        return 2
    if args.max_active < 1:
        print(f"nbproc serve: --max-active must be >= 1, got {args.max_active}", file=sys.stderr)
        return 2
    processor = Processor(
        args.core or os.environ.get("NBPROC_CORE") or None,
        core_client=args.core_client or os.environ.get("NBPROC_CORE_CLIENT") or None,
        host=args.host,
        port=args.port,
        advertise_host=args.advertise_host,
        max_active=args.max_active,
    )
    try:
        processor.start()
    except (OSError, OverflowError) as exc:
        print(f"nbproc serve: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    processor.engine.add_listener(_print_run_ends)
    api.use(processor)
    try:
        try:
            clusters = load_clusters(path, processor)
        except (ServeError, NotebookError) as exc:
            print(f"nbproc serve: {exc}", file=sys.stderr)
            return 2
        except Exception:  # the user's file raised while defining its clusters
            print(f"nbproc serve: {path} failed while defining its clusters:", file=sys.stderr)
            traceback.print_exc()
            return 2
        if not clusters:
            print(f"nbproc serve: {path} defines no cluster", file=sys.stderr)
            return 2
        names = ", ".join(f"{c.module}/{c.name}" for c in clusters)
        print(processor.describe(), flush=True)
        if processor.embedded_core is not None:
            print(f"core client endpoint: {processor.core.client_url}", flush=True)
        print(f"serving {names}; Ctrl-C to stop", flush=True)
        _wait_for_signal()
    finally:
        api.use(None)
        processor.stop()
        print("nbproc serve: stopped (deregistered from the core)", flush=True)
    return 0


def _print_run_ends(run: Any) -> None:
    """Headless, the operator's only window on a crash is this process's output."""
    if not run.done:
        return
    line = f"run {run.run_id} {run.module}/{run.name}: {run.status}"
    if run.error:
        line += "\n" + run.error.rstrip()
    print(line, file=sys.__stdout__, flush=True)  # not the run's routed output


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(month=args.month)


if __name__ == "__main__":
    sys.exit(main())
