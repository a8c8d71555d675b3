#!/usr/bin/env bash
# Render an HTML file (e.g. `aic report --html`) to a PNG with headless Chromium, to look at or attach.
#   tools/render_html.sh report.html report.png [width=1200] [height=4200]
# Needs Debian's chromium (apt install chromium) or Google Chrome on PATH.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 IN.html OUT.png [width] [height]" >&2; exit 2; }
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "$0: no chromium or google-chrome on PATH (apt install chromium)" >&2; exit 1; }
"$browser" --headless=new --no-sandbox --disable-gpu --hide-scrollbars \
  --window-size="${3:-1200},${4:-4200}" --screenshot="$(realpath -m "$2")" "file://$(realpath "$1")" 2>/dev/null
[ -s "$2" ] || { echo "$0: chromium wrote no PNG" >&2; exit 1; }
echo "$2"
