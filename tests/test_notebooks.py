"""The example notebooks run top to bottom, unattended, in a real kernel (as on Binder and in CI).

Each notebook is executed with nbclient in the ``python3`` kernel from the notebooks directory,
as Jupyter would; any cell error fails the test, and a key output per notebook shows it did
what it says (a notebook that "runs" but prints nothing useful is a broken example too).
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.kernel

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["01-quickstart.ipynb", "02-flights-etl.ipynb", "03-connect-a-core.ipynb"]


@pytest.fixture(autouse=True)
def no_external_core(monkeypatch):
    """The notebooks pick their core themselves; an inherited $NBPROC_CORE would change that."""
    monkeypatch.delenv("NBPROC_CORE", raising=False)
    monkeypatch.delenv("NBPROC_CORE_CLIENT", raising=False)


def execute(name: str) -> str:
    """Run the notebook; return everything it printed or displayed, as text."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    ).execute()
    return "\n".join(_texts(notebook))


def _texts(notebook: nbformat.NotebookNode) -> list[str]:
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                texts.append(output.text)
            elif output.output_type in ("execute_result", "display_data"):
                texts.extend(str(v) for k, v in output.data.items() if k.startswith("text/"))
    return texts


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_are_clean(name):
    """Outputs stripped (reviewable diffs, no stale results) and the standard kernel."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_quickstart():
    out = execute("01-quickstart.ipynb")
    assert re.search(r"run 1: completed", out)
    assert "length" in out  # Vec's result DataFrame
    assert "pushed 12, dropped 4, loaded 8" in out  # the Python API run, DROP included
    assert "status at the core: completed" in out


def test_flights_etl():
    out = execute("02-flights-etl.ipynb")
    assert "336,776 flights, 16 airlines" in out
    assert "run 1 at the core: completed" in out
    assert "chunks: extracted 14, transformed 14, loaded 14, dropped 0" in out
    assert "flights aggregated: 327,346 of 336,776" in out
    assert "United Air Lines Inc." in out
    assert "\n[]\n" in f"\n{out}\n"  # no difference from the direct pandas computation


def test_connect_a_core():
    out = execute("03-connect-a-core.ipynb")
    assert "the core refuses to run it" in out and "is not mounted" in out
    assert re.search(r"run \d+: active, \d+ items in", out)  # the stream, started by the core
    assert len(re.findall(r"at the core: cancelled", out)) == 2  # the stream and the batch run
    assert re.search(r"run \d+ on processor 127\.0\.0\.1:\d+: completed, 3 items loaded", out)
    assert "serve exited with 0" in out
    assert "core exited with 0" in out
