"""The robustness matrix: every variant x every measure, each cell with its interval, its parent's
value and the paired difference from the parent.

Built from the sections of results.json alone (``robustness_matrix(results)``): the eval step's
perplexities, the zero-shot step's accuracies, and the per-variant parts that the noise step
(``noise.variants``: tolerance to weight noise), the adversarial step (``adversarial.variants``:
FGSM/PGD, targeted PGD, GCG transferred) and the analysis step (``analysis.variants``:
curvature, super weights) write. The pipeline stores it as ``results["robustness"]``; the
report, the end-of-run table and ``--compare`` read it from there.

A difference from the parent is marked ``significant`` only where its paired interval (over
the same windows, samples, questions, noise seeds or Hutchinson probes) excludes zero; the
method is named in each cell.
"""
from __future__ import annotations

import math
import re
import statistics
from typing import Mapping, Optional

import llm_results as R

# key: (label, unit, which direction is worse, how a cell compares with its parent)
MEASURES: dict[str, tuple] = {
    "perplexity": ("perplexity", "", "higher", "ratio"),
    "zeroshot_mean": ("zero-shot mean acc", "", "lower", "difference"),
    "pgd_delta_nll": ("PGD ΔNLL at max ε", "nats/token", "higher", "difference"),
    "fgsm_delta_nll": ("FGSM ΔNLL at max ε", "nats/token", "higher", "difference"),
    "targeted_success": ("targeted PGD success", "", "higher", "difference"),
    "gcg_transfer_nll": ("GCG target NLL, live suffix", "nats/token", "lower", "difference"),
    "noise_doubling_eps": ("ε that doubles perplexity", "", "lower", "ratio"),
    "hessian_trace": ("Hessian trace", "", "higher", "ratio"),
    "top_eigenvalue": ("top eigenvalue", "", "higher", "ratio"),
    "super_weights_kept": ("super weights kept", "", "lower", "difference"),
}
# The columns of the end-of-run table.
HEADLINE = ("pgd_delta_nll", "noise_doubling_eps", "hessian_trace")


def _cell(value, ci=None, vs: Optional[dict] = None, key: str = "mean", ci_key: str = "ci95", **extra) -> dict:
    out = {"value": R.num(value), "ci95": ci if isinstance(ci, list) else None, **extra}
    if isinstance(vs, dict) and vs:
        out["vs_parent"] = {"difference": R.num(vs.get(key)), "ci95": vs.get(ci_key),
                            "significant": bool(vs.get("significant")), "method": vs.get("method")}
    return out


def _attack_row(table: list, method: str) -> Optional[dict]:
    rows = [r for r in table if isinstance(r, dict) and r.get("method") == method and R.num(r.get("eps")) is not None]
    return max(rows, key=lambda r: R.fnum(r.get("eps"))) if rows else None


def _cells(results: Mapping, name: str) -> dict:
    """Every measure of variant ``name`` that results.json holds."""
    cells = {}
    ppl = R.field(results, "perplexity", name)
    if ppl is not None:
        ev = R.field(results, "evaluation", name, kind=dict, default={})
        vs = R.field(ev, "vs_parent", kind=dict)
        cells["perplexity"] = _cell(ppl, R.field(ev, "perplexity_ci95", kind=list), vs and {
            "ratio": vs.get("ppl_ratio"), "ratio_ci95": vs.get("ppl_ratio_ci95"),
            "significant": vs.get("significant"), "method": vs.get("method")}, key="ratio", ci_key="ratio_ci95")
    zs = R.field(results, "zeroshot", "mean", name, kind=dict)
    if zs:
        vs = R.field(results, "zeroshot", "paired", name, "mean", kind=dict)
        cells["zeroshot_mean"] = _cell(zs.get("acc"), None, vs, key="diff", ci_key="diff_ci95")
    adv = R.field(results, "adversarial", "variants", name, kind=dict)
    if adv:
        vs = R.field(adv, "vs_parent", kind=dict, default={})
        for method in ("pgd", "fgsm"):
            row = _attack_row(R.field(adv, "table", kind=list, default=[]), method)
            if row:
                cells[f"{method}_delta_nll"] = _cell(row.get("delta_nll"), row.get("delta_nll_ci95"),
                                                     vs.get(f"{method}@{R.fnum(row.get('eps')):g}"),
                                                     eps=row.get("eps"))
        tg = R.field(adv, "targeted", kind=dict)
        if tg:
            cells["targeted_success"] = _cell(tg.get("success_rate"), tg.get("success_ci95"),
                                              vs.get("targeted_success"), key="diff", ci_key="diff_ci95", n=tg.get("n"))
        gt = R.field(adv, "gcg_transfer", kind=dict)
        if gt:
            cells["gcg_transfer_nll"] = _cell(gt.get("target_nll"), None, None, success=gt.get("success"),
                                              clean=gt.get("clean_target_nll"))
    nz = R.field(results, "noise", "variants", name, kind=dict)
    if nz:
        tol = R.field(nz, "tolerance", kind=dict, default={})
        cells["noise_doubling_eps"] = _cell(tol.get("doubling_eps"), tol.get("ci95"), R.field(nz, "vs_parent"),
                                            never_doubled=tol.get("never_doubled"), max_eps=tol.get("max_eps"))
    an = R.field(results, "analysis", "variants", name, kind=dict)
    if an:
        cv = R.field(an, "curvature", kind=dict, default={})
        cells["hessian_trace"] = _cell(cv.get("trace_total"), cv.get("trace_total_ci95"),
                                       R.field(an, "vs_parent", "trace_total"), probes=cv.get("probes"))
        cells["top_eigenvalue"] = _cell(cv.get("top_eigenvalue"))
        sws = R.field(an, "super_weights", kind=list, default=[])
        if sws:
            cells["super_weights_kept"] = _cell(an.get("super_weights_kept"), None, None, of=len(sws),
                                                intact=an.get("super_weights_intact"))
    return cells


