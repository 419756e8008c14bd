"""Render a report.html (or compare.html) in headless Chromium at a given window width and check
that every table fits the page or scrolls inside its own box, and that the page itself never
scrolls sideways (a 1,100 px window once cut the perplexity table's KL and top-1 columns).

    apt-get install chromium                         # once
    python bench/check_html.py data/report.html      # exit 0: every table fits or scrolls in its box
    python bench/check_html.py data/report.html --width 800

A copy of the page with a measuring script is loaded (the page's images are inline, so the copy
renders the same); the script writes each table's box into <body> and Chromium's --dump-dom gives
it back. No browser: exit 2, saying so.
"""
from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=5000"]

# Each table: its right edge, and whether it sits in a box that scrolls sideways (overflow-x auto or
# scroll) whose right edge is inside the window; the page's own scroll width against the window's.
MEASURE = """<script>window.addEventListener('load', () => {
  const vw = document.documentElement.clientWidth;
  const tables = [...document.querySelectorAll('table')].map((t, i) => {
    const r = t.getBoundingClientRect();
    let box = t.parentElement, scrolls = false;
    while (box && box !== document.body) {
      const o = getComputedStyle(box).overflowX;
      if (o === 'auto' || o === 'scroll') { scrolls = true; break; }
      box = box.parentElement;
    }
    const b = scrolls ? box.getBoundingClientRect() : null;
    return {index: i, header: (t.rows[0] ? t.rows[0].innerText : '').replace(/\\s+/g, ' ').slice(0, 70),
            left: r.left, right: r.right, scrolls: scrolls, box_right: b ? b.right : null};
  });
  document.body.dataset.layout = JSON.stringify({view_width: vw,
    page_width: document.documentElement.scrollWidth, tables: tables});
});</script>"""


def chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, or None."""
    names = ("chromium", "chromium-browser", "google-chrome")
    return next((shutil.which(n) for n in names if shutil.which(n)), None)


def measure(page: Path, width: int = 1100) -> dict:
    """The layout of ``page`` rendered at ``width`` px: {"view_width", "page_width", "tables": [...]}."""
    browser = chromium()
    if not browser:
        raise FileNotFoundError("no headless browser: chromium, chromium-browser or google-chrome not on "
                                "PATH")
    text = Path(page).read_text(encoding="utf-8")
    text = text.replace("</body>", MEASURE + "</body>", 1) if "</body>" in text else text + MEASURE
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "page.html"
        copy.write_text(text, encoding="utf-8")
        cmd = [browser, *FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size={width},2000",
               "--dump-dom", copy.as_uri()]
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'data-layout="([^"]*)"', dom)
    if not m:
        raise RuntimeError("the page did not report its layout (did it load?)")
    return json.loads(html.unescape(m.group(1)))


def problems(layout: dict) -> list[str]:
    """Each table that runs past the window without a scrolling box, and a page wider than the window."""
    vw, out = layout["view_width"], []
    for t in layout["tables"]:
        inside = t["right"] <= vw + 0.5
        boxed = t["scrolls"] and t["box_right"] is not None and t["box_right"] <= vw + 0.5
        if not (inside or boxed):
            out.append(f"table {t['index']} ({t['header']!r}) ends at {t['right']:.0f} px, past the "
                       f"{vw} px window, and no box of it scrolls")
    if layout["page_width"] > vw:
        out.append(f"the page is {layout['page_width']} px wide in a {vw} px window: it scrolls sideways")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("--width", type=int, default=1100)
    a = ap.parse_args(argv)
    if not chromium():
        print("no headless browser (chromium) on PATH: nothing checked; apt-get install chromium")
        return 2
    layout = measure(a.page, a.width)
    bad = problems(layout)
    print(f"{a.page}: {len(layout['tables'])} tables at {layout['view_width']} px, page width "
          f"{layout['page_width']} px")
    for t in layout["tables"]:
        fits = t["right"] <= layout["view_width"] + 0.5
        how = "fits" if fits else "scrolls in its box" if t["scrolls"] else "CUT"
        print(f"  table {t['index']}: right edge {t['right']:.0f} px, {how}: {t['header']}")
    print("\n".join(["FAIL:"] + bad) if bad else "OK: every table fits or scrolls inside its box")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
