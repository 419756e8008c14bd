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

import itertools
import math
import re
import statistics
from typing import Mapping, Optional, Sequence

import llm_results as R
import llm_stats as S
import llm_variants as V
from llm_common import UserError
from llm_knobs import parse_variant_patterns

# key: (label, unit, which direction is worse, how a cell compares with its parent)
MEASURES: dict[str, tuple] = {
    "perplexity": ("perplexity", "", "higher", "ratio"),
    "zeroshot_mean": ("zero-shot mean acc", "", "lower", "difference"),
    # Against the parent (--kl): how far the variant's next-token distribution moved. No paired test: any
    # change of weights makes a KL above 0, so "no change" is not a null worth testing; the interval says how far.
    "zeroshot_flips": ("zero-shot answers flipped", "", "higher", "none"),
    "kl_parent": ("KL to the parent", "nats/token", "higher", "none"),
    "top1_parent": ("top-1 agreement with the parent", "", "lower", "none"),
    "kl_base": ("KL to the base", "nats/token", "higher", "none"),
    "top1_base": ("top-1 agreement with the base", "", "lower", "none"),
    # The safety step: rates over the same prompts, exact McNemar against the parent (llm_safety).
    "refusal_rate": ("refusal rate, harmful prompts", "", "lower", "difference"),
    "harmful_rate": ("judged harmful, harmful prompts", "", "higher", "difference"),
    "over_refusal_rate": ("over-refusal rate, benign prompts", "", "higher", "difference"),
    "jailbreak_asr": ("GCG jailbreak success", "", "higher", "difference"),
    "safety_flips": ("judged outcomes flipped", "", "higher", "none"),
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


# What a test record carries into a matrix cell, beside its difference and interval.
_TEST_FIELDS = ("p_value", "p_adjusted", "significant_unadjusted", "reachable", "mde", "n", "kind", "min_p")


def _cell(value, ci=None, vs: Optional[dict] = None, key: str = "mean", ci_key: str = "ci95", **extra) -> dict:
    out = {"value": R.num(value), "ci95": ci if isinstance(ci, list) else None, **extra}
    if isinstance(vs, dict) and vs:
        out["vs_parent"] = {"difference": R.num(vs.get(key)), "ci95": vs.get(ci_key),
                            "significant": bool(vs.get("significant")), "method": vs.get("method"),
                            **{k: vs[k] for k in _TEST_FIELDS if k in vs}}
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
            **vs, "ratio": vs.get("ppl_ratio"), "ratio_ci95": vs.get("ppl_ratio_ci95")}, key="ratio",
            ci_key="ratio_ci95")
    ev = R.field(results, "evaluation", name, kind=dict, default={})
    for to, rec in (("parent", ev), ("base", R.field(ev, "vs_base", kind=dict, default={}))):
        if R.num(rec.get("kl")) is not None:  # --kl: against the parent, and in vs_base against the base
            named = {"base": rec.get("base")} if to == "base" else {}
            cells[f"kl_{to}"] = _cell(rec.get("kl"), R.field(rec, "kl_ci95", kind=list), **named,
                                      percentiles=R.field(rec, "kl_percentiles", kind=dict),
                                      percentiles_ci95=R.field(rec, "kl_percentiles_ci95", kind=dict))
            cells[f"top1_{to}"] = _cell(rec.get("top1_agreement"), R.field(rec, "top1_ci95", kind=list), **named)
    zs = R.field(results, "zeroshot", "mean", name, kind=dict)
    if zs:
        vs = R.field(results, "zeroshot", "paired", name, "mean", kind=dict)
        cells["zeroshot_mean"] = _cell(zs.get("acc"), None, vs, key="diff", ci_key="diff_ci95")
        if isinstance(vs, dict) and R.num(vs.get("flip_rate")) is not None:  # the pooled questions, either way
            cells["zeroshot_flips"] = _cell(vs.get("flip_rate"), vs.get("flip_rate_ci95"), lost=vs.get("a_only"),
                                            gained=vs.get("b_only"), n=vs.get("n"))
    cells.update(_safety_cells(results, name))
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


# The safety step's measures: key -> (its rate in a variant's record, its test in vs_parent, the path of its
# per-prompt 0/1 string), compared by exact McNemar on the same prompts.
_SAFETY = {"refusal_rate": ("refusal", "refusal", ("refused",)), "harmful_rate": ("harmful_rate", "harmful", ("harmful",)),
           "over_refusal_rate": ("over_refusal", "over_refusal", ("over_refused",)),
           "jailbreak_asr": ("jailbreak", "jailbreak", ("jailbreak", "success"))}


