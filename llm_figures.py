"""How every figure is made and saved (matplotlib, Agg): PNG and PDF written atomically, log and
symlog axes in plain numbers, legends moved off the data, and the caption line of ``captioned``.

``llm_plots`` draws the figures themselves; this module is the one place their look is set.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import textwrap
from pathlib import Path
from typing import Optional

import matplotlib
import matplotlib.text
import numpy as np

matplotlib.use("Agg")  # before pyplot: plots are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import (FixedLocator, FuncFormatter, MaxNLocator, NullFormatter,  # noqa: E402
                               NullLocator, ScalarFormatter)

import llm_io as IO


log = logging.getLogger("llm.plots")
# PDFs embed their fonts (Type 42, as papers ask); fontTools logs every subset at INFO, which would
# flood a run's log.
logging.getLogger("fontTools").setLevel(logging.WARNING)

_CAPTION: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("figure_caption", default=None)


@contextlib.contextmanager
def captioned(text: Optional[str]):
    """Figures saved inside this block carry ``text`` as their caption line."""
    token = _CAPTION.set(text)
    try:
        yield
    finally:
        _CAPTION.reset(token)


def plain_number(v: float) -> str:
    """A tick label a reader reads at a glance: 20, 0.05, 1,000,000, 0.0000001 (never mathtext
    10^k, never 1e-07: four significant digits, written out)."""
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return np.format_float_positional(float(f"{v:.4g}"), trim="-")


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis over [lo, hi]: powers of ten, then 1-2-5 and finer steps where
    fewer than three fall inside (perplexity spanning less than a decade), then plain linear steps."""
    if not (lo > 0 and hi > lo and math.isfinite(hi)):
        return []
    ks = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
    for subs in ((1,), (1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 8)):
        ticks = [m * 10.0 ** k for k in ks for m in subs if lo <= m * 10.0 ** k <= hi]
        if len(ticks) >= 3:
            return ticks[::math.ceil(len(ticks) / 8)]  # at most 8 labels, e.g. over many decades
    return [t for t in MaxNLocator(4).tick_values(lo, hi) if lo <= t <= hi]


def _plain_ticks(ax) -> None:
    """Every axis (colorbars too) labelled in plain numbers a reader need not decode: a linear axis
    never with matplotlib's offset ("1e-6+5e-1" in a corner, so 0.5000000 and 0.5000046 sat at
    opposite ends as if far apart) or a "1e7" multiplier, each tick written out in full; log and
    symlog axes never in mathtext 10^k, and a log axis whose range holds fewer than three powers of
    ten gets finer ticks, so it is never unlabelled."""
    for axis in (ax.xaxis, ax.yaxis):
        scale = axis.get_scale()
        fmt = axis.get_major_formatter()
        if scale == "linear" and isinstance(fmt, ScalarFormatter):
            fmt.set_useOffset(False)
            fmt.set_scientific(False)
        if scale not in ("log", "symlog"):
            continue
        if scale == "log" and not isinstance(axis.get_major_locator(), FixedLocator):
            lo, hi = sorted(axis.get_view_interval())
            ticks = log_ticks(lo, hi)
            if ticks:
                axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(FuncFormatter(lambda v, _: plain_number(v)))
        axis.set_minor_formatter(NullFormatter())


def legend_covers_data(ax, legend, renderer) -> bool:
    """Whether ``legend``'s box covers a plotted line, band or bar of ``ax`` (display coordinates)."""
    box = legend.get_window_extent(renderer)
    for line in ax.lines:
        drawn = line.get_transform().transform_path(line.get_path())
        if line.get_visible() and drawn.intersects_bbox(box, False):
            return True
    for coll in ax.collections:
        for p in coll.get_paths():
            if coll.get_transform().transform_path(p).intersects_bbox(box, True):
                return True
    return any(p.get_visible() and p.get_window_extent(renderer).overlaps(box) for p in ax.patches)


def _legends_off_data(fig) -> None:
    """A legend matplotlib placed "best" inside its axes moves out to the right of them where it
    still covers data (a line across the whole width, a crowded panel): legends never hide data."""
    renderer = None
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is None or leg._loc not in (0, None):  # 0: loc="best"; an explicit place was chosen
            continue
        renderer = renderer or (fig.canvas.draw() or fig.canvas.get_renderer())
        if legend_covers_data(ax, leg, renderer):
            handles, labels = ax.get_legend_handles_labels()
            size = leg.get_texts()[0].get_fontsize() if leg.get_texts() else 8
            leg.remove()
            ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                      fontsize=size)


def _add_caption(fig, caption: str) -> None:
    """The caption line(s) under everything the figure draws (its tight box), wrapped to its width."""
    renderer = fig.canvas.get_renderer()
    box = fig.get_tightbbox(renderer)  # inches
    width_chars = max(40, int(box.width * 72 / (7 * 0.55)))
    fig.text(box.x0 / fig.get_figwidth(), (box.y0 - 0.08) / fig.get_figheight(),
             textwrap.fill(caption, width_chars), ha="left", va="top", fontsize=7, color="0.3")


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure atomically as PNG (``path``) and PDF (same stem) and close it;
    returns the PNG's path. Under ``captioned`` the PNG gets the caption line under the figure and
    ``<stem>.caption.txt`` holds it; the PDF stays bare, for a paper's own caption."""
    path = Path(path)
    # Labels are names from results.json (variants, modules, runs): a "$" in one must stay text,
    # never matplotlib mathtext ("$\\frac{1}{$" would not parse). Ticks drawn later are made
    # inside the context, the texts that already exist are switched off one by one.
    for t in fig.findobj(matplotlib.text.Text):
        t.set_parse_math(False)
    for ax in fig.axes:
        _plain_ticks(ax)
    caption = _CAPTION.get()
    try:
        with plt.rc_context({"text.parse_math": False, "pdf.fonttype": 42}):
            _legends_off_data(fig)
            with IO.atomic_path(path.with_suffix(".pdf")) as tmp:
                fig.savefig(tmp, bbox_inches="tight", format="pdf")
            if caption:
                _add_caption(fig, caption)
                IO.write_text(path.with_suffix(".caption.txt"), caption + "\n")
            with IO.atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path


def log_x_axis(ax, values) -> None:
    """Log-scaled x axis labelled exactly at ``values`` (no crowded minor-tick labels)."""
    ax.set_xscale("log")
    values = sorted({float(v) for v in values})
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.xaxis.set_minor_locator(NullLocator())


def new_figure(*args, **kwargs):
    """plt.subplots on the headless Agg backend (set at import: plots never need a display)."""
    return plt.subplots(*args, **kwargs)
