"""Execute a notebook's code cells headless, so its ``%%cluster`` cells register for serving.

The notebook a user prototyped in is the deployment: ``python -m nbproc serve notebook.ipynb``
runs its cells in a plain IPython shell (no kernel, no frontend) with the nbproc magics loaded.
Operator actions in it (``%nbproc run``, ``panel`` ...) are skipped while serving; a cell tagged
``nbproc-skip`` is not run at all (for plots, experiments, anything slow).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SKIP_TAG = "nbproc-skip"
# The served processor is already running with the magics loaded: these lines have nothing to do.
_LOAD_LINE = re.compile(r"^\s*%(re)?load_ext\s+nbproc\s*$", re.MULTILINE)


class NotebookError(RuntimeError):
    """A cell of the served notebook failed."""


def code_cells(path: Path) -> list[tuple[int, str]]:
    """(cell number, source) of the code cells to run, in order."""
    try:
        notebook = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NotebookError(f"{path}: not a readable notebook ({exc})") from None
    cells = []
    for number, cell in enumerate(notebook.get("cells", []), start=1):
        if cell.get("cell_type") != "code":
            continue
        if SKIP_TAG in (cell.get("metadata", {}).get("tags") or []):
            continue
        source = cell.get("source", "")
        text = "".join(source) if isinstance(source, list) else source
        cells.append((number, _LOAD_LINE.sub("", text)))
    return cells


def run_notebook(path: Path) -> None:
    """Run the notebook's code cells in a headless IPython shell with nbproc loaded."""
    from IPython.core.interactiveshell import InteractiveShell

    from . import magics
    from .extension import load

    shell = InteractiveShell.instance()
    magics.SERVING_HEADLESS = True
    try:
        load(shell, announce=False)  # the processor is already current: registers the magics
        for number, source in code_cells(path):
            result = shell.run_cell(source, store_history=False)
            if not result.success:
                error = result.error_in_exec or result.error_before_exec
                raise NotebookError(
                    f"{path}: cell {number} failed: {type(error).__name__}: {error}"
                )
    finally:
        magics.SERVING_HEADLESS = False
