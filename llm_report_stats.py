"""The report's cells and sentences for intervals and paired tests, read from ``results.json``.

``llm_stats`` computes them during the run; this module only shows them, for ``llm_report``
(the Markdown report and the end-of-run table). Every field goes through ``llm_results``, since
the file may come from an older version (no intervals: the cells fall back to the bare number)
or another hand.
"""
from __future__ import annotations

import math
import re
import statistics
from typing import Optional

import llm_results as R

MARK = "†"  # a difference: the paired test's p, adjusted over every test of the run, is below 0.05


def interval(ci) -> str:
    """"[lo, hi]" of a results.json interval, or "" where there is none (one window, nan)."""
    if not isinstance(ci, list) or len(ci) != 2:
        return ""
    lo, hi = R.num(ci[0]), R.num(ci[1])
    if lo is None or hi is None or lo != lo or hi != hi:
        return ""
    return f"[{R.fmt(lo)}, {R.fmt(hi)}]"


def _vs_parent(results: dict, name: str) -> Optional[dict]:
    return R.field(results, "evaluation", name, "vs_parent", kind=dict)


def perplexity_cell(results: dict, name: str) -> str:
    """"12.3 [11.9, 12.8]": a variant's perplexity with its 95% interval over windows."""
    ev = R.field(results, "evaluation", name, kind=dict, default={})
    ci = interval(ev.get("perplexity_ci95"))
    return R.fmt(R.num(ev.get("perplexity"))) + (f" {ci}" if ci else "")


def ratio_cell(results: dict, name: str, fallback=None, with_interval: bool = True) -> str:
    """"1.032 [1.01, 1.05] †": the variant's perplexity over its parent's, with the paired interval
    over the same windows and the mark where that interval excludes 1; ``fallback`` (the plain
    ratio) where the run has no paired result."""
    vs = _vs_parent(results, name)
    if not vs or R.num(vs.get("ppl_ratio")) is None:
        return R.fmt(fallback)
    ci = interval(vs.get("ppl_ratio_ci95")) if with_interval else ""
    return R.fmt(R.num(vs["ppl_ratio"])) + (f" {ci}" if ci else "") + (f" {MARK}" if vs.get("significant") is True
                                                                        else "")


def perplexity_note(results: dict) -> str:
    """What the intervals and the mark in the perplexity table mean, and how they were made."""
    methods = {R.field(ev, "interval_method", kind=str) for ev in
               R.field(results, "evaluation", kind=dict, default={}).values() if isinstance(ev, dict)} - {None, ""}
    if not methods:
        return ""
    paired = {R.field(vs, "method", kind=str) for n in R.field(results, "evaluation", kind=dict, default={})
              if (vs := _vs_parent(results, n))} - {None}
    design = R.field(results, "protocol", "sampling", "words", kind=str)
    return ("Perplexity [95% interval]: " + "; ".join(sorted(methods)) + "."
            + (f" Windows: {design}." if design else "")
            + (" x parent [95% interval]: the same windows for the variant and its parent, "
               + "; ".join(sorted(paired)) + f". {MARK} marks a difference: " + marks_words(results)
               + "; without it the change is inside the noise of these windows." if paired else ""))


def marks_words(results: dict) -> str:
    """What a † means in this run: the adjusted test, or (an older file) the unadjusted one."""
    mt = R.field(results, "robustness", "multiple_testing", kind=dict)
    method = R.field(mt, "method", kind=str) if mt else None
    if not method:
        return "the paired test's p < 0.05 (not adjusted for the other tests: an older results.json)"
    if method == "none":
        return f"p < 0.05, not adjusted for the run's {R.text(mt.get('n_tests'))} tests (--multiple-testing none)"
    name = {"holm": "Holm", "bh": "Benjamini-Hochberg"}.get(method, method)
    return f"p < 0.05 after {name}'s adjustment over all {R.text(mt.get('n_tests'))} paired tests of this run"


def summary_cells(results: dict, name: str) -> tuple[str, str]:
    """(95% interval, x parent with its mark) for the end-of-run table."""
    ev = R.field(results, "evaluation", name, kind=dict, default={})
    return interval(ev.get("perplexity_ci95")) or "-", ratio_cell(results, name, with_interval=False)


