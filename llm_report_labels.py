"""The report's sentences for results that did not come out as a reader might assume: a noise
sweep whose perplexity never doubles, an analysis that found no super weight, an adversarial
fine-tune that changed nothing or never ran. Each says what happened and what was searched,
never a bare "-" where a number would stand. Read from ``results.json`` through ``llm_results``.
"""
from __future__ import annotations

from typing import Mapping

import llm_results as R


def doubling(sweep: Mapping, curve: str) -> str:
    """"doubles at eps=0.11", or "does not double within the sweep (max eps 0.5)" where the sweep
    never reached twice the clean perplexity (results.json holds no eps for it)."""
    eps = R.num(R.field(sweep, "doubling_eps", curve))
    if eps is not None:
        return f"doubles at eps={R.fmt(eps)}"
    points = R.field(sweep, "points", kind=list, default=[])
    tried = [R.num(p.get("eps")) for p in points if isinstance(p, dict)]
    tried = [e for e in tried if e is not None] or [R.num(e) for e in R.field(
        sweep, "summary", curve, "perplexity", kind=dict, default={})]
    tried = [e for e in tried if e is not None]
    return f"does not double within the sweep (max eps {R.fmt(max(tried)) if tried else '-'})"


def no_super_weight(an: Mapping) -> str:
    """What the analysis searched when it found no super weight: the down projections' output
    spikes on its prompt, and the perplexity ratio a candidate's ablation had to reach."""
    cfg = R.field(an, "config", kind=dict, default={})
    rejected = R.field(an, "super_weights_rejected", kind=list, default=[])
    layers = len(R.field(an, "hessian_layer_trace", kind=list, default=[])) or "every"
    searched = (f"searched the MLP down projections of {layers} layers for output spikes on the prompt "
                f"{R.esc(repr(cfg.get('super_weight_prompt')))} (at most "
                f"{R.fmt(cfg.get('max_super_weights'))} candidates), accepting one whose ablation multiplies "
                "perplexity by at least "
                f"{R.fmt(cfg.get('super_weight_min_ratio'))}")
    return (f"No super weight found: {searched}; " + (f"{len(rejected)} candidate(s) spiked but did not hurt "
            "when zeroed." if rejected else "no output spiked."))


def _unchanged(at: Mapping) -> bool:
    before, after = R.num(at.get("delta_nll_before")), R.num(at.get("delta_nll_after"))
    return before is not None and R.fmt(before) == R.fmt(after)


def defence_line(at: Mapping) -> str:
    """One sentence on the adversarial-training defence (results before the defence field
    existed ran PGD adversarial training); "not run" for 0 steps, "nothing changed" where the delta
    NLL reads the same before and after (to the report's 4 digits)."""
    if at.get("defence") == "none":
        return "Adversarial fine-tune: off (--defence none)."
    name = at.get("defence", "pgd")
    if not at.get("steps"):
        return f"Adversarial fine-tune ({name}): not run (0 steps)."
    passes = (at.get("passes") or {}).get("training") or {}
    cost = f", {passes['forward']} forward / {passes['backward']} backward passes" if passes else ""
    if _unchanged(at):
        return (f"Adversarial fine-tune ({name}, {at['steps']} steps{cost}): nothing changed: delta NLL at "
                f"eps {at['eps']} stays {R.fmt(at['delta_nll_before'])} on held-out samples.")
    return (f"Adversarial fine-tune ({name}, {at['steps']} steps{cost}): delta NLL at "
            f"eps {at['eps']} {R.fmt(at['delta_nll_before'])} -> {R.fmt(at['delta_nll_after'])} on "
            "held-out samples.")


def defence_finding(at: Mapping) -> list[str]:
    """The Findings line on the defence: what it changed, that it changed nothing, or none at all
    where it was off or never ran."""
    if at.get("defence") == "none" or not at.get("steps"):
        return []
    head = f"A {at['steps']}-step adversarial fine-tune ({at.get('defence', 'pgd')})"
    if _unchanged(at):
        return [f"{head} changed nothing: PGD's delta NLL stays {R.fmt(at['delta_nll_before'])} at "
                f"eps={at['eps']}."]
    return [f"{head} changes PGD's delta NLL from {R.fmt(at['delta_nll_before'])} to "
            f"{R.fmt(at['delta_nll_after'])} at eps={at['eps']}."]