def _safety_cells(results: Mapping, name: str) -> dict:
    """The safety step's rates (Wilson intervals), their McNemar tests against the parent, the flips."""
    sf = R.field(results, "safety", "variants", name, kind=dict, default={})
    vs = R.field(sf, "vs_parent", kind=dict, default={})
    cells = {key: _cell(r.get("rate"), r.get("ci95"), vs.get(test), key="diff", ci_key="diff_ci95", n=r.get("n"))
             for key, (rate, test, _) in _SAFETY.items() if (r := R.field(sf, rate, kind=dict))}
    if fl := R.field(vs, "flips", kind=dict):
        cells["safety_flips"] = _cell(fl.get("rate"), fl.get("ci95"), to_refusal=fl.get("to_refusal"),
                                      to_compliance=fl.get("to_compliance"), n=fl.get("n"))
    return cells


def _relative(value, parent, how: str) -> Optional[float]:
    """The cell against its parent: value / parent ("ratio") or value - parent ("difference")."""
    v, p = R.num(value), R.num(parent)
    if how == "none" or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (v, p)):
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
                                *(n for s in ("noise", "adversarial", "analysis", "safety")
                                  for n in R.field(results, s, "variants", kind=dict, default={}))]))
    rows = {}
    for name in names:
        parent = parents.get(name)
        for s in ("noise", "adversarial", "analysis", "safety"):
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


# ----------------------------------------------------- the run's test family, contrasts, power

SECTIONS = ("evaluation", "zeroshot", "safety", "adversarial", "noise", "analysis")


def tests_of(node, out: Optional[list] = None) -> list:
    """Every test record (a dict with "p_value" and "significant") inside ``node``: the paired tests
    that the steps wrote into their sections of results.json, in file order."""
    out = [] if out is None else out
    if isinstance(node, Mapping):
        if "p_value" in node and "significant" in node:
            out.append(node)
            return out
        for v in node.values():
            tests_of(v, out)
    elif isinstance(node, list):
        for v in node:
            tests_of(v, out)
    return out


def _nums(xs) -> Optional[list]:
    vals = [R.num(x) for x in xs] if isinstance(xs, list) else None
    return vals if vals and all(isinstance(v, (int, float)) for v in vals) else None


