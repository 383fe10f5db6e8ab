"""The panel in a real JupyterLab, in a real Chromium, driven by Playwright.

JupyterLab runs headless on loopback with a token, isolated in a temporary directory (its
settings, workspaces and runtime files too, so nothing from the user's own setup leaks in). The
test writes a notebook, runs all its cells from JupyterLab's Run menu, and then looks at the page
only through CSS selectors the panel promises (its ``_dom_classes``).

Locally the test skips when Chromium or the browser extra is missing; in CI (``CI=true``) that is
a failure, since CI installs them (``.ci/install-browser.sh``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import free_port

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).parent / "artifacts"
ITEMS = 20_000
TIMEOUT_MS = 120_000

CELLS = [
    "%load_ext nbproc",
    f"""%%cluster Numbers
def extract(h, m, out):
    for i in range({ITEMS}):
        out.push({{"i": i, "square": i * i, "label": f"item {{i}}"}})""",
    """%%cluster Forever
import time

def extract(h, m, out):
    i = 0
    while out.push({"i": i}):
        i += 1
        time.sleep(0.001)""",
    "import nbproc\npanel = nbproc.panel()",
    "%nbproc run Numbers --wait --timeout 60",
]


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium, or run .ci/install-browser.sh)"
    for module in ("jupyterlab", "playwright"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[browser]')"
    if shutil.which("jupyter", path=str(Path(sys.executable).parent)) is None:
        return "the jupyter command is not installed next to this Python"
    return None


@pytest.fixture(scope="module")
def requirements() -> None:
    reason = _missing()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the browser test, but {reason}")
    pytest.skip(reason)


def _notebook() -> dict:
    return {
        "cells": [
            {
                "cell_type": "code",
                "metadata": {},
                "source": s,
                "outputs": [],
                "execution_count": None,
            }
            for s in CELLS
        ],
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def _isolated_env(home: Path) -> dict[str, str]:
    """Jupyter's config, data, runtime and lab settings inside ``home``; no news, no update checks."""
    settings = home / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    env = dict(os.environ)
    env.pop("NBPROC_CORE", None)  # the notebook uses its own embedded core
    env.pop("NBPROC_CORE_CLIENT", None)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")  # kernels start "python" from PATH
    env.update(
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(home / "lab-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        IPYTHONDIR=str(home / "ipython"),
    )
    return env


def _wait_for_server(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"jupyter lab exited with {process.returncode}:\n{log.read_text()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"jupyter lab did not answer within 90 s:\n{log.read_text()}")


def _ours(marker: str) -> list[int]:
    """Processes whose command line names our private directory (the kernels jupyter started)."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


def _stop_jupyter(process: subprocess.Popen, base: str, token: str, home: Path) -> None:
    """Shut the server down politely (it stops its kernels), then make sure nothing is left."""
    try:
        request = urllib.request.Request(
            f"{base}/api/shutdown", method="POST", headers={"Authorization": f"token {token}"}
        )
        urllib.request.urlopen(request, timeout=10).close()
    except OSError:
        pass
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    for pid in _ours(str(home)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def lab(requirements, tmp_path) -> Iterator[tuple[str, str]]:
    """A running JupyterLab: yields (base URL, token); the notebook is ``panel.ipynb``."""
    root, home = tmp_path / "root", tmp_path / "home"
    root.mkdir()
    home.mkdir()
    (root / "panel.ipynb").write_text(json.dumps(_notebook()))
    token, port = secrets.token_hex(16), free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "jupyter.log"
    jupyter = str(Path(sys.executable).parent / "jupyter")
    command = [
        jupyter,
        "lab",
        "--no-browser",
        f"--IdentityProvider.token={token}",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=",
        "--LabApp.extension_manager=readonly",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # CI containers run as root
    with log.open("w") as sink:
        process = subprocess.Popen(
            command, env=_isolated_env(home), stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        _wait_for_server(process, f"{base}/api/status?token={token}", log)
        yield base, token
    finally:
        _stop_jupyter(process, base, token, home)
    assert not _ours(str(home)), "processes of the test's JupyterLab are still running"


def test_panel_in_jupyterlab_shows_runs_and_cancels(lab):
    from playwright.sync_api import expect, sync_playwright

    base, token = lab
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            try:
                _drive(page, base, token, expect)
            finally:
                page.screenshot(path=str(ARTIFACTS / "lab.png"))
        finally:
            browser.close()


def _drive(page, base: str, token: str, expect) -> None:
    page.goto(f"{base}/lab/tree/panel.ipynb?token={token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    _wait_for_kernel(base, token)
    expect(page.locator(".jp-StatusBar-Widget", has_text="| Idle")).to_be_visible()
    _run_all(page)
    _accept_kernel_dialog(page)

    panel = page.locator(".nbproc-panel")
    expect(panel).to_be_visible()
    expect(panel.locator(".nbproc-header")).to_contain_text("connected")
    done = panel.locator(".nbproc-run-row", has=page.locator(".nbproc-status-completed"))
    expect(done).to_have_count(1)
    expect(done.locator(".nbproc-counters")).to_contain_text(f"loaded {ITEMS:,}")
    result = panel.locator(".nbproc-result")
    expect(result.locator("table")).to_be_visible()
    expect(result).to_contain_text(f"{ITEMS:,} rows × 3 columns")

    # a long run, started from the panel's own Run button, cancelled from its row
    panel.locator(".nbproc-cluster-Forever .nbproc-run-button").click()
    active = panel.locator(".nbproc-run-row", has=page.locator(".nbproc-status-active"))
    expect(active).to_have_count(1)
    expect(active.locator(".nbproc-counters")).to_contain_text("items/s")
    active.locator(".nbproc-cancel").click()
    cancelled = panel.locator(".nbproc-run-row", has=page.locator(".nbproc-status-cancelled"))
    expect(cancelled).to_have_count(1)
    expect(cancelled.locator(".nbproc-cancel")).to_be_hidden()

    # back to the completed run: its result table is what the screenshot shows
    done.locator(".nbproc-select").click()
    expect(panel.locator(".nbproc-detail-title")).to_contain_text("Numbers")
    expect(result.locator("table")).to_be_visible()
    panel.scroll_into_view_if_needed()
    panel.screenshot(path=str(ARTIFACTS / "panel.png"))


def _wait_for_kernel(base: str, token: str) -> None:
    """The notebook's session has a kernel that answered (the server's view of it)."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{base}/api/sessions?token={token}", timeout=5) as r:
            sessions = json.load(r)
        if any(s.get("kernel", {}).get("execution_state") == "idle" for s in sessions):
            return
        time.sleep(0.3)
    raise AssertionError(f"no idle kernel for the notebook: {sessions}")


def _accept_kernel_dialog(page) -> None:
    """Should JupyterLab still ask which kernel to use, take the one it proposes (python3)."""
    dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
    try:
        dialog.wait_for(state="visible", timeout=3_000)
    except Exception:  # noqa: BLE001 - no dialog: the usual case
        return
    dialog.locator(".jp-Dialog-footer button", has_text="Select").click()


def _run_all(page) -> None:
    """Run > Run All Cells, through JupyterLab's menu bar."""
    page.locator(".lm-MenuBar-itemLabel").filter(has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel").filter(has_text=re.compile(r"^Run All Cells$")).click()
