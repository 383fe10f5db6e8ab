"""Session-wide test setup."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Kernel specs (ipykernel's "python3") start "python" from PATH: make that the interpreter running
# the tests, so kernels, nbclient and `python -m nbproc` subprocesses see the same environment
# even when pytest was started as `.venv/bin/python -m pytest` without activating the venv.
_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[:1] != [_BIN]:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")

sys.path.insert(0, str(Path(__file__).parent))  # tests/support.py