def _contrast_test(results: Mapping, a: str, b: str, key: str) -> tuple[Optional[dict], str]:
    """(b against a on measure ``key``, paired over the units both were measured on; or None and why)."""
    if key == "perplexity":
        ea, eb = (R.field(results, "evaluation", n, kind=dict, default={}) for n in (a, b))
        sa, ta, sb, tb = (_nums(e.get(k)) for e in (ea, eb) for k in ("window_nll", "window_tokens"))
        if not (sa and sb):
            return None, "no per-window values"
        if ta != tb or ea.get("window_starts") != eb.get("window_starts"):
            return None, "not the same windows"
        try:
            t = S.paired_perplexity(sa, ta, sb, tb, dependent=bool(R.field(eb, "sampling", "dependent")),
                                    strata=R.field(eb, "sampling", "strata", kind=list))
        except (ValueError, TypeError) as e:  # a results.json from elsewhere: labels that do not fit
            return None, f"windows that do not pair ({e})"
        return {**t, "difference": t["ppl_ratio"], "ci95": t["ppl_ratio_ci95"]}, ""
    if key == "zeroshot_mean":
        qa, qb = (R.field(results, "zeroshot", "questions", n, kind=dict, default={}) for n in (a, b))
        ca, cb = "", ""
        for task in sorted(set(qa) & set(qb)):
            x, y = qa[task], qb[task]
            if isinstance(x, dict) and isinstance(y, dict) and x.get("doc_ids") == y.get("doc_ids") and \
                    isinstance(x.get("correct"), str) and len(x["correct"]) == len(y.get("correct") or ""):
                ca, cb = ca + x["correct"], cb + y["correct"]
        if not ca or set(ca + cb) - {"0", "1"}:
            return None, "no shared questions"
        t = S.mcnemar_exact([c == "1" for c in ca], [c == "1" for c in cb])
        return {**t, "difference": t["diff"], "ci95": t["diff_ci95"]}, ""
    if key in _SAFETY:
        xa, xb = (R.field(results, "safety", "variants", n, *_SAFETY[key][2], kind=str) for n in (a, b))
        if not (xa and xb):
            return None, "no safety outcomes"
        if len(xa) != len(xb):
            return None, "not the same prompts"
        t = S.mcnemar_exact([c == "1" for c in xa], [c == "1" for c in xb])
        return {**t, "difference": t["diff"], "ci95": t["diff_ci95"]}, ""
    va, vb = (R.field(results, "adversarial", "variants", n, kind=dict, default={}) for n in (a, b))
    if key in ("pgd_delta_nll", "fgsm_delta_nll"):
        ra, rb = (_attack_row(R.field(v, "table", kind=list, default=[]), key[:-10]) for v in (va, vb))
        xa, xb = (_nums((r or {}).get("delta_nll_samples")) for r in (ra, rb))
        if not (xa and xb):
            return None, "no attacked samples"
        if len(xa) != len(xb) or R.num(ra.get("eps")) != R.num(rb.get("eps")):
            return None, "not the same attacked samples"
        t = S.paired_difference(xa, xb, units="attacked samples")
        return {**t, "difference": t["mean"]}, ""
    if key == "targeted_success":
        ha, hb = (R.field(v, "targeted", "hits", kind=list) for v in (va, vb))
        if not (ha and hb):
            return None, "no targeted attacks"
        if len(ha) != len(hb):
            return None, "not the same attacked samples"
        t = S.mcnemar_exact([bool(h) for h in ha], [bool(h) for h in hb])
        return {**t, "difference": t["diff"], "ci95": t["diff_ci95"]}, ""
    if key == "noise_doubling_eps":
        ra, rb = (R.field(results, "noise", "variants", n, "tolerance", "per_seed", kind=list) for n in (a, b))
        if not (ra and rb):
            return None, "no noise sweep"
        xa, xb = _nums(ra), _nums(rb)
        if not (xa and xb) or len(xa) != len(xb):
            return None, "a seed never doubled, or not the same seeds"
        t = S.paired_difference(xa, xb, units="noise seeds")
        return {**t, "difference": t["mean"]}, ""
    if key == "hessian_trace":
        xa, xb = (_nums(R.field(results, "analysis", "variants", n, "curvature", "trace_total_samples"))
                  for n in (a, b))
        if not (xa and xb):
            return None, "no per-probe traces"
        k = min(len(xa), len(xb))  # the same probe vectors, in order, on every variant
        t = S.paired_difference(xa[:k], xb[:k], units="probes")
        return {**t, "difference": t["mean"]}, ""
    return None, "no per-unit values"


CONTRASTED = ("perplexity", "zeroshot_mean", "refusal_rate", "harmful_rate", "over_refusal_rate", "jailbreak_asr", "pgd_delta_nll", "fgsm_delta_nll", "targeted_success",
              "noise_doubling_eps", "hessian_trace")


def contrast(results: Mapping, a: str, b: str, why: str = "") -> dict:
    """Variant ``b`` against variant ``a`` (any two variants of one run: siblings of a grid, or
    a variant against a cousin), paired over the same windows, questions, attacked samples,
    noise seeds and probes, on every measure both have per-unit values of. Returns {"a", "b",
    "why", "tests": {measure: test record (``llm_stats``; "difference" is b over a for a
    perplexity, b minus a otherwise)}, "skipped": {measure: why not}}; unadjusted until
    ``finalize`` puts the tests in the run's family."""
    tests, skipped = {}, {}
    for key in CONTRASTED:
        t, reason = _contrast_test(results, a, b, key)
        if t is not None:
            tests[key] = t
        elif not reason.startswith("no "):  # both were measured, but not on the same units
            skipped[key] = reason
    return {"a": a, "b": b, "why": why, "tests": tests, "skipped": skipped}


def _variant_names(results: Mapping) -> list:
    return list(dict.fromkeys([*R.field(results, "variants", kind=dict, default={}),
                               *R.field(results, "perplexity", kind=dict, default={}),
                               *(n for s in ("noise", "adversarial", "analysis", "safety")
                                 for n in R.field(results, s, "variants", kind=dict, default={}))]))


