"""The Python API: one default processor per Python process, and functions that drive it.

Every ``%nbproc`` sub-command and ``%%cluster`` is a thin layer over a function here, so whatever
a user can do in a notebook they can do in a script (and the ``.py`` files given to
``python -m nbproc serve`` use exactly these functions).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from .cluster import DEFAULT_MODULE, Cluster, ClusterDefinitionError
from .engine import Run
from .processor import Processor

_current: Processor | None = None
_lock = threading.RLock()


def start(core: str | None = None, *, connect_timeout: float = 5.0, **options: Any) -> Processor:
    """Start this process's processor (idempotent) and connect it to ``core``.

    ``core`` is a core's processor-endpoint URL; it defaults to ``$NBPROC_CORE``, and with
    neither an embedded core is started on loopback. It waits up to ``connect_timeout`` seconds
    for the registration, then goes on retrying in the background. Options go to :class:`Processor`
    (``host``, ``port``, ``advertise_host``, ``core_client``, ``max_active`` ...).
    """
    global _current
    with _lock:
        if _current is not None and _current.running:
            if core or options.keys() - {"core_client"}:
                raise RuntimeError(
                    "nbproc is already running "
                    f"({_current.describe()}); use nbproc.connect(url) to change cores, "
                    "or nbproc.stop() first to start it with other options"
                )
            return _current
        core = core or os.environ.get("NBPROC_CORE") or None
        options.setdefault("core_client", os.environ.get("NBPROC_CORE_CLIENT") or None)
        _current = Processor(core, **options).start(connect_timeout=connect_timeout)
        return _current


def stop() -> None:
    """Stop this process's processor: deregistered, runs stopped, port released, threads joined."""
    global _current
    with _lock:
        processor, _current = _current, None
    if processor is not None:
        processor.stop()


def current() -> Processor | None:
    """The running default processor, or None."""
    return _current if _current is not None and _current.running else None


def use(processor: Processor | None) -> None:
    """Make ``processor`` the default one (the CLI's ``serve`` does this before running a file)."""
    global _current
    with _lock:
        _current = processor


def get_processor() -> Processor:
    """The default processor, started on first use."""
    return current() or start()


def define(
    name: str,
    extract: Callable[..., Any],
    transform: Callable[..., Any] | None = None,
    load: Callable[..., Any] | None = None,
    *,
    module: str = DEFAULT_MODULE,
    register: bool = True,
    **options: Any,
) -> Cluster:
    """Define cluster ``name`` and (by default) register it with the default processor.

    ``options`` are :class:`~nbproc.cluster.Cluster` fields: ``mode``, ``on_load``, ``on_crash``,
    ``t_functions``, ``l_functions``, ``t_threshold``, ``t_growth``, ``l_threshold``,
    ``l_growth``, ``setup``, ``teardown``, ``verify_et``, ``verify_tl``, ``mount``, ``version`` ...
    Everything is validated before anything is registered.
    """
    known = set(Cluster.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ClusterDefinitionError(f"unknown cluster option(s): {', '.join(unknown)}")
    definition = Cluster(
        name=name, extract=extract, transform=transform, load=load, module=module, **options
    )
    if register:
        get_processor().register(definition)
    return definition


def register(definition: Cluster) -> Cluster:
    """Register an already built :class:`Cluster` with the default processor."""
    return get_processor().register(definition)


def unregister(name: str, module: str | None = None) -> Cluster:
    return get_processor().unregister(name, module)


def clusters() -> list[Cluster]:
    return get_processor().clusters()


def run(
    name: str,
    *,
    module: str | None = None,
    config: str | None = None,
    metadata: Mapping[str, str] | None = None,
    wait: bool = False,
    timeout: float | None = None,
) -> Run | int:
    """Provision cluster ``name`` *through the core*, as an operator would.

    Returns the run id, or with ``wait=True`` the finished :class:`Run` (when this processor
    ran it: with several processors on one core, another may have).
    """
    proc = get_processor()
    run_id = proc.provision(name, module=module, config=config, metadata=metadata)
    if not wait:
        return run_id
    return proc.wait(run_id, timeout)


def cancel(run_id: int) -> bool:
    return get_processor().cancel(run_id)


def get_run(run_id: int) -> Run:
    return get_processor().get_run(run_id)


def result(run_id: int) -> Any:
    """What run ``run_id`` produced (a DataFrame for WaitAndPush runs)."""
    return get_processor().get_run(run_id).result


def logs(run_id: int) -> list[tuple[float, str, str]]:
    return get_processor().get_run(run_id).logs


def runs() -> Any:
    """This processor's runs, newest first, as a pandas DataFrame."""
    import pandas as pd

    rows = []
    for r in get_processor().runs():
        snap = r.snapshot()
        rows.append(
            {
                "id": r.run_id,
                "module": r.module,
                "cluster": r.name,
                "status": str(r.status),
                "extracted": snap.extracted,
                "loaded": snap.loaded,
                "dropped": snap.dropped,
                "elapsed_s": round(snap.elapsed, 3),
                "restarts": r.restarts,
            }
        )
    columns = [
        "id",
        "module",
        "cluster",
        "status",
        "extracted",
        "loaded",
        "dropped",
        "elapsed_s",
        "restarts",
    ]
    return pd.DataFrame(rows, columns=columns)


def status() -> dict[str, Any]:
    proc = current()
    if proc is None:
        return {"processor": None, "connection": "stopped"}
    return proc.status()


def connect(core: str | None = None, core_client: str | None = None) -> Processor:
    """Connect the default processor to another core (None: an embedded one); clusters follow."""
    proc = get_processor()
    proc.connect(core, core_client)
    return proc


def disconnect() -> None:
    proc = current()
    if proc is not None:
        proc.disconnect()


def mount(module: str, cluster: str | None = None) -> None:
    get_processor().mount(module, cluster, True)


def unmount(module: str, cluster: str | None = None) -> None:
    get_processor().mount(module, cluster, False)


def panel() -> Any:
    """Display (and return) a monitoring panel for the default processor."""
    from .widgets import Panel

    shown = Panel(get_processor())
    shown.show()
    return shown