def _relative(value, parent, how: str) -> Optional[float]:
    """The cell against its parent: value / parent ("ratio") or value - parent ("difference")."""
    v, p = R.num(value), R.num(parent)
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (v, p)):
        return None
    if how == "ratio":  # only between two positive values (a negative Hutchinson estimate has no ratio)
        return v / p if p > 0 and v > 0 else None
    return v - p


def robustness_matrix(results: Mapping) -> dict:
    """{"measures": {key: {label, unit, worse, compare}}, "rows": {variant: {"parent": p,
    "cells": {measure: {"value", "ci95", "vs_parent"?, "relative"?, ...}}}}} from a results
    dict. ``relative`` is the cell against the parent's (a ratio or a difference, as the
    measure says); ``vs_parent`` is the paired test where the step made one."""
    parents = dict(R.field(results, "variants", kind=dict, default={}))
    names = list(dict.fromkeys([*R.field(results, "perplexity", kind=dict, default={}),
                                *(n for s in ("noise", "adversarial", "analysis")
                                  for n in R.field(results, s, "variants", kind=dict, default={}))]))
    rows = {}
    for name in names:
        parent = parents.get(name)
        for s in ("noise", "adversarial", "analysis"):
            parent = parent or R.field(results, s, "variants", name, "parent")
        rows[name] = {"parent": parent, "cells": _cells(results, name)}
    for row in rows.values():
        par = rows.get(row["parent"] or "", {}).get("cells", {})
        for key, cell in row["cells"].items():
            if key in par:
                cell["relative"] = _relative(cell["value"], par[key]["value"], MEASURES[key][3])
    used = [k for k in MEASURES if any(k in r["cells"] for r in rows.values())]
    return {"measures": {k: dict(zip(("label", "unit", "worse", "compare"), MEASURES[k])) for k in used},
            "rows": rows, "draws": _draws(rows)}


_SEED = re.compile(r"(,|\[)seed=(\d+)\]$")  # pruned[wanda,0.5,unstructured,seed=K], quantized[seed=K]


def _draws(rows: dict) -> dict:
    """Variants built once per calibration draw (``--calib-seeds``: ``pruned[wanda,0.5,unstructured,seed=K]``,
    ``quantized[seed=K]``),
    each measure as mean and sample standard deviation over the draws, by the name without its seed."""
    groups: dict[str, list] = {}
    for name in rows:
        m = _SEED.search(name)
        if m:
            base = name[:m.start()] + ("]" if m.group(1) == "," else "")
            groups.setdefault(base, []).append((int(m.group(2)), name))
    out = {}
    for base, members in groups.items():
        if len(members) < 2:
            continue
        cells = {}
        for key in MEASURES:
            vals = [R.num(rows[n]["cells"].get(key, {}).get("value")) for _, n in members]
            vals = [v for v in vals if v is not None]
            if len(vals) == len(members):
                cells[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals), "n": len(vals)}
        out[base] = {"seeds": [s for s, _ in members], "cells": cells}
    return out


def cell_text(cell: Optional[dict]) -> str:
    """A cell as 'value [low, high]', '†' where its paired difference from the parent is significant."""
    if not isinstance(cell, dict):  # another run's file may hold anything: numbers only, escaped
        return "-"
    v = R.num(cell.get("value"))
    text = R.fmt(v)
    if v is None and R.num(cell.get("never_doubled")):
        text = f"> {R.text(R.num(cell.get('max_eps')))} ({R.text(R.num(cell['never_doubled']))} seeds never doubled)"
    if R.num(cell.get("of")) is not None:
        text = f"{text}/{R.fmt(int(R.num(cell['of'])))}"
    ci = cell.get("ci95")
    if isinstance(ci, list) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci):
        text += f" [{R.fmt(ci[0])}, {R.fmt(ci[1])}]"
    vs = cell.get("vs_parent")
    if isinstance(vs, dict) and vs.get("significant"):
        text += " †"
    return text


