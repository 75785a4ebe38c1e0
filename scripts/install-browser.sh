#!/usr/bin/env bash
# Install Debian's chromium for the Playwright browser tests, if missing (needs root and apt-get).
# Playwright's own browser download does not work offline; the tests launch /usr/bin/chromium.
set -euo pipefail
[ -x /usr/bin/chromium ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-browser: /usr/bin/chromium is missing; install Debian's chromium package" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq chromium >/dev/null
echo "install-browser: installed $(/usr/bin/chromium --version)"
