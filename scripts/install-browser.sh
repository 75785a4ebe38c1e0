#!/usr/bin/env bash
# Install Debian's chromium for the Playwright browser tests, if missing (needs root and apt-get),
# plus a small CJK font so screenshots of Chinese replies (the demo's identity data) show glyphs.
# Playwright's own browser download does not work offline; the tests launch /usr/bin/chromium.
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || missing+=(fonts-wqy-microhei)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  if [ -x /usr/bin/chromium ]; then
    echo "install-browser: ${missing[*]} missing (optional); screenshots may show boxes for CJK text" >&2
    exit 0
  fi
  echo "install-browser: /usr/bin/chromium is missing; install Debian's chromium package" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq "${missing[@]}" >/dev/null
echo "install-browser: installed ${missing[*]} ($(/usr/bin/chromium --version 2>/dev/null))"
