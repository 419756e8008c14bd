"""Render report.html in headless Chromium, check that every image decoded and that every
column of the super-weight table is filled, take a screenshot.

    apt-get install chromium      # once
    python bench/render_report.py data/        # writes data/report.png

report.html sets data-images-ok on <body> after load; the DOM dump tells whether every
<img> has decoded with a non-zero width. The super-weight table (header "|in|", "|out|":
cells that contain the Markdown column separator) is read from the rendered DOM: its header
must have 8 columns and every row 8 non-empty cells. Without Chromium the table is checked
in report.html as written.
"""
import html.parser
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=5000"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no chromium found: apt-get install chromium")


class _Tables(html.parser.HTMLParser):
    """Every <table> as a list of rows, each a list of cell texts."""

    def __init__(self):
        super().__init__()
        self.tables, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def super_weight_table(page: str) -> list[list[str]]:
    """Rows (header first) of the table whose header starts with "layer", "module"."""
    parser = _Tables()
    parser.feed(page)
    return next((t for t in parser.tables if t and t[0][:2] == ["layer", "module"]), [])


def table_filled(rows: list[list[str]]) -> bool:
    return bool(rows) and len(rows[0]) == 8 and all(len(r) == 8 and all(r) for r in rows[1:])


def check(out_dir: Path) -> tuple[bool, int, Path]:
    html = (out_dir / "report.html").resolve()
    shot = out_dir / "report.png"
    with tempfile.TemporaryDirectory() as prof:
        base = [chromium(), *FLAGS, f"--user-data-dir={prof}"]
        dom = subprocess.run(base + ["--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120).stdout
        subprocess.run(base + ["--window-size=1100,3000", f"--screenshot={shot.resolve()}", html.as_uri()],
                       capture_output=True, timeout=120)
    ok = re.search(r'data-images-ok="(\w+)"', dom)
    n = re.search(r'data-images="(\d+)"', dom)
    (out_dir / "report.dom.html").write_text(dom)
    return bool(ok and ok.group(1) == "true"), int(n.group(1)) if n else 0, shot


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "data")
    good = True
    if any(shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome")):
        ok, n, shot = check(out)
        print(f"images: {n}, all decoded: {ok}, screenshot: {shot}")
        good, page = ok and n > 0, (out / "report.dom.html").read_text()
    else:
        print("no chromium: images not checked; the table is read from report.html as written")
        page = (out / "report.html").read_text()
    rows = super_weight_table(page)
    print(f"super-weight table: {len(rows[0]) if rows else 0} columns, {max(len(rows) - 1, 0)} rows, "
          f"every cell filled: {table_filled(rows)}")
    for r in rows:
        print("  | " + " | ".join(r) + " |")
    sys.exit(0 if good and table_filled(rows) else 1)
