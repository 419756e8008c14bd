"""The report's trust panel: the safety step's refusals, over-refusals and jailbreaks per variant.

Read from results.json alone (``results["safety"]``), like every report section: each rate with its
Wilson interval, the difference from the parent with its exact McNemar test on the same prompts
(p adjusted over the run's family, † where significant), and the flips of the judged outcome.
"""
from __future__ import annotations

import llm_results as R
import llm_report_stats as RS


def _pct_ci(ci) -> str:
    """"[0.6, 5.4]": an interval of a proportion (or a difference of two) in points, or ""."""
    lo, hi = (R.num(x) for x in (ci if isinstance(ci, list) and len(ci) == 2 else (None, None)))
    return f"[{100 * lo:.1f}, {100 * hi:.1f}]" if isinstance(lo, float) and isinstance(hi, float) else ""


def _rate(r) -> str:
    if not isinstance(r, dict) or R.num(r.get("rate")) is None:
        return "-"
    return f"{R.acc_pct(r['rate'])} {_pct_ci(r.get('ci95'))} ({r.get('k')}/{r.get('n')})"


def _diff(t) -> str:
    """The variant minus its parent, in points, [95%], p (adjusted), † when significant after adjustment."""
    if not isinstance(t, dict) or R.num(t.get("diff")) is None:
        return "-"
    p = t.get("p_adjusted", t.get("p_value"))
    mark = f" {RS.MARK}" if t.get("significant") else ""
    return f"{100 * R.fnum(t['diff']):+.1f} {_pct_ci(t.get('diff_ci95'))} p={R.fmt(p)}{mark}"


def md_safety(results: dict) -> list[str]:
    """The trust panel section, or nothing when the step did not run."""
    sf = results.get("safety")
    if not isinstance(sf, dict) or sf.get("status") != "ran":
        return []
    prov = R.field(sf, "provenance", "harmful", kind=dict, default={})
    cfg = R.field(sf, "config", kind=dict, default={})
    judge = R.field(sf, "judge", kind=dict, default={})
    rows = R.field(sf, "variants", kind=dict, default={})
    has = {k: any(isinstance(v, dict) and v.get(k) for v in rows.values())
           for k in ("harmful_rate", "over_refusal", "jailbreak")}
    lines = ["", "## Trust panel (refusals and jailbreaks)", "",
             f"{R.esc(prov.get('n'))} harmful prompts from {R.esc(prov.get('source'))} ({R.esc(prov.get('sample'))}, "
             f"of {R.esc(prov.get('of'))}), each one user turn in the chat template, answered greedily for "
             f"{R.esc(cfg.get('max_new_tokens'))} tokens. Refusal: {R.esc(judge.get('rule'))}"
             + (f"; judge model {R.esc(judge.get('model'))}, whose verdict decides compliance" if judge.get("model") else "")
             + ". Rates in % with Wilson 95% intervals; Δ: the variant minus its parent on the same prompts, in "
             "points, with the exact McNemar test (p adjusted over the run's family; † significant)."
             + (f" Jailbreak: GCG suffixes ({R.esc(cfg.get('gcg_steps'))} steps, target "
                f"{R.esc(repr(cfg.get('gcg_target')))}) found on {R.esc(sf.get('source'))} for "
                f"{len(sf.get('suffixes') or [])} behaviour(s), sent to every variant; beside it, the same behaviours "
                "without the suffix." if has["jailbreak"] else ""),
             "",
             "| variant | parent | refusal [95%] | Δ refusal | " + ("judged harmful | " if has["harmful_rate"] else "")
             + ("over-refusal | " if has["over_refusal"] else "") + ("jailbreak success | without suffix | Δ jailbreak | " if has["jailbreak"] else "")
             + "flips → refusal / → compliance |",
             "|---|---|---|---|" + "---|" * (has["harmful_rate"] + has["over_refusal"] + 3 * has["jailbreak"]) + "---|"]
    for name, v in rows.items():
        if not isinstance(v, dict):
            continue
        vs = v.get("vs_parent") or {}
        fl = vs.get("flips") or {}
        cells = [R.esc(name), R.esc(v.get("parent") or "-"), _rate(v.get("refusal")), _diff(vs.get("refusal"))]
        cells += [_rate(v.get("harmful_rate"))] if has["harmful_rate"] else []
        cells += [_rate(v.get("over_refusal"))] if has["over_refusal"] else []
        cells += ([_rate(v.get("jailbreak")), _rate(R.field(v, "jailbreak", "without_suffix")), _diff(vs.get("jailbreak"))]
                  if has["jailbreak"] else [])
        cells += [f"{fl['to_refusal']} / {fl['to_compliance']} of {fl['n']}" if fl else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
