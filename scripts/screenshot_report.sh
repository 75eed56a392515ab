#!/usr/bin/env bash
# Screenshot a csulora_report.html with headless Chromium (Debian: apt-get install chromium), to look at it.
# Usage: scripts/screenshot_report.sh REPORT.html OUT.png [WIDTHxHEIGHT]   (default 1400x1000)
# The page needs no network; the flags keep Chromium from reaching out on its own.
set -euo pipefail
html=${1:?usage: $0 REPORT.html OUT.png [WIDTHxHEIGHT]}
png=${2:?usage: $0 REPORT.html OUT.png [WIDTHxHEIGHT]}
size=${3:-1400x1000}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "no chromium found; install it (Debian: apt-get install -y chromium)" >&2
  exit 2
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
  --disable-sync --no-first-run --hide-scrollbars --user-data-dir="$profile" \
  --screenshot="$(realpath -m "$png")" --window-size="${size/x/,}" "file://$(realpath "$html")" 2>/dev/null
echo "wrote $png"
