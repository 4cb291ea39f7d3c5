#!/usr/bin/env bash
# Render RUN_DIR/report.html in headless Chromium and save a PNG screenshot.
# Usage: scripts/screenshot_report.sh RUN_DIR OUT.png [WIDTH,HEIGHT]
# Builds the report first (latentpatch report RUN_DIR) if report.html is missing.
# Needs chromium (Debian: apt-get install -y chromium). Offline: no network is used.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 RUN_DIR OUT.png [WIDTH,HEIGHT]" >&2
  exit 2
fi
run_dir=$(cd "$1" && pwd)
out=$(realpath -m "$2")
size=${3:-1400,3000}
chrome=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
if [ -z "$chrome" ]; then
  echo "error: chromium not found: apt-get install -y chromium (or set CHROMIUM=/path/to/chrome)" >&2
  exit 2
fi
if [ ! -f "$run_dir/report.html" ]; then
  latentpatch report "$run_dir" >/dev/null
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$chrome" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --hide-scrollbars --user-data-dir="$profile" --window-size="$size" \
  --screenshot="$out" "file://$run_dir/report.html" >/dev/null 2>&1 || true
if [ ! -s "$out" ]; then
  echo "error: chromium wrote no screenshot to $out" >&2
  exit 1
fi
echo "$out"
