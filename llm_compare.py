"""``--compare``: finished runs side by side, with how each was measured, from their results.json alone.

    python llm_main_v4.py --compare exp1/data exp2/data --output-dir cmp

A perplexity means little without its protocol, so the table carries one column group per run:
the model and its identity, the evaluation text with its window length and tokens scored, the
calibration source and windows, the zero-shot tasks and their limit, and the dtype. Where runs
differ in any of these, a warning line says so above the table (and on stdout): their numbers
were not measured the same way. Another run's file is read through ``llm_results`` (typed,
never trusted); no text of it becomes a link, an image or HTML.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import llm_io as IO
import llm_results as R
from llm_common import UserError
from llm_plots import plot_comparison
from llm_report import markdown_to_html

log = logging.getLogger("llm.report")

# The protocol columns: (heading, how a run's results.json gives it).
PROTOCOL = {
    "model": lambda r: R.field(r, "model"),
    "identity": lambda r: _short_hash(R.field(r, "model_identity", kind=dict)),
    "dtype": lambda r: R.field(r, "dtype"),
    "eval text": lambda r: R.field(r, "dataset", "eval", "source"),
    "window": lambda r: R.field(r, "protocol", "seq_len"),
    "tokens scored": lambda r: R.tokens_scored(r),
    "calibration": lambda r: _calibration(r),
    "tasks": lambda r: ",".join(map(str, R.field(r, "zeroshot", "protocol", "specs", kind=list, default=[]))) or None,
    "task limit": lambda r: R.field(r, "zeroshot", "protocol", "limit"),
}


def _short_hash(obj) -> str | None:
    """8 hex of the model identity (label, source, commit, file sizes and times): equal for the same weights."""
    return None if obj is None else hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _calibration(r: dict) -> str | None:
    """The pruning calibration, whether one variant or a grid made it (every point shares it)."""
    records = R.variant_records(r, "prune", "pruned")
    cal = R.field(records[0][1], "calibration", kind=dict) if records else None
    if not cal:
        return None
    return f"{R.fmt(R.field(cal, 'windows'))} x {R.fmt(R.field(cal, 'seq_len'))} of {R.fmt(R.field(cal, 'source'))}"


def _finished_run(d: Path) -> dict:
    """A finished run's results.json, read without touching its directory: a regular file of
    bounded size only (a FIFO or a link to /dev/zero is refused, never waited on or read)."""
    try:
        res = R.read_results(Path(d), foreign=True)
    except (OSError, ValueError):
        res = None
    if not isinstance(res, dict) or not R.field(res, "perplexity", kind=dict):
        raise UserError(f"--compare: {d} holds no finished evaluation (a regular results.json with perplexities)")
    return res


def short_names(paths: Sequence) -> list[str]:
    """The shortest path suffixes that tell the runs apart (exp1/data, exp2/data), for labels."""
    parts = [Path(str(p)).parts or (str(p),) for p in paths]
    for k in range(1, max(map(len, parts), default=1) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{n} #{i + 1}" for i, n in enumerate(map(str, paths))]  # the same folder named twice


def check_output_dir(dirs: Sequence, out: Path, given: bool) -> None:
    """Refuse to write the comparison into one of the compared runs' folders, unless
    ``--output-dir`` named that folder on purpose (``given``)."""
    inside = [d for d in dirs if Path(d).resolve() == Path(out).resolve()]
    if inside and not given:
        raise UserError(f"--compare would write into the compared run {inside[0]} (the default --output-dir); "
                        "name an --output-dir for the comparison")


def protocol_warnings(rows: list) -> list[str]:
    """One line per protocol column in which the runs differ."""
    out = []
    for col in PROTOCOL:
        values = {R.fmt(r["protocol"][col]) for r in rows}
        if len(values) > 1:
            out.append(f"warning: the runs differ in {col} ({', '.join(sorted(values))}): their numbers were not "
                       "measured the same way")
    return out


def _row(d, label: str) -> dict:
    res = _finished_run(Path(d))
    pr, nz = R.field(res, "prune", kind=dict), R.field(res, "noise", "variant", kind=dict)
    qz = R.field(res, "quantize", kind=dict, default={})
    means = R.field(res, "zeroshot", "mean", kind=dict, default={})
    return {"run": str(d), "label": label, "model": R.field(res, "model", default="?"),
            "protocol": {col: get(res) for col, get in PROTOCOL.items()},
            "pruning": "; ".join(" ".join(R.text(R.field(rec, k)) for k in ("method", "pattern", "overall_sparsity"))
                                 for _, rec in R.variant_records(res, "prune", "pruned")) if pr else "-",
            "noise": f"{R.text(R.field(nz, 'mode'))} eps={R.text(R.field(nz, 'epsilon'))}" if nz else
            "eps=" + ",".join(R.text(R.field(rec, "epsilon")) for rec in R.field(res, "noise", "grid", kind=list))
            if R.field(res, "noise", "grid", kind=list) else "-",
            "quantization": " ".join(R.text(R.field(qz, k)) for k in ("method", "bit_allocation", "avg_bits"))
            if R.field(qz, "status") == "ran" else "-",
            "perplexity": {str(k): R.num(v) for k, v in res["perplexity"].items()},
            "parents": {str(k): v for k, v in R.field(res, "variants", kind=dict, default={}).items()
                        if isinstance(v, str)},
            "zeroshot": {str(v): R.num(R.field(m, "acc")) for v, m in means.items()}}


def compare_markdown(rows: list, variants: list, warnings: list) -> str:
    lines = ["# Comparison of runs", ""] + [f"**{R.esc(w)}**  " for w in warnings] + ([""] if warnings else [])
    lines += ["How each run was measured:", "", "| run | " + " | ".join(PROTOCOL) + " |", "|---" * (1 + len(PROTOCOL))
              + "|"]
    lines += [f"| {R.esc(r['label'])} | " + " | ".join(R.text(r["protocol"][c]) for c in PROTOCOL) + " |" for r in rows]
    lines += ["", "Perplexity of each variant; in brackets, its ratio to its parent variant in the same run.", "",
              "| run | pruning | noise | quantization | " + " | ".join(map(R.esc, variants)) + " |",
              "|---" * (4 + len(variants)) + "|"]
    for r in rows:
        cells = []
        for v in variants:
            p, q = r["perplexity"].get(v), r["perplexity"].get(r["parents"].get(v))
            cells.append(R.fmt(p) + (f" (x{R.fmt(R.ratio(p, q))})" if p is not None and q else ""))
        lines.append(f"| {R.esc(r['label'])} | {r['pruning']} | {r['noise']} | {r['quantization']} | "
                     + " | ".join(cells) + " |")
    if any(r["zeroshot"] for r in rows):
        lines += ["", "Zero-shot mean accuracy (%) of each variant, over the tasks each run evaluated; in brackets, "
                  "the change against its parent.", "", "| run | " + " | ".join(map(R.esc, variants)) + " |",
                  "|---" * (1 + len(variants)) + "|"]
        for r in rows:
            cells = []
            for v in variants:
                a, b = r["zeroshot"].get(v), r["zeroshot"].get(r["parents"].get(v))
                cells.append("-" if a is None
                             else f"{100 * a:.1f}" + (f" ({100 * (a - b):+.1f})" if b is not None else ""))
            lines.append(f"| {R.esc(r['label'])} | " + " | ".join(cells) + " |")
    lines += ["", "Runs: " + "; ".join(f"{R.esc(r['label'])} = {R.esc(r['run'])}" for r in rows), "",
              "![comparison](plots/compare.png)"]
    return "\n".join(lines) + "\n"


def compare_runs(dirs: Sequence, out: Path, output_dir_given: bool = True) -> dict:
    """One table and one plot across finished runs: their protocols, and every variant's
    perplexity with its ratio to the variant's parent. Writes ``<out>/compare.md``,
    ``compare.html`` and ``plots/compare.png``; returns {"compare": rows, "warnings": lines,
    "markdown": the table, "plots": {...}}. UserError when a folder holds no finished run, or
    when ``out`` is a compared run's folder that ``--output-dir`` did not name."""
    out = Path(out)
    check_output_dir(dirs, out, output_dir_given)
    rows = [_row(d, label) for d, label in zip(dirs, short_names(dirs))]
    variants = list(dict.fromkeys(v for r in rows for v in r["perplexity"]))
    warnings = protocol_warnings(rows)
    for w in warnings:
        log.warning("%s", w.removeprefix("warning: "))
    md = compare_markdown(rows, variants, warnings)
    plot = plot_comparison(rows, variants, out / "plots" / "compare.png")
    IO.write_text(out / "compare.md", md)
    IO.write_text(out / "compare.html", markdown_to_html(md, out))
    return {"compare": rows, "warnings": warnings, "markdown": md, "plots": {"compare": str(plot.relative_to(out))}}