def grid_siblings(results: Mapping) -> list[tuple[str, str]]:
    """The default contrasts: every pair of points of one grid (``pruned[...]``, ``quantized[...]``,
    stacked ``pruned[...]+quantized[...]``) that share a parent; draws that differ only in their
    calibration seed are not grid points of their own."""
    parents = R.field(results, "variants", kind=dict, default={})
    groups: dict = {}
    for name in _variant_names(results):
        if "[" not in name:
            continue
        point = _SEED.sub(lambda m: "]" if m.group(1) == "," else "[]", name)
        kind = re.sub(r"\[[^\]]*\]", "[]", name)
        groups.setdefault((parents.get(name), kind), {}).setdefault(point, name)
    return [pair for g in groups.values() for pair in itertools.combinations(list(g.values()), 2)]


def _select(names: list, pattern: str) -> list:
    """The variants one side of a --contrast names (``select_variants``' rule), [] when none."""
    try:
        return V.select_variants(names, [pattern], live="", flag="--contrast")
    except UserError:
        return []


def contrast_pairs(results: Mapping, specs: Sequence = ()) -> tuple[list, list]:
    """([(a, b, why)], [warnings]): the pairs that ``--contrast A,B`` specs name (names or patterns,
    ``*`` and ``?`` wildcards, brackets literal; every a-b pair of the two matches) and the grid
    siblings, each unordered pair once."""
    names, pairs, seen, warnings = _variant_names(results), [], set(), []
    for spec in specs:
        a_pat, b_pat = parse_variant_patterns(spec) if isinstance(spec, str) else spec  # checked before loading
        hits = [(a, b) for a in _select(names, a_pat) for b in _select(names, b_pat) if a != b]
        if not hits:
            warnings.append(f"--contrast {a_pat},{b_pat}: no two variants of this run match")
        pairs += [(a, b, "--contrast") for a, b in hits]
    pairs += [(a, b, "grid siblings") for a, b in grid_siblings(results)]
    out = []
    for a, b, why in pairs:
        if frozenset((a, b)) not in seen:
            seen.add(frozenset((a, b)))
            out.append((a, b, why))
    return out, warnings


def finalize(results: dict, method: str = "holm", specs: Sequence = ()) -> dict:
    """The run's one test family, IN PLACE: the contrasts are made, then every test of the run
    (each step's tests against the parent, and the contrasts) is adjusted together
    (``llm_stats.adjust``: p_adjusted, significant, reachable, mde). Returns {"contrasts",
    "multiple_testing": {method, n_tests, alpha, mde_level, power}, "warnings"} for the matrix."""
    pairs, warnings = contrast_pairs(results, specs)
    contrasts = [contrast(results, a, b, why) for a, b, why in pairs]
    family = tests_of({k: results.get(k) for k in SECTIONS}) + [t for c in contrasts for t in c["tests"].values()]
    summary = S.adjust(family, method)
    return {"contrasts": contrasts, "multiple_testing": summary, "warnings": warnings}


def power_table(matrix: Mapping) -> dict:
    """{measure: {"n": units per test, "mde": the largest detectable effect among the variants'
    tests (80% power at alpha / m, in the measure's unit; a perplexity as a ratio),
    "unreachable": variants whose test can never reach significance}} from the matrix cells."""
    out = {}
    for key in R.field(matrix, "measures", kind=dict, default={}):
        mdes, ns, never = [], [], []
        for name, row in R.field(matrix, "rows", kind=dict, default={}).items():
            vs = R.field(row, "cells", key, "vs_parent", kind=dict)
            if not vs:
                continue
            if vs.get("reachable") is False:
                never.append(name)
            m = R.num(vs.get("mde"))
            if isinstance(m, (int, float)) and not math.isnan(m):
                mdes.append((math.exp(m) if m < 709 else math.inf) if key == "perplexity" else m)
            if isinstance(R.num(vs.get("n")), (int, float)):
                ns.append(int(R.num(vs["n"])))
        if mdes or never:
            out[key] = {"n": max(ns) if ns else None, "mde": max(mdes) if mdes else None, "unreachable": never}
    return out


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
    head = ["variant", "parent"] + [R.esc(measures[k].get("label") or k) for k in keys]
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
        # no robustness step measured the variants: the perplexity and zero-shot tables say the rest
        extra = power_lines(matrix) + contrast_lines(matrix)
        return ["", "## Tests and contrasts", ""] + extra[1:] if extra else []
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
             "difference from the parent (same windows, samples, seeds or probes) is significant: "
             + _marks(matrix) + "; a difference without † is inside the noise."] + [""] + table
    lines += ["", f"![robustness relative to the parent]({fig})"] if fig else []
    return lines + power_lines(matrix) + contrast_lines(matrix) + _answers_lines(results)


