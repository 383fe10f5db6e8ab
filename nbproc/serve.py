"""Load the clusters a file defines, for ``python -m nbproc serve``.

A ``.py`` file uses the Python API (``nbproc.define(...)``); a notebook's code cells run in a
headless IPython shell with the extension loaded, so its ``%%cluster`` cells register exactly as
they do in Jupyter. Either way the definitions land in the processor made current by the caller.
"""

from __future__ import annotations

import runpy
from pathlib import Path

from .cluster import Cluster
from .processor import Processor


class ServeError(RuntimeError):
    """The file cannot be served (wrong kind, or it failed while defining its clusters)."""


def load_clusters(path: Path, processor: Processor) -> list[Cluster]:
    """Execute ``path`` so that its cluster definitions register with ``processor``."""
    suffix = path.suffix.lower()
    if suffix == ".py":
        runpy.run_path(str(path), run_name="__nbproc_serve__")
    elif suffix == ".ipynb":
        from .notebook import run_notebook

        run_notebook(path)
    else:
        raise ServeError(f"{path}: expected a .py file or an .ipynb notebook")
    return processor.clusters()
