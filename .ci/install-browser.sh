#!/usr/bin/env bash
# Install what the browser test (tests/test_panel_browser.py, marker `browser`) needs that pip
# cannot: Debian's Chromium at /usr/bin/chromium. Playwright drives it through
# executable_path; Playwright's own browser download is not used (it does not work here).
# Idempotent: does nothing when chromium is already installed.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "install-browser: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y chromium
/usr/bin/chromium --version
