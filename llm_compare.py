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
import llm_matrix as MX
import llm_results as R
import llm_stats as ST
import llm_tables as T
from llm_common import UserError, error_line
from llm_plots import captioned, plot_comparison
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
    "seed": lambda r: R.field(r, "seed"),
    "calibration": lambda r: _calibration(r),
    "grid": lambda r: _grid(r),
    "tasks": lambda r: ",".join(map(str, R.field(r, "zeroshot", "protocol", "specs", kind=list, default=[])))
    or _not_run(r, "zeroshot"),
    "task limit": lambda r: _zeroshot(r, "limit"),
    "chat template": lambda r: _zeroshot(r, "apply_chat_template"),
    "few-shot as turns": lambda r: _zeroshot(r, "fewshot_as_multiturn"),
}


def _not_run(r: dict, step: str) -> str:
    return "not run" if not R.field(r, step, kind=dict) or R.field(r, step, "status") == "off" else "-"


def _zeroshot(r: dict, key: str):
    v = R.field(r, "zeroshot", "protocol", key)
    return _not_run(r, "zeroshot") if v is None else v


def _short_hash(obj) -> str | None:
    """8 hex of the model identity (label, source, commit, file sizes and times): equal for the same weights."""
    return None if obj is None else hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _calibration(r: dict) -> str:
    """The calibration of the steps that calibrate (prune, quantize): windows x tokens of which text,
    and the draws' seeds, whether one variant or a grid made it; "none" when neither ran."""
    train = R.field(r, "dataset", "train", "source")
    out = []
    for step, default in (("prune", "pruned"), ("quantize", "quantized")):
        records = [rec for _, rec in R.variant_records(r, step, default) if R.field(rec, "calibration", kind=dict)]
        if not records:
            continue
        cal = records[0]["calibration"]
        seeds = sorted({str(s) for s in (R.field(rec, "calibration_seed", default=R.field(
            rec, "calibration", "seed", default=R.field(r, "seed"))) for rec in records) if s is not None})
        out.append(f"{step}: {R.fmt(R.field(cal, 'windows'))} x {R.fmt(R.field(cal, 'seq_len'))} of "
                   f"{R.fmt(R.field(cal, 'source', default=train))}" + (f", seed {','.join(seeds)}" if seeds else ""))
    return "; ".join(out) or "none (no prune or quantize step)"


def _grid(r: dict) -> str:
    """The settings each variant step varied over, from its records, e.g. "prune: method
    wanda,sparsegpt; pattern unstructured,2:4 | quantize: wbits 4,3; parent base,pruned[...]";
    "none" for runs of single variants."""
    keys = {"prune": ("method", "pattern", "target_sparsity", "calibration_seed"),
            "quantize": ("method", "wbits", "group", "bit_allocation", "budget_bits", "calibration_seed", "parent"),
            "noise": ("epsilon",)}
    parts = []
    for step, default in (("prune", "pruned"), ("quantize", "quantized"), ("noise", "noisy")):
        records = [rec for _, rec in R.variant_records(r, step, default)]
        axes = []
        for k in keys[step]:
            values = list(dict.fromkeys(R.fmt(R.field(rec, k, default=R.field(rec, "recipe", k))) for rec in records))
            if len(values) > 1:
                axes.append(f"{k} {','.join(values)}")
        if axes:
            parts.append(f"{step}: " + "; ".join(axes))
    return " | ".join(parts) or "none"


def _finished_run(d: Path) -> dict:
    """A finished run's results.json, read without touching its directory: a regular file of
    bounded size only (a FIFO or a link to /dev/zero is refused, never waited on or read)."""
    try:
        res = R.read_results(Path(d), foreign=True)
    except (OSError, ValueError):
        res = None
    measured = ("perplexity", "zeroshot", "safety", "robustness", "adversarial", "analysis", "noise", "prune", "quantize")
    if not isinstance(res, dict) or not any(R.field(res, k, kind=dict) for k in measured):
        raise UserError(f"--compare: {d} holds no finished run (a regular results.json with measured results)")
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
    for col in (c for c in PROTOCOL if c != "grid"):  # a grid is what a run made, not how it measured
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
            "quantization": "; ".join(f"{R.text(rec.get('method'))} {R.quant_bits_words(rec)} "
                                      f"g{R.text(rec.get('group'))} ({R.fmt(R.num(rec.get('avg_bits')))} bits)"
                                      for _, rec in R.variant_records(res, "quantize", "quantized"))
            if R.field(qz, "status") == "ran" else "-",
            "perplexity": {str(k): R.num(v) for k, v in R.field(res, "perplexity", kind=dict, default={}).items()},
            "bits": R.variant_bits(res),
            "written": {n: R.num(q.get("stored_bits_per_weight")) for n, q in R.variant_records(res, "quantize",
                                                                                             "quantized")},
            "parents": {str(k): v for k, v in R.field(res, "variants", kind=dict, default={}).items()
                        if isinstance(v, str)},
            "zeroshot": {str(v): R.num(R.field(m, "acc")) for v, m in means.items()},
            "robustness": R.field(res, "robustness", kind=dict) or MX.robustness_matrix(res), "res": res}


