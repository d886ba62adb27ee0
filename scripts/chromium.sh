#!/usr/bin/env bash
# Headless Chromium for the browser tests: tests/test_eval_report.py (it opens `souverain eval`'s
# HTML report and checks that its plots decode) and tests/test_console*.py (Selenium drives the
# web console through chromedriver). Installs the Debian packages `chromium` and
# `chromium-driver` (the driver of the same version) with apt-get when either is missing, as
# scripts/postgres.sh installs postgresql (sudo when not root);
# without apt-get, or with SOUVERAIN_CHROMIUM_NO_INSTALL=1, it says so and exits 0: the
# browser test then fails, naming this script. Prints the binary's path when there is one.
set -euo pipefail

find_chromium() {
  local name
  for name in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
  done
  return 1
}

if path=$(find_chromium) && command -v chromedriver >/dev/null 2>&1; then
  echo "$path"
  exit 0
fi
if [ "${SOUVERAIN_CHROMIUM_NO_INSTALL:-0}" = "1" ]; then
  echo "chromium not found and SOUVERAIN_CHROMIUM_NO_INSTALL=1: not installing it" \
       "(the HTML report's browser test will fail)" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium not found and no apt-get here: install Chromium with your package manager" \
       "(the HTML report's browser test fails until then)" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "chromium not found, not root and no sudo: install the chromium package as root" \
         "(the HTML report's browser test fails until then)" >&2
    exit 0
  fi
  sudo="sudo"
fi
$sudo apt-get update -qq >&2
# --no-install-recommends: the browser alone (no fonts beyond its dependencies, no GPU drivers)
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
path=$(find_chromium) || { echo "chromium installed but its binary is not on PATH" >&2; exit 3; }
echo "$path"
