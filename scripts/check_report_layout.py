#!/usr/bin/env python
"""Check a run's report.html in headless Chromium: no horizontal overflow at a given width (every
folded <details> opened) and no empty section. Prints one JSON line; exit 0 if the page passes, 1 if
not, 2 without Chromium or report.html.

Usage: python scripts/check_report_layout.py RUN_DIR [--width 1280]

The page itself has no script (it is one offline file); this copies it to a temporary folder with a
short script appended that measures the laid-out page, and reads the result from Chromium's
``--dump-dom``. Needs chromium (Debian: ``apt-get install -y chromium``; or set ``CHROMIUM``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Opens every <details>, then records the page's width, the elements wider than the window and the
# sections with no text besides their heading, into <body data-layout="...">.
MEASURE = """<script>
window.addEventListener("load", () => {
  document.querySelectorAll("details").forEach(d => { d.open = true; });
  const width = window.innerWidth;
  const wide = [...document.querySelectorAll("main *")]
    .filter(e => e.getBoundingClientRect().right > width + 1)
    .map(e => (e.closest("section") || {}).id + ":" + e.tagName.toLowerCase()).slice(0, 20);
  const empty = [...document.querySelectorAll("section")]
    .filter(s => s.innerText.replace(s.querySelector("h2")?.innerText || "", "").trim().length < 20)
    .map(s => s.id);
  document.body.setAttribute("data-layout", JSON.stringify({
    width, scroll_width: document.documentElement.scrollWidth, wide, empty,
    sections: [...document.querySelectorAll("section")].map(s => s.id)}));
});
</script>"""


def chromium() -> str | None:
    """The Chromium binary: ``$CHROMIUM`` or the first of chromium, chromium-browser, google-chrome on PATH."""
    names = [os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"]
    return next((found for n in names if n and (found := shutil.which(n))), None)


def measure(report: Path, width: int = 1280, height: int = 900) -> dict:
    """The layout of ``report`` at ``width`` px: ``{width, scroll_width, wide, empty, sections}``."""
    chrome = chromium()
    if chrome is None:
        raise FileNotFoundError("chromium not found: apt-get install -y chromium (or set CHROMIUM=/path/to/chrome)")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "report.html"
        page.write_text(report.read_text().replace("</body>", MEASURE + "</body>", 1))
        out = subprocess.run(
            [
                chrome,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--hide-scrollbars",
                f"--user-data-dir={Path(tmp) / 'profile'}",
                f"--window-size={width},{height}",
                "--virtual-time-budget=5000",
                "--dump-dom",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    found = re.search(r'data-layout="([^"]*)"', out)
    if not found:
        raise RuntimeError("chromium gave no layout (the page did not load)")
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def problems(layout: dict) -> list[str]:
    """What is wrong with a measured layout (empty: nothing)."""
    out = []
    if layout["scroll_width"] > layout["width"]:
        out.append(f"horizontal overflow: page {layout['scroll_width']} px wide at {layout['width']} px")
    if layout["wide"]:
        out.append("wider than the window: " + ", ".join(layout["wide"]))
    if layout["empty"]:
        out.append("empty sections: " + ", ".join(layout["empty"]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    report = args.run_dir / "report.html"
    if not report.is_file():
        print(f"error: {report}: no report.html; fix: latentpatch report {args.run_dir}", file=sys.stderr)
        return 2
    try:
        layout = measure(report, args.width)
    except FileNotFoundError as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2
    found = problems(layout)
    print(json.dumps({**layout, "problems": found}))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