def _paired_lines(rows: list) -> list[str]:
    """Each variant's perplexity in every other run against the first run's, paired window by window
    where both scored the very same token ids in the same windows (equal ``protocol.ids_sha256``,
    window and stride, per-window token counts); otherwise the pair is named unpaired."""
    if len(rows) < 2:
        return []
    ref, out = rows[0], []
    for r in rows[1:]:
        same = all(R.field(ref["res"], "protocol", k) == R.field(r["res"], "protocol", k) is not None
                   for k in ("ids_sha256", "seq_len", "stride"))
        for v in r["perplexity"]:
            a, b = (R.field(x["res"], "evaluation", v, kind=dict) for x in (ref, r))
            if not a or not b:
                continue
            sums = [R.field(x, k, kind=list) for x in (a, b) for k in ("window_nll", "window_tokens")]
            if not same or not all(sums) or sums[1] != sums[3]:
                out.append(f"| {R.esc(r['label'])} | {R.esc(v)} | unpaired: the runs did not score the same "
                           "windows of the same token ids | - |")
                continue
            try:
                d = ST.paired_perplexity(sums[0], sums[1], sums[2], sums[3],
                                         dependent=bool(R.field(r["res"], "protocol", "sampling", "dependent")),
                                         strata=R.field(r["res"], "protocol", "sampling", "strata", kind=list))
            except (ValueError, TypeError):
                continue
            lo, hi = d["ppl_ratio_ci95"]
            out.append(f"| {R.esc(r['label'])} | {R.esc(v)} | x{R.fmt(d['ppl_ratio'])} [{R.fmt(lo)}, {R.fmt(hi)}]"
                       f"{' †' if d['significant'] else ''} | {R.esc(d['method'])} |")
    lines = ["", f"Each variant's perplexity against the same variant in {R.esc(ref['label'])} (paired over the "
             "same windows where both runs scored them; † the interval excludes 1).", "",
             "| run | variant | perplexity ratio [95%] | how |", "|---|---|---|---|"] + out if out else []
    return lines + _paired_questions(rows)


