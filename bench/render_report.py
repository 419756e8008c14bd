"""Render report.html in headless Chromium, check that every image decoded, take a screenshot.

    apt-get install chromium      # once
    python bench/render_report.py data/        # writes data/report.png

report.html sets data-images-ok on <body> after load; the DOM dump tells whether every
<img> has decoded with a non-zero width.
"""
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
    return bool(ok and ok.group(1) == "true"), int(n.group(1)) if n else 0, shot


if __name__ == "__main__":
    ok, n, shot = check(Path(sys.argv[1] if len(sys.argv) > 1 else "data"))
    print(f"images: {n}, all decoded: {ok}, screenshot: {shot}")
    sys.exit(0 if ok and n > 0 else 1)