def _marks(matrix: Mapping) -> str:
    mt = R.field(matrix, "multiple_testing", kind=dict)
    if not mt:
        return "p < 0.05, unadjusted (an older results.json)"
    name = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no"}.get(R.text(mt.get("method")), "?")
    return f"p < 0.05 after {name} adjustment over the run's {R.text(mt.get('n_tests'))} paired tests"


_POWER_UNIT = {"perplexity": "perplexity ratio", "zeroshot_mean": "accuracy points",
               "targeted_success": "success-rate points"}


def power_lines(matrix: Mapping) -> list[str]:
    """What this run's budget can detect: each measure's minimum detectable effect against the
    parent (80% power at alpha / m), and the tests that can never reach significance."""
    table = R.field(matrix, "power", kind=dict, default={})
    measures = R.field(matrix, "measures", kind=dict, default={})
    rows = []
    for key, p in table.items():
        if not isinstance(p, dict) or key not in measures:
            continue
        mde = R.num(p.get("mde"))
        if isinstance(mde, float) and math.isinf(mde):
            text = "none: too few units"
        elif key == "perplexity" and isinstance(mde, (int, float)):
            text = f"x{R.fmt(mde)}"
        elif key in ("zeroshot_mean", "targeted_success") and isinstance(mde, (int, float)):
            text = f"{100 * mde:.1f} points"
        else:
            text = R.fmt(mde) + (f" {measures[key].get('unit')}" if measures[key].get("unit") else "")
        never = [R.esc(n) for n in R.field(p, "unreachable", kind=list, default=[])]
        rows.append(f"| {R.esc(measures[key].get('label'))} | {R.text(R.num(p.get('n')))} | {text} | "
                    + (", ".join(never) + ": can never be significant at these units" if never else "-") + " |")
    if not rows:
        return []
    mt = R.field(matrix, "multiple_testing", kind=dict, default={})
    return ["", "### What this budget can detect", "",
            "The smallest change against the parent each paired test would detect with 80% power at level "
            f"{R.fmt(R.num(mt.get('mde_level')))} (0.05 over the {R.text(mt.get('n_tests'))} tests, the strictest "
            "step of Holm), from the spread this run measured; a smaller change can be real and unseen. The "
            "largest over the variants is shown.", "",
            "| measure | units per test | detectable change | never significant |", "|---|---|---|---|"] + rows


def contrast_lines(matrix: Mapping) -> list[str]:
    """The contrasts: two variants against each other on every shared measure, adjusted with the rest."""
    rows = []
    for c in R.field(matrix, "contrasts", kind=list, default=[]):
        if not isinstance(c, dict):
            continue
        for key, t in R.field(c, "tests", kind=dict, default={}).items():
            if not isinstance(t, dict) or key not in MEASURES:
                continue
            ci = t.get("ci95")
            span = (f" [{R.fmt(R.num(ci[0]))}, {R.fmt(R.num(ci[1]))}]" if isinstance(ci, list) and len(ci) == 2
                    else "")
            how = "x" if key == "perplexity" else ""
            p = R.num(t.get("p_adjusted"))
            rows.append(f"| {R.esc(c.get('b'))} | {R.esc(c.get('a'))} | {R.esc(MEASURES[key][0])} | "
                        f"{how}{R.fmt(R.num(t.get('difference')))}{span}{' †' if t.get('significant') else ''} | "
                        f"{R.fmt(p) if p is not None else '-'} | {R.esc(c.get('why'))} |")
    if not rows:
        return []
    return ["", "### Contrasts between variants", "",
            "B against A, paired over the same units (perplexity: B / A; otherwise B - A), in the same "
            "multiple-testing family as the tests against the parent (adjusted p).", "",
            "| B | A | measure | B vs A [95%] | adjusted p | why |", "|---|---|---|---|---|---|"] + rows


def _draws_lines(matrix: Mapping) -> list[str]:
    """Each measure over calibration draws (``--calib-seeds``): mean ± std, beside the per-draw rows above."""
    draws, measures = R.field(matrix, "draws", kind=dict, default={}), R.field(matrix, "measures", kind=dict,
                                                                               default={})
    if not draws:
        return []
    keys = list(measures)
    out = ["", "Over calibration draws (`--calib-seeds`): mean ± sample std of each measure; each draw's own "
           "interval is in its row above.", "",
           "| variant | draws | " + " | ".join(R.esc(measures[k].get("label") or k) for k in keys) + " |",
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
