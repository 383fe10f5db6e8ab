"""What ``%load_ext nbproc`` and ``%unload_ext nbproc`` do to a running IPython."""

from __future__ import annotations

import atexit
from typing import Any

from . import api
from .capture import install_output_routing, uninstall_output_routing
from .magics import NbprocMagics


def load(ipython: Any, announce: bool = True) -> None:
    ipython.register_magics(NbprocMagics)
    install_output_routing()
    # A kernel must not hang on a core that is down: wait briefly, then retry in the background.
    proc = api.start(connect_timeout=1.0)
    atexit.register(api.stop)  # kernel exit: deregister and release the port
    if announce:
        print(f"{proc.describe()}; show the panel with %nbproc panel")


def unload(ipython: Any) -> None:
    api.stop()
    atexit.unregister(api.stop)
    uninstall_output_routing()
