"""The panel in a real kernel, executed by nbclient: the widget state it stores is the page's.

nbclient records every widget message of a cell (comm opens and state updates) into the
notebook's ``widgets`` metadata. The run ends while a cell waits; the updater thread's messages
carry that cell's parent header (ipykernel's fallback for threads), so they are in the record.
"""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.kernel

ITEMS = 30_000

CELLS = [
    "%load_ext nbproc",
    f"""%%cluster Counted
def extract(h, m, out):
    for i in range({ITEMS}):
        out.push({{"i": i}})""",
    "import nbproc\npanel = nbproc.panel()",
    """import time
run = nbproc.run("Counted", wait=True, timeout=60)
shown = panel.wait_for(
    lambda p: p.row_state() and p.row_state()[0]["status"] == "completed", timeout=30
)
time.sleep(0.5)  # the updater flushes during this cell, so nbclient records it
print(run.status, shown)""",
    "nbproc.panel()",
    "%nbproc panel",
    "%nbproc stop",
]


def test_stored_widget_state_holds_the_completed_run(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    client = NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        store_widget_state=True,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    assert "completed True" in "".join(o.get("text", "") for o in nb.cells[3].outputs)
    states = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    by_class: dict[str, list[dict]] = {}
    for model in states.values():
        for css in model["state"].get("_dom_classes", []):
            by_class.setdefault(css, []).append(model["state"])
    assert by_class["nbproc-panel"], "the panel itself is in the stored state"
    statuses = by_class["nbproc-status-completed"]
    assert any("completed" in s["value"] for s in statuses)
    counters = [s["value"] for s in by_class["nbproc-counters"]]
    assert any(f"loaded {ITEMS:,}" in value for value in counters), counters
    results = [s["value"] for s in by_class["nbproc-result"]]
    assert any(f"{ITEMS:,} rows × 1 columns" in value for value in results), results
    # each way of showing a panel displays it once, as a model the stored state holds
    for cell in (2, 4, 5):
        views = [
            o["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
            for o in nb.cells[cell].outputs
            if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
        ]
        assert len(views) == 1 and views[0] in states, nb.cells[cell].outputs