def summary_note(results: dict) -> str:
    """The end-of-run table's line on its interval and mark; "" for a run without them."""
    ev = R.field(results, "evaluation", kind=dict, default={})
    if not any(isinstance(e, dict) and e.get("perplexity_ci95") for e in ev.values()):
        return ""
    method = next((e.get("interval_method") for e in ev.values() if isinstance(e, dict)), None) or "?"
    robust = any(R.field(results, s, "variants", kind=dict) for s in ("noise", "adversarial", "analysis"))
    return (f"95% interval: {method}; {MARK} = differs from its parent, paired over the same windows"
            + (" (samples, noise seeds or probes in the robustness columns)" if robust else "")
            + f": {marks_words(results)}")


def _paired(results: dict, name: str, task: str) -> Optional[dict]:
    return R.field(results, "zeroshot", "paired", name, task, kind=dict)


def task_mark(results: dict, name: str, task: str) -> str:
    """" †" after a task's accuracy where McNemar's test against the parent says it differs."""
    t = _paired(results, name, task)
    return f" {MARK}" if t and t.get("significant") is True else ""


def pooled_cell(results: dict, name: str, fallback: str = "-") -> str:
    """"+3.1 [+0.5, +5.7], p 0.02 †": the change of accuracy against the parent on the pooled
    questions of every task, with its paired interval and McNemar's p; ``fallback`` without one."""
    t = _paired(results, name, "mean")
    if not t or R.num(t.get("diff")) is None:
        return fallback
    ci = t.get("diff_ci95")
    lo, hi = (R.num(ci[0]), R.num(ci[1])) if isinstance(ci, list) and len(ci) == 2 else (None, None)
    span = f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" if lo is not None and hi is not None and lo == lo else ""
    p = R.num(t.get("p_value"))
    if t.get("reachable") is False:  # too few questions for any p below 0.05: no p-value to show
        return f"{100 * R.num(t['diff']):+.1f}{span}, {R.text(t.get('n'))} questions: never significant"
    return (f"{100 * R.num(t['diff']):+.1f}{span}" + (f", p {p:.2g}" if p is not None else "")
            + (f" {MARK}" if t.get("significant") is True else ""))


def zeroshot_note(results: dict) -> str:
    """What the zero-shot marks mean; "" for a run without paired tests."""
    if not R.field(results, "zeroshot", "paired", kind=dict):
        return ""
    return (f"Against the parent, on the same questions: {MARK} after a task's accuracy marks a difference by "
            "McNemar's exact test (two-sided, on the questions one model gets right and the other not; "
            f"{marks_words(results)}). Paired (pooled): the same test on the pooled questions of every task, its change of "
            "accuracy in points with a paired-bootstrap 95% interval and McNemar's p; pooling weighs tasks by "
            "their questions, where the mean accuracy and its change vs parent weigh them equally.")


def calibration_draws(results: dict) -> list[str]:
    """With --calib-seeds: each pruned variant's perplexity as mean +- std over its calibration draws
    (the spread the draw alone causes), next to each draw's own interval over the evaluation windows."""
    groups: dict[str, list] = {}
    for name, _ in R.variant_records(results, "prune", "pruned"):
        point = re.sub(r",seed=\d+", "", name)
        if point != name:
            groups.setdefault(point, []).append(name)
    groups = {p: ns for p, ns in groups.items() if len(ns) > 1}
    if not groups:
        return []
    lines = ["", "Calibration draws (--calib-seeds): each point pruned once per draw of its calibration windows; "
                 "the std over draws is the spread the draw alone causes, the intervals the spread of the "
                 "evaluation windows within one draw.", "",
             "| point | draws | perplexity mean ± std over draws | each draw [95% interval] |", "|---|---|---|---|"]
    for point, names in groups.items():
        ppl = [R.num(R.field(results, "perplexity", n)) for n in names]
        # statistics cannot take inf: a draw that diverged leaves the spread out (each draw still shows).
        finite = len(ppl) > 1 and all(p is not None and math.isfinite(p) for p in ppl)
        spread = f"{R.fmt(statistics.fmean(ppl))} ± {R.fmt(statistics.stdev(ppl))}" if finite else "-"
        each = "; ".join(f"{R.esc(n.rsplit(',', 1)[-1].rstrip(']'))}: {perplexity_cell(results, n)}" for n in names)
        lines.append(f"| {R.esc(point)} | {len(names)} | {spread} | {each} |")
    return lines