def matrix_markdown(matrix: Mapping) -> list[str]:
    """The matrix as a Markdown table (variants down, measures across), each cell 'value [95%
    interval]', '†' where the paired difference from the parent excludes zero."""
    measures, rows = R.field(matrix, "measures", kind=dict, default={}), R.field(matrix, "rows", kind=dict, default={})
    if not measures or not rows:
        return []
    keys = list(measures)
    head = ["variant", "parent"] + [R.esc(measures[k].get("label")) for k in keys]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        cells = R.field(row, "cells", kind=dict, default={})
        out.append("| " + " | ".join([R.esc(name), R.esc(row.get("parent") or "-")]
                                      + [cell_text(cells.get(k)) for k in keys]) + " |")
    return out


def headline(matrix: Mapping, name: str) -> list[str]:
    """The end-of-run table's robustness columns of variant ``name``: values, '†' where the paired
    difference from the parent is significant."""
    cells = R.field(matrix, "rows", name, "cells", kind=dict, default={})
    out = []
    for k in HEADLINE:
        c = cells.get(k)
        out.append("-" if not c or c.get("value") is None else
                   R.fmt(c["value"]) + (" †" if (c.get("vs_parent") or {}).get("significant") else ""))
    return out


def report_section(results: Mapping) -> list[str]:
    """The report's robustness-matrix section: what each cell is, the table, the heatmap."""
    matrix = R.field(results, "robustness", kind=dict) or robustness_matrix(results)
    if set(R.field(matrix, "measures", kind=dict, default={})) <= {"perplexity", "zeroshot_mean"}:
        return []  # no robustness step measured the variants: the perplexity and zero-shot tables say it all
    table = matrix_markdown(matrix) + _draws_lines(matrix)
    fig = R.field(results, "plots", "robustness", kind=str)
    lines = ["", "## Robustness matrix", "",
             "Every measure on every variant (`--robustness-variants`), each as value [95% interval]. "
             "Perplexity: its evaluation's windows (see Perplexity). Attacks: ΔNLL of the continuation at the "
             "largest ε, Student-t interval over the attacked samples (the same samples for every variant); "
             "targeted success with a Wilson interval; GCG: the target's NLL after the live model's suffix, "
             "sent to each variant. Noise: the ε of the sweep at which perplexity doubles, interpolated, "
             "Student-t interval over the noise seeds. Hessian: the Hutchinson trace over the analysed "
             "linears, Student-t interval over probes (the same probes for every variant). Super weights: "
             "those found on the live model that each variant keeps (not zeroed). **†**: the paired "
             "difference from the parent (same windows, samples, seeds or probes) excludes zero; a "
             "difference without † is inside the noise."] + [""] + table
    lines += ["", f"![robustness relative to the parent]({fig})"] if fig else []
    return lines + _answers_lines(results)


def _draws_lines(matrix: Mapping) -> list[str]:
    """Each measure over calibration draws (``--calib-seeds``): mean ± std, beside the per-draw rows above."""
    draws, measures = R.field(matrix, "draws", kind=dict, default={}), R.field(matrix, "measures", kind=dict,
                                                                               default={})
    if not draws:
        return []
    keys = list(measures)
    out = ["", "Over calibration draws (`--calib-seeds`): mean ± sample std of each measure; each draw's own "
           "interval is in its row above.", "",
           "| variant | draws | " + " | ".join(R.esc(measures[k].get("label")) for k in keys) + " |",
           "|---" * (2 + len(keys)) + "|"]
    for base, d in draws.items():
        cells = R.field(d, "cells", kind=dict, default={})
        text = [f"{R.fmt(R.num(c.get('mean')))} ± {R.fmt(R.num(c.get('std')))}" if isinstance(c, dict) else "-"
                for c in (cells.get(k) for k in keys)]
        seeds = ",".join(R.fmt(R.num(x)) for x in R.field(d, "seeds", kind=list, default=[]))
        out.append(f"| {R.esc(base)} | {R.esc(seeds)} | " + " | ".join(text) + " |")
    return out


def _answers_lines(results: Mapping) -> list[str]:
    """The seed's sample test case for every variant: its greedy answer to each sample prompt,
    clean and under the strongest PGD of the sweep, side by side."""
    rows = []
    for name, v in R.field(results, "adversarial", "variants", kind=dict, default={}).items():
        for prompt, a in R.field(v, "answers", kind=dict, default={}).items():
            if isinstance(a, dict):
                rows.append(f"| {R.esc(name)} | {R.esc(prompt)} | {R.text(a.get('clean'))} | "
                            f"{R.text(a.get('attacked'))} | {R.text(R.num(a.get('eps')))} |")
    if not rows:
        return []
    return ["", "### Sample answers of every variant, clean and under attack", "",
            "Greedy answers to the sample prompts; attacked: under the strongest PGD of the sweep (ε relative "
            "to the mean embedding-row norm).", "", "| variant | prompt | clean | attacked | ε |",
            "|---|---|---|---|---|"] + rows