def _paired_questions(rows: list) -> list[str]:
    """Each variant's zero-shot accuracy per task against the same variant in the first run: McNemar's
    exact test where both runs scored the same questions (task, metric, question ids), else unpaired."""
    ref, out = rows[0], []
    mine = R.field(ref["res"], "zeroshot", "questions", kind=dict, default={})
    for r in rows[1:]:
        theirs = R.field(r["res"], "zeroshot", "questions", kind=dict, default={})
        for v in (v for v in theirs if v in mine):
            for task in (t for t in R.field(theirs, v, kind=dict, default={}) if t in mine[v]):
                a, b = mine[v][task], theirs[v][task]
                key = [(R.field(q, "metric"), len(R.field(q, "correct", kind=str, default="")), R.field(q, "doc_ids"))
                       for q in (a, b)]
                if key[0] != key[1] or not key[0][1] or set(a["correct"] + b["correct"]) - {"0", "1"}:
                    out.append(f"| {R.esc(r['label'])} | {R.esc(v)} | {R.esc(task)} | unpaired: not the same "
                               "questions | - |")
                    continue
                t = ST.mcnemar_exact([c == "1" for c in a["correct"]], [c == "1" for c in b["correct"]])
                lo, hi = t["diff_ci95"]
                out.append(f"| {R.esc(r['label'])} | {R.esc(v)} | {R.esc(task)} | {100 * t['diff']:+.1f} "
                           f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {t['p_value']:.2g}{' †' if t['significant'] else ''} |")
    if not out:
        return []
    return ["", f"Zero-shot accuracy (points) of each variant against the same variant in {R.esc(ref['label'])}, "
            "on the same questions (exact McNemar; † p < 0.05).", "",
            "| run | variant | task | accuracy difference [95%] | McNemar p |", "|---|---|---|---|---|"] + out


def _measure_label(rows: list, key: str) -> str:
    """A measure's column heading: ours, else the label the run's own file gives it (a measure of a
    newer version, or one this version does not know), else its key; never a KeyError."""
    if key in MX.MEASURES:
        return MX.MEASURES[key][0]
    labels = [R.field(r["robustness"], "measures", key, "label", kind=str) for r in rows]
    return next((str(x) for x in labels if x), str(key))


def _matrix_lines(rows: list) -> list[str]:
    """The robustness matrices of the runs, one table: a row per (run, variant), a column per measure
    any run has; † marks a difference from the parent, inside its run, that its paired test supports."""
    keys = list(dict.fromkeys(k for r in rows for k in R.field(r["robustness"], "measures", kind=dict, default={})))
    if not keys:
        return []
    out = _paired_lines(rows) + ["", "Robustness matrix of each run (value [95% interval]; † the paired difference from the parent "
           "in the same run excludes zero; across runs the cells are not paired).", "",
           "| run | variant | parent | " + " | ".join(R.esc(_measure_label(rows, k)) for k in keys) + " |",
           "|---" * (3 + len(keys)) + "|"]
    for r in rows:
        for name, row in R.field(r["robustness"], "rows", kind=dict, default={}).items():
            cells = R.field(row, "cells", kind=dict, default={})
            out.append(f"| {R.esc(r['label'])} | {R.esc(name)} | {R.esc(R.field(row, 'parent') or '-')} | "
                       + " | ".join(MX.cell_text(cells.get(k)) for k in keys) + " |")
    return out


def _contrast_lines(rows: list) -> list[str]:
    """Each run's contrasts between its own variants (``--contrast`` and grid siblings), adjusted
    within that run; where a later run scored the first's windows, its variants are paired with
    the first's above (the per-variant table), never across a run's adjustment."""
    out = []
    for r in rows:
        lines = MX.contrast_lines(R.field(r["res"], "robustness", kind=dict, default={}))
        out += [f"| {R.esc(r['label'])} " + ln for ln in lines if ln.startswith("| ") and not ln.startswith("| B |")]
    if not out:
        return []
    return ["", "Contrasts inside each run: variant B against variant A, paired over the same units, adjusted "
            "with that run's other tests († adjusted p < 0.05).", "",
            "| run | B | A | measure | B vs A [95%] | adjusted p | why |", "|---|---|---|---|---|---|---|"] + out


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
    if any(b < 16 for r in rows for b in r["bits"].values()):
        lines += ["", "Bits per weight of the decoder linears as the papers count them (codes, scales, zeros, "
                  "masks; 16 for a dense weight); in brackets, as the run's codes checkpoint wrote them.", "",
                  "| run | " + " | ".join(map(R.esc, variants)) + " |", "|---" * (1 + len(variants)) + "|"]
        lines += [f"| {R.esc(r['label'])} | " + " | ".join(
            R.fmt(r["bits"].get(v)) + (f" ({R.fmt(r['written'][v])})" if r["written"].get(v) is not None else "")
            for v in variants) + " |" for r in rows]
    lines += _matrix_lines(rows) + _contrast_lines(rows)
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
    with IO.output_lock(out), IO.writing_into(out):  # a run writing into ``out`` meanwhile: refused
        return _write_comparison(rows, out)


def _write_comparison(rows: list, out: Path) -> dict:
    variants = list(dict.fromkeys(v for r in rows for v in (*r["perplexity"], *r["bits"])))  # bits: every variant
    warnings = protocol_warnings(rows)
    for w in warnings:
        log.warning("%s", w.removeprefix("warning: "))
    caption = T.compare_caption(rows)
    try:
        with captioned(caption):
            plot = plot_comparison(rows, variants, out / "plots" / "compare.png")
    except UserError:  # a full disk, an unwritable folder: the one error line
        raise
    except Exception as e:  # values no axis can show: the table still holds every number
        plot = None
        log.warning("compare: plots/compare.png not drawn: %s (the table holds the numbers)", error_line(e))
    md = compare_markdown(rows, variants, warnings)
    if plot is None:
        md = md.replace("\n![comparison](plots/compare.png)", "")
    # Captions and tables/*.csv, .tex as in a run's report
    md = T.with_tables(T.with_captions(md, lambda _: caption), out)
    IO.write_text(out / "compare.md", md)
    IO.write_text(out / "compare.html", markdown_to_html(md, out))
    rows = [{k: v for k, v in r.items() if k != "res"} for r in rows]  # the whole results.json stays out
    plots = {"compare": str(plot.relative_to(out))} if plot else {}
    return {"compare": rows, "warnings": warnings, "markdown": md, "plots": plots}
