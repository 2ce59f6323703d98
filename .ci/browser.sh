#!/usr/bin/env bash
# Headless Chromium for the browser tests of the registry pages (tests/registry/server/web/test_browser.py):
# Debian's chromium + chromium-driver, installed with apt when missing. Never fails CI: without
# apt (or without network) the browser tests skip, saying why.
set -u
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "browser.sh: no apt-get here; the browser tests will be skipped" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "browser.sh: not root and no sudo; the browser tests will be skipped" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get update -qq >/dev/null 2>&1 &&
   $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1; then
  echo "browser.sh: installed $(chromium --version 2>/dev/null)" >&2
else
  echo "browser.sh: could not install chromium and chromium-driver; the browser tests will be skipped" >&2
fi
exit 0
