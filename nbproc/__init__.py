"""nbproc: turn a live Jupyter notebook into a cluster.tools processor.

``%load_ext nbproc`` starts a processor on its own thread and loop (never on the kernel's) and
connects it to ``$NBPROC_CORE`` or an embedded core; ``%%cluster NAME`` turns a cell's functions
into a cluster; ``%nbproc ...`` drives it. Everything the magics do is also a function here.
"""

from __future__ import annotations

from typing import Any

_API = (
    "cancel",
    "clusters",
    "connect",
    "current",
    "define",
    "disconnect",
    "get_run",
    "logs",
    "mount",
    "panel",
    "get_processor",
    "register",
    "result",
    "run",
    "runs",
    "start",
    "status",
    "stop",
    "unmount",
    "unregister",
)
_ELSEWHERE = {
    "DROP": "cluster",
    "Cluster": "cluster",
    "ClusterDefinitionError": "cluster",
    "Processor": "processor",
    "run_local": "engine",
}


def __getattr__(name: str) -> Any:
    """Import lazily: ``import nbproc.protocol`` (the CLI, the core) must not pull in pandas,
    IPython and the engine."""
    import importlib

    if name in _API:
        return getattr(importlib.import_module(".api", __name__), name)
    if name in _ELSEWHERE:
        return getattr(importlib.import_module(f".{_ELSEWHERE[name]}", __name__), name)
    raise AttributeError(f"module 'nbproc' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [*_ELSEWHERE, *_API]  # noqa: F822 (resolved lazily by __getattr__)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbproc``: start the processor and register the magics."""
    from .extension import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext nbproc`` (and the first half of ``%reload_ext``): stop everything cleanly."""
    from .extension import unload

    unload(ipython)
