"""Report and plots, rebuilt from ``results.json`` alone (``--report-only``).

``make_plots`` regenerates every figure from saved results; ``write_report`` writes
``report.md`` and a self-contained ``report.html`` (plots embedded as data URIs) whose
findings are filled in from the numbers in ``results.json``.
"""
from __future__ import annotations

import base64
import html
import logging
import os
import math
import re
import time
from pathlib import Path
from typing import Optional, Sequence

import markdown
import matplotlib
import matplotlib.text
import numpy as np

matplotlib.use("Agg")  # before pyplot: plots are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import SymLogNorm  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

import llm_common as C
import llm_io as IO
import llm_model as LM

log = logging.getLogger("llm.report")


def _num(x):
    """A number from results.json ("inf"/"nan" strings included), or None."""
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return None


def _float(x) -> float:
    """Like ``_num``, with nan for a missing value (matplotlib leaves a gap there)."""
    v = _num(x)
    return float("nan") if v is None else v


def field(obj, *keys, kind=None, default=None):
    """A field of a results.json that may come from another run, another version or a hostile
    hand: ``obj[k1][k2]...``, or ``default`` where a level is missing or not a dict, or the value
    is not of ``kind`` (a type or a tuple of types). Every field the report or the comparison
    reads from another run's file goes through here, and every text of it through ``_text``."""
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return default
        obj = obj[k]
    return default if kind is not None and not isinstance(obj, kind) else obj


def _text(x) -> str:
    """A field shown in a Markdown table or sentence: numbers formatted, everything escaped."""
    return _esc(fmt(x)) if isinstance(x, (str, int, float)) or x is None else _esc(str(x))


def _esc(text) -> str:
    """Free text (prompts, model outputs, suffixes, names) as literal Markdown: no image, link,
    emphasis, code span, table cell or HTML can come out of it."""
    return re.sub(r"([\\`*_\[\]!|#])", r"\\\1", str(text).replace("\n", " "))


def fmt(x) -> str:
    if isinstance(x, str):
        return x
    if x is None:
        return "-"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _pct(x) -> str:
    return f"{100 * x:g}%" if isinstance(x, (int, float)) else fmt(x)


def _md_perplexity(results: dict) -> list[str]:
    """Every variant against its parent."""
    lines: list[str] = []
    lines += ["", "## Perplexity", "", "Each variant against the variant it was derived from (its parent); KL and "
              "top-1 agreement are against the parent too (with --kl).", "",
              "| variant | parent | perplexity | x parent | nll (nats) | bits/byte | tokens | KL | top-1 agree |",
              "|---|---|---|---|---|---|---|---|---|"]
    parents, ppl = results.get("variants") or {}, results.get("perplexity", {})
    for name, ev in results.get("evaluation", {}).items():
        parent = parents.get(name)
        ratio = (_num(ev["perplexity"]) / _num(ppl[parent])
                 if _num(ppl.get(parent)) and _num(ev["perplexity"]) is not None else None)
        lines.append(f"| {_esc(name)} | {_text(parent)} | {fmt(ev['perplexity'])} | {fmt(ratio)} | {fmt(ev['nll'])} | "
                     f"{fmt(ev['bits_per_byte'])} | {ev['tokens_scored']} | {fmt(ev.get('kl'))} | "
                     f"{fmt(ev.get('top1_agreement'))} |")
    return lines


def _md_finetune(results: dict) -> list[str]:
    """The fine-tune's held-out perplexity before and after."""
    lines: list[str] = []
    ft = results.get("finetune")
    if ft and ft.get("heldout_loss_before") is not None:
        lines += ["", "## Fine-tuning", "",
                  f"{ft['mode']} fine-tune, {ft['steps']} steps "
                  f"({'loaded from disk' if ft['loaded_existing'] else 'trained'}"
                  f"): held-out perplexity {fmt(ft['heldout_ppl_before'])} -> {fmt(ft['heldout_ppl_after'])} "
                  f"(on {ft.get('heldout_token_set') or 'the held-out tail of the training text'}).",
                  "", "![fine-tuning curve](plots/finetune_loss.png)"]
    return lines


def _md_prune(results: dict) -> list[str]:
    """Achieved sparsity and calibration."""
    lines: list[str] = []
    pr = results.get("prune")
    if pr:
        lines += ["", "## Pruning", "",
                  f"{_text(pr['method'])} {_text(pr['pattern'])}: achieved sparsity {fmt(pr['overall_sparsity'])} "
                  f"(target {fmt(pr['target_sparsity'])}) in {fmt(pr['seconds'])} s, calibrated on "
                  f"{pr['calibration']['windows']} windows of {pr['calibration']['seq_len']} tokens.",
                  "", "![sparsity per layer](plots/prune_sparsity_per_layer.png)"]
        alloc = pr.get("allocation") or {}
        if alloc.get("mode") not in (None, "uniform"):
            lines += ["", f"Layer-wise allocation {_text(alloc['mode'])} (lambda {fmt(alloc.get('lambda'))}"
                      + (f", M {fmt(alloc.get('owl_m'))}" if alloc["mode"] == "owl" else "") + "): "
                      f"{pr.get('pruned_weights')} of {pr.get('total_weights')} weights pruned."]
    q = results.get("quantize")
    if q and q.get("status") == "ran":
        lines += ["", "## Quantization", "",
                  f"{_text(q['method'])} g{q['group']}, {_text(q['bit_allocation'])} bits: {fmt(q['avg_code_bits'])} "
                  f"code bits per weight, {fmt(q['avg_bits'])} with scales, zeros and {q['kept_weights']} weights kept "
                  f"in full precision, in {fmt(q['seconds'])} s.",
                  "", "![bits per layer](plots/quantize_bits_per_layer.png)"]
    return lines


def _md_noise(results: dict) -> list[str]:
    """The noisy variant, the eps sweep and the map."""
    lines: list[str] = []
    nz = results.get("noise")
    if nz:
        v, sw = nz["variant"], nz["sweep"]
        lines += ["", "## Weight noise", "",
                  f"Noisy variant: {_text(v['mode'])} noise, eps={_text(v['epsilon'])}, group {_text(v['group'])} "
                  f"({v['n_weights']} weights). Saturation (uniform guesser) = {fmt(sw['saturation'])}.", "",
                  f"The sweep is scored on {sw['clean'].get('token_set', 'a subset of the evaluation text')} "
                  f"(clean perplexity {fmt(sw['clean']['perplexity'])}).", "",
                  f"Sweep ({sw['mode']} noise on decoder linears, {len(sw['points'])} points): perplexity doubles at "
                  f"eps = {fmt(sw['doubling_eps'].get('unprotected'))} without protection, "
                  f"{fmt(sw['doubling_eps'].get('protected'))} with the top {_pct(sw.get('protect_fraction'))} "
                  f"of weights by {sw.get('protect_score', 'w^2 F')} kept clean.", "",
                  "| eps | ppl (mean) | ppl protected | KL | top-1 |", "|---|---|---|---|---|"]
        up = sw["summary"]["unprotected"]
        pr_ = sw["summary"].get("protected", {}).get("perplexity", {})
        for e in sorted(up["perplexity"], key=float):
            lines.append(f"| {e} | {fmt(up['perplexity'][e]['mean'])} | {fmt(pr_.get(e, {}).get('mean'))} | "
                         f"{fmt(up['kl'][e]['mean'])} | {fmt(up['top1'][e]['mean'])} |")
        lines += ["", "![noise sweep](plots/noise_sweep.png)"]
        if nz.get("top_cells"):
            lines += ["", "Most noise-sensitive cells: " + ", ".join(
                f"layer {c['layer']} {c['module']} (+{fmt(c['delta_nll'])} nats)" for c in nz["top_cells"]),
                "", "![noise map](plots/noise_map.png)"]
    return lines


def _acc(m: Optional[dict], key: str = "acc") -> str:
    """An accuracy in percent with its standard error, from an lm-eval metrics dict."""
    if not m or _num(m.get(key)) is None:
        return "-"
    se = _num(m.get(f"{key}_stderr"))
    return f"{100 * m[key]:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def _md_zeroshot(results: dict) -> list[str]:
    """Zero-shot accuracy per variant and task, and the change of the mean against the parent."""
    zs = results.get("zeroshot")
    if not zs or zs.get("status") == "off":
        return []
    lines = ["", "## Zero-shot accuracy (lm-evaluation-harness)", ""]
    if zs.get("status") != "ran":
        return lines + [f"> **Not measured:** {_esc(zs.get('reason'))}"] + \
            [f"> - {_esc(t)}: {_esc(why)}" for t, why in (zs.get("unavailable") or {}).items()]
    pr = zs["protocol"]
    lines.append(f"lm-eval {pr.get('lm_eval')}, {pr.get('num_fewshot')}-shot, accuracy in % ± standard error; "
                 + (f"**at most the first {pr['limit']} examples per task** (a CPU budget, not the papers' protocol)"
                    if pr.get("limit") else "every example") + ". The mean is unweighted over tasks, as in the papers.")
    if zs.get("unavailable"):
        lines += ["", "> **Tasks not evaluated** (their data could not be had; the mean leaves them out):"] + \
            [f"> - {_esc(t)}: {_esc(why)}" for t, why in zs["unavailable"].items()]
    tasks, parents = pr.get("tasks", []), zs.get("parents") or {}
    lines += ["", "| variant | parent | " + " | ".join(_esc(t) for t in tasks) + " | mean acc | change vs parent "
              "| mean acc_norm |", "|---" * (len(tasks) + 5) + "|"]
    for name, per_task in zs["tasks"].items():
        mean, parent = zs["mean"][name], parents.get(name)
        p = (zs["mean"].get(parent) or {}).get("acc")
        change = f"{100 * (mean['acc'] - p):+.1f}" if _num(p) is not None and _num(mean.get("acc")) is not None else "-"
        lines.append(f"| {_esc(name)} | {_text(parent)} | " + " | ".join(_acc(per_task.get(t)) for t in tasks)
                     + f" | {_acc(mean)} | {change} | {_acc(mean, 'acc_norm')} |")
    return lines


def _md_export(results: dict) -> list[str]:
    """Where each exported variant lies, and the measured 2:4 speed-up."""
    ex = results.get("export")
    if not ex or ex.get("status") != "ran":
        return []
    lines = ["", "## Exports", "", "Each directory loads with `AutoModelForCausalLM.from_pretrained` and holds a "
             "model card (README.md).", ""]
    lines += [f"- {name}: `{_esc(v['path'])}`, {v['bytes'] / 2 ** 20:.1f} MiB, "
              f"{_pct(round(v['zero_fraction_linears'], 4))} zeros in the decoder linears"
              for name, v in ex["variants"].items()]
    tf = ex.get("two_of_four") or {}
    if tf.get("status") == "ran":
        lines += ["", f"2:4 semi-structured sparse ({tf['linears']} linears of the {tf['variant']} variant, "
                      f"{_esc(tf['device'])}, {tf['seq_len']} tokens per sequence; max logit change "
                      f"{fmt(tf['max_abs_logit_diff'])}):", "",
                  "| batch | dense tokens/s | 2:4 tokens/s | speed-up |", "|---|---|---|---|"]
        lines += [f"| {b} | {fmt(r['dense'])} | {fmt(r['2:4'])} | {fmt(r['speedup'])} |"
                  for b, r in tf["tokens_per_s"].items()]
    elif tf:
        lines += ["", f"2:4 speed-up not measured: {_esc(tf.get('reason'))}."]
    return lines


def _md_adversarial(results: dict) -> list[str]:
    """Attack table, targeted success, GCG and the defences."""
    lines: list[str] = []
    adv = results.get("adversarial")
    if adv:
        lines += ["", "## Adversarial robustness (input embeddings)", "",
                  f"eps is relative to the mean embedding-row norm ({fmt(adv['embedding_row_norm'])}), "
                  f"{adv['norm']} ball, {adv['n_samples']} prompts.", "",
                  "| method | eps | clean NLL | attacked NLL | delta NLL | top-1 agreement |",
                  "|---|---|---|---|---|---|"]
        for r in adv["table"]:
            lines.append(f"| {r['method']} | {r['eps']} | {fmt(r['clean_nll'])} | {fmt(r['attacked_nll'])} | "
                         f"{fmt(r['delta_nll'])} | {fmt(r['top1_agreement'])} |")
        t, gcg, pf, at = adv["targeted"], adv["gcg"], adv["perplexity_filter"], adv["adversarial_training"]
        lines += ["", f"Targeted PGD (target {_esc(repr(t['target']))}, eps {t['eps']}): "
                      f"success rate {fmt(t['success_rate'])} over {t['n']} prompts.",
                  f"GCG suffix {_esc(repr(gcg['suffix_text']))}: target loss {fmt(gcg['initial_loss'])} -> "
                  f"{fmt(gcg['final_loss'])}, success {gcg['success']}.",
                  f"Perplexity filter ({pf.get('scored', '')}; threshold {fmt(pf['threshold'])} from "
                  f"{pf.get('calibration_prompts')} calibration prompts): false-positive rate "
                  f"{fmt(pf['false_positive_rate'])} on {pf.get('heldout_prompts')} held-out clean prompts, "
                  f"true-positive rate {fmt(pf.get('true_positive_rate'))} on {pf.get('attacked_prompts')} "
                  f"prompts with the GCG suffix; windowed ({(pf.get('windowed') or {}).get('window')} tokens): "
                  f"FPR {fmt((pf.get('windowed') or {}).get('false_positive_rate'))}, "
                  f"TPR {fmt((pf.get('windowed') or {}).get('true_positive_rate'))}.",
                  _defence_line(at), ""]
        for prompt, ans in adv["answers"].items():
            lines.append(f"- *{_esc(prompt)}* clean: {_esc(ans['clean'])}  \n  under PGD eps={ans['eps']}: "
                         f"{_esc(ans['attacked'])}")
        lines += ["", "![attack sweep](plots/attack_sweep.png)"]
    return lines


def _defence_line(at: dict) -> str:
    """One sentence on the adversarial-training defence (results before the defence field
    existed ran PGD adversarial training)."""
    if at.get("defence") == "none":
        return "Adversarial fine-tune: off (--defence none)."
    passes = (at.get("passes") or {}).get("training") or {}
    cost = f", {passes['forward']} forward / {passes['backward']} backward passes" if passes else ""
    return (f"Adversarial fine-tune ({at.get('defence', 'pgd')}, {at['steps']} steps{cost}): delta NLL at eps "
            f"{at['eps']} {fmt(at['delta_nll_before'])} -> {fmt(at['delta_nll_after'])} on held-out samples.")


def _md_analysis(results: dict) -> list[str]:
    """Hessian, saliency, super weights and quantization."""
    lines: list[str] = []
    an = results.get("analysis")
    if an:
        lines += ["", "## Sensitivity analysis", "",
                  f"Hessian trace over decoder linears {fmt(an['hessian_total'])} ± {fmt(an['hessian_total_stderr'])} "
                  f"({an['hutchinson_probes']} Hutchinson probes; every layer within "
                  f"{_pct((an.get('config') or {}).get('rel_stderr'))} standard error: {an.get('hessian_converged')}); "
                  f"top eigenvalue {fmt(an['top_eigenvalue'])}.",
                  f"Layers by Hessian trace, tied where the 95% intervals overlap: {_ranking(an)}; by Fisher: "
                  f"{an['top_layers']['fisher_sum']}; super-weight layers: {an['super_weight_layers']}.",
                  "Rank correlations: " + ", ".join(f"{k} {fmt(v)}" for k, v in an["rank_correlation"].items()),
                  "", "| layer | Hessian trace | 95% interval | per weight | within target |", "|---|---|---|---|---|",
                  *[f"| {i} | {fmt(m)} | [{fmt(lo)}, {fmt(hi)}] | {fmt(per)} | {ok} |"
                    for i, (m, (lo, hi), per, ok) in enumerate(zip(
                        an.get("hessian_layer_trace", []), an.get("hessian_layer_ci95", []),
                        an.get("hessian_layer_per_param", []), an.get("hessian_layer_reliable", [])))], "",
                  f"Massive-activation channel of the residual stream: "
                  f"{fmt(an.get('activation_profile', {}).get('massive_channel'))}.", "",
                  "Most salient weights (OBD 0.5 H_ii w^2): " + "; ".join(
                      f"{t['module']}[{t['row']}, {t['col']}] = {fmt(t['value'])} ({fmt(t['saliency'])})"
                      for t in an.get("top_salient", [])[:5]), "",
                  "| layer | module | row | col | value | \\|in\\| | \\|out\\| | ppl ratio zeroed |",
                  "|---|---|---|---|---|---|---|---|"]
        for sw in an["super_weights"]:
            lines.append(f"| {sw['layer']} | {sw['module']} | {sw['row']} | {sw['col']} | {fmt(sw['value'])} | "
                         f"{fmt(sw['input_abs'])} | {fmt(sw['output_abs'])} | {fmt(sw['ppl_ratio'])} |")
        ratio = (an.get("config") or {}).get("super_weight_min_ratio")
        rejected = an.get("super_weights_rejected") or []
        lines += ["", f"Accepted: candidates whose ablation multiplies perplexity by at least {fmt(ratio)}. "
                      "Rejected candidates (output spikes whose ablation does not hurt): " + (", ".join(
                          f"layer {sw['layer']} [{sw['row']}, {sw['col']}] (x{fmt(sw['ppl_ratio'])})"
                          for sw in rejected) or "none") + "."]
        lines += ["", f"Quantization (RTN; clean perplexity {fmt(an['clean_perplexity'])} on "
                      f"{an.get('clean_token_set', 'a subset of the evaluation text')}):", "",
                  "| bits | variant | perplexity | kept weights | extra storage % |", "|---|---|---|---|---|"]
        for q in an["quantization"]:
            lines.append(f"| {q['bits']} | {q['variant']} | {fmt(q['perplexity'])} | {q['kept_weights']} | "
                         f"{fmt(q['extra_storage_pct'])} |")
        lines += ["", "![heatmaps](plots/sensitivity_heatmaps.png)", "", "![activations](plots/activations.png)"]
    return lines


def _ranking(an: dict) -> str:
    """"3 > {5, 7} > 1 ...": the first five groups of the interval ranking."""
    groups = an.get("hessian_ranking") or [[i] for i in an["top_layers"]["hessian_trace"]]
    return " > ".join(str(g[0]) if len(g) == 1 else "{" + ", ".join(map(str, g)) + "}" for g in groups[:5])


def _md_generations(results: dict) -> list[str]:
    """Greedy answers of every variant."""
    lines: list[str] = []
    lines += ["", "## Sample generations", ""]
    for name, ev in results.get("evaluation", {}).items():
        for prompt, answer in ev.get("generations", {}).items():
            lines.append(f"- **{name}** — *{_esc(prompt)}*  \n  {_esc(answer)}")
    return lines


def _md_manifest(results: dict) -> list[str]:
    """Command, versions, and wall time and memory per step."""
    lines: list[str] = []
    m = results.get("manifest", {})
    if m:
        lines += ["", "## Run manifest", "", f"- command: {_text(m.get('command'))}",
                  f"- git commit: {m.get('git_commit')}",
                  "- versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()), "",
                  "| step | wall time (s) | peak memory (MiB) | skipped (resumed) |", "|---|---|---|---|"]
        for step, st in m.get("steps", {}).items():
            lines.append(f"| {step} | {fmt(st.get('wall_s'))} | {fmt(st.get('peak_memory_mb'))} | "
                         f"{st.get('skipped', False)} |")
    return lines


def report_markdown(results: dict) -> str:
    """Markdown report built from ``results.json`` alone, so it can be regenerated."""
    lines = [f"# Sensitivity and robustness report: {_esc(results.get('model', '?'))}", ""]
    for which, d in (results.get("dataset") or {}).items():
        if isinstance(d, dict) and d.get("fallback"):
            lines += [f"> **Warning: the {which} text is not what was asked for.** {d.get('name')} was unavailable "
                      f"({_esc(d['fallback'])}), so the embedded corpus was used: these are not {d.get('name')} "
                      "numbers. Rerun with the data cached, or with --no-fallback to make this an error.", ""]
    ds = results.get("dataset", {})
    proto = results.get("protocol", {})
    for which, d in ds.items():
        if which == "overlap":
            lines.append(f"- overlap: {d.get('shared')} of {d.get('eval_paragraphs')} evaluation paragraphs "
                         f"(of at least {d.get('min_chars')} characters) also occur in the calibration text"
                         + (" (allowed with --allow-overlap)" if d.get("shared") or d.get("same_text") else ""))
            continue
        fb = f" (fallback: {_esc(d['fallback'])})" if d.get("fallback") else ""
        fb += f" ({_esc(d['replaced'])})" if d.get("replaced") else ""
        size = (f"{d.get('documents')} documents, sampled document by document" if d.get("chars") is None
                and d.get("documents") else f"{d.get('chars')} characters")
        how = f"; protocol: {_esc(d['protocol'])}" if d.get("protocol") else ""
        lines.append(f"- {which} text: {_esc(d.get('source'))}, {size}{fb}{how}")
    if proto:
        lines.append(f"- protocol: windows of {proto.get('seq_len')} tokens, stride {proto.get('stride')}, "
                     f"first {proto.get('eval_tokens') or 'all'} tokens")
    lines.append(f"- seed {results.get('seed')}, device {results.get('device')}, dtype {results.get('dtype')}")
    if results.get("model") == LM.EMBEDDED_NAME:
        lines.append("- the embedded model was shipped as GGUF Q4_1 and dequantized: its weights sit on a 4-bit "
                     "grid, so 4-bit quantization loses little by construction and noise below a grid step "
                     "only moves weights off that grid")
    found = findings(results)
    if found:
        lines += ["", "## Findings", ""] + [f"- {f}" for f in found]
    for section in (_md_perplexity, _md_zeroshot, _md_finetune, _md_prune, _md_noise, _md_export, _md_adversarial,
                    _md_analysis,
                    _md_generations, _md_manifest):
        lines += section(results)
    return "\n".join(lines) + "\n"


def findings(results: dict) -> list[str]:
    """Short sentences whose numbers come from ``results``; only for steps that ran."""
    out = []
    ppl = results.get("perplexity", {})
    ft = results.get("finetune") or {}
    if _num(ft.get("heldout_ppl_before")) is not None:
        out.append(f"Fine-tuning ({ft.get('mode')}, {ft.get('steps')} steps) moved held-out perplexity on the training "
                   f"domain from {fmt(ft['heldout_ppl_before'])} to {fmt(ft['heldout_ppl_after'])}.")
    parents = results.get("variants") or {}
    if "base" in ppl and "fine-tuned" in ppl:
        out.append(f"On the evaluation text, the unmodified model has perplexity {fmt(ppl['base'])} and the "
                   f"fine-tuned one {fmt(ppl['fine-tuned'])}.")
    base = ppl.get(parents.get("pruned")) or next((ppl[k] for k in ("fine-tuned", "base") if k in ppl), None)
    pr = results.get("prune")
    if pr and "pruned" in ppl and _num(base):
        out.append(f"{pr['method']} pruning to {fmt(pr['overall_sparsity'])} sparsity ({pr['pattern']}) "
                   f"gives perplexity "
                   f"{fmt(ppl['pruned'])} against {fmt(base)} for its dense parent "
                   f"(x{fmt(_num(ppl['pruned']) / _num(base))}).")
    q = results.get("quantize") or {}
    qbase = ppl.get(parents.get("quantized"))
    if q.get("status") == "ran" and "quantized" in ppl and _num(qbase):
        out.append(f"{q['method'].upper()} quantization ({q['bit_allocation']} bits, {fmt(q['avg_bits'])} bits per "
                   f"weight with scales and zeros) gives perplexity {fmt(ppl['quantized'])} against {fmt(qbase)} "
                   f"for its parent (x{fmt(_num(ppl['quantized']) / _num(qbase))}).")
    nz = results.get("noise")
    if nz and "noisy" in ppl:
        v, sat = nz["variant"], nz["sweep"]["saturation"]
        frac = _num(ppl["noisy"]) / sat if _num(ppl["noisy"]) is not None else float("nan")
        out.append(f"{v['mode'].capitalize()} noise eps={v['epsilon']} on {v['group']} weights gives perplexity "
                   f"{fmt(ppl['noisy'])}, {fmt(100 * frac)}% of the saturation level {int(sat)} "
                   "(a uniform guesser over the vocabulary).")
    if nz:
        d = nz["sweep"]["doubling_eps"]
        out.append(f"Relative noise on the decoder linears doubles perplexity at eps={fmt(d.get('unprotected'))}; "
                   f"keeping the top {_pct(nz['sweep'].get('protect_fraction'))} of weights by "
                   f"{nz['sweep'].get('protect_score', 'w^2 F')} clean "
                   f"moves that to eps={fmt(d.get('protected'))}.")
        if nz.get("top_cells"):
            c = nz["top_cells"][0]
            out.append(f"The most noise-sensitive cell is layer {c['layer']} {c['module']} "
                       f"(+{fmt(c['delta_nll'])} nats/token).")
    zs = results.get("zeroshot") or {}
    for name, parent in (zs.get("parents") or {}).items() if zs.get("status") == "ran" else ():
        a, b = (zs["mean"].get(name) or {}).get("acc"), (zs["mean"].get(parent) or {}).get("acc")
        if _num(a) is not None and _num(b) is not None:
            out.append(f"Zero-shot mean accuracy over {zs['mean'][name]['tasks']} tasks: {name} {100 * a:.1f}% "
                       f"against {100 * b:.1f}% for its parent {parent} ({100 * (a - b):+.1f} points).")
    return out + _findings_attacks_and_analysis(results)


def _findings_attacks_and_analysis(results: dict) -> list[str]:
    out = []
    adv = results.get("adversarial")
    if adv and adv.get("table"):
        top = max(r["eps"] for r in adv["table"])
        row = {r["method"]: r for r in adv["table"] if r["eps"] == top}
        out.append(f"At eps={top} (relative to the mean embedding norm) PGD raises the continuation NLL by "
                   f"{fmt(row['pgd']['delta_nll'])} nats/token, FGSM by {fmt(row['fgsm']['delta_nll'])}; targeted "
                   f"PGD reaches {_esc(repr(adv['targeted']['target']))} "
                   f"on {fmt(100 * adv['targeted']['success_rate'])}% "
                   f"of {adv['targeted']['n']} prompts.")
        at = adv["adversarial_training"]
        if at.get("defence") != "none":
            out.append(f"A {at['steps']}-step adversarial fine-tune ({at.get('defence', 'pgd')}) changes PGD's delta "
                       f"NLL from {fmt(at['delta_nll_before'])} to {fmt(at['delta_nll_after'])} at eps={at['eps']}.")
    an = results.get("analysis")
    if an:
        sws = an.get("super_weights") or []
        if sws:
            s = sws[0]
            out.append(f"Super weight at layer {s['layer']} {s['module'].split('.')[-1]}[{s['row']}, {s['col']}] "
                       f"(value {fmt(s['value'])}): zeroing it alone multiplies perplexity by {fmt(s['ppl_ratio'])}.")
        else:
            out.append("No super weight was found: no MLP down projection's output spiked.")
        q = {(r["bits"], r["variant"].split(" ")[0]): r for r in an.get("quantization", [])}
        for bits in sorted({b for b, _ in q}, reverse=True):
            plain, prot = q.get((bits, "plain")), [r for (b, v), r in q.items() if b == bits and v != "plain"]
            if plain and prot:
                best = min(prot, key=lambda r: _num(r["perplexity"]) if _num(r["perplexity"]) is not None else math.inf)
                out.append(f"{bits}-bit RTN: perplexity {fmt(plain['perplexity'])} plain, {fmt(best['perplexity'])} "
                           f"with {best['variant']} (+{fmt(best['extra_storage_pct'])}% storage).")
    return out


# --------------------------------------------------------------------------- figure helpers


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    path = Path(path)
    # Labels are names from results.json (variants, modules, runs): a "$" in one must stay text,
    # never matplotlib mathtext ("$\\frac{1}{$" would not parse). Ticks drawn later are made
    # inside the context, the texts that already exist are switched off one by one.
    for t in fig.findobj(matplotlib.text.Text):
        t.set_parse_math(False)
    try:
        with plt.rc_context({"text.parse_math": False}), IO.atomic_path(path) as tmp:
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


# --------------------------------------------------------------------------- plots (from saved results only)


def plot_training_curve(result: dict, path) -> Path:
    """Training loss per step, with the held-out loss before/after, from a saved result dict."""
    fig, ax = new_figure(figsize=(6, 3.5))
    losses = result.get("train_losses") or []
    ax.plot(range(1, len(losses) + 1), losses, label="train loss (batch)")
    for key, style in (("heldout_loss_before", "--"), ("heldout_loss_after", "-.")):
        v = result.get(key)
        if isinstance(v, (int, float)):
            ax.axhline(v, ls=style, color="gray", label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"fine-tuning ({result.get('mode', '?')})")
    ax.legend()
    return save_figure(fig, path)


def plot_sparsity_per_layer(result: dict, path):
    """Achieved sparsity per block (bars), the target, and a non-uniform allocation's per-layer target."""
    fig, ax = new_figure(figsize=(6, 3))
    per = result.get("layer_sparsity") or result["per_layer"]
    layers = sorted(per, key=int)
    ax.bar([int(k) for k in layers], [per[k] for k in layers])
    ax.axhline(result["target_sparsity"], color="red", ls="--", label="target")
    alloc = result.get("allocation") or {}
    if alloc.get("mode") not in (None, "uniform") and alloc.get("target"):
        ax.plot([int(k) for k in layers], [alloc["target"].get(k) for k in layers], "k.-",
                label=f"{alloc['mode']} allocation")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity")
    ax.set_title(f"{result['method']} {result['pattern']}")
    ax.legend()
    return save_figure(fig, path)


def plot_bits_per_layer(result: dict, path):
    """Mean code bits per block of the quantized variant, and the average."""
    fig, ax = new_figure(figsize=(6, 3))
    per = result["layer_bits"]
    layers = sorted(per, key=int)
    ax.bar([int(k) for k in layers], [per[k] for k in layers])
    ax.axhline(result["avg_code_bits"], color="red", ls="--", label="average code bits")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("bits per weight")
    ax.set_title(f"{result['method']} g{result['group']}, {result['bit_allocation']} bits")
    ax.legend()
    return save_figure(fig, path)


def plot_perplexity_vs_sparsity(sweep: dict, path, dense: Optional[float] = None):
    """``sweep``: {method: {sparsity: perplexity}} from saved results."""
    fig, ax = new_figure(figsize=(6, 4))
    for method, pts in sweep.items():
        xs = sorted(pts, key=float)
        ys = [pts[x] if isinstance(pts[x], (int, float)) else float("nan") for x in xs]
        ax.plot([float(x) for x in xs], ys, marker="o", label=method)
    if dense:
        ax.axhline(dense, color="gray", ls=":", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("perplexity")
    ax.legend()
    return save_figure(fig, path)


def plot_sweep(sweep: dict, path):
    """Perplexity against eps (mean with min-max band), saturation level marked."""
    fig, ax = new_figure(figsize=(6, 4))
    for tag, summ in sweep["summary"].items():
        s = summ["perplexity"]
        xs = sorted(s, key=float)
        mean = [_float(s[x]["mean"]) for x in xs]
        ax.plot([float(x) for x in xs], mean, marker="o", label=tag)
        ax.fill_between([float(x) for x in xs], [_float(s[x]["min"]) for x in xs], [_float(s[x]["max"]) for x in xs],
                        alpha=0.2)
    ax.axhline(_float(sweep["clean"]["perplexity"]), color="gray", ls=":", label="clean")
    ax.axhline(sweep["saturation"], color="red", ls="--", label=f"saturation (vocab {int(sweep['saturation'])})")
    ax.set_yscale("log")
    log_x_axis(ax, [x for summ in sweep["summary"].values() for x in summ["perplexity"]])
    ax.set_xlabel(f"epsilon ({sweep['mode']} noise, {sweep['group']})")
    ax.set_ylabel("perplexity")
    ax.legend()
    return save_figure(fig, path)


def plot_sensitivity_map(smap: dict, path):
    fig, ax = new_figure(figsize=(1.0 + 0.8 * len(smap["modules"]), 1.0 + 0.22 * len(smap["layers"])))
    data = np.array([[_float(v) for v in row] for row in smap["delta_nll"]])
    im = ax.imshow(data, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(smap["modules"])), smap["modules"], rotation=45, ha="right")
    ax.set_ylabel("layer")
    ax.set_title(f"NLL increase, relative noise eps={smap['epsilon']}")
    fig.colorbar(im, ax=ax, label="delta NLL (nats/token)")
    return save_figure(fig, path)


def plot_attack_sweep(result: dict, path):
    fig, ax = new_figure(figsize=(6, 4))
    for method in ("fgsm", "pgd"):
        rows = sorted((r for r in result["table"] if r["method"] == method), key=lambda r: r["eps"])
        ax.plot([r["eps"] for r in rows], [r["delta_nll"] for r in rows], marker="o", label=method.upper())
    log_x_axis(ax, [r["eps"] for r in result["table"]])
    ax.set_xlabel(f"eps (relative to mean embedding norm, {result['norm']})")
    ax.set_ylabel("delta NLL (nats/token)")
    ax.legend()
    return save_figure(fig, path)


def layer_module_grid(result: dict, key: str) -> tuple[list, list, list]:
    """(layers, module types, grid[layer][type]) of a per-module quantity from saved results."""
    types = sorted(set(result["module_type"].values()))
    n_layers = max(result["module_layer"].values()) + 1
    grid = [[float("nan")] * len(types) for _ in range(n_layers)]
    for n, v in result[key].items():
        grid[result["module_layer"][n]][types.index(result["module_type"][n])] = float(v)
    return list(range(n_layers)), types, grid


def plot_heatmaps(result: dict, path, noise_map: Optional[dict] = None):
    """Layer x module heatmaps of Hessian trace, Fisher, and (if given) the noise NLL increase."""
    panels = [("hessian_trace", "Hessian trace"), ("fisher_sum", "Fisher (sum)")]
    grids = [layer_module_grid(result, k) for k, _ in panels]
    titles = [t for _, t in panels]
    if noise_map:
        grids.append((noise_map["layers"], noise_map["modules"], noise_map["delta_nll"]))
        titles.append("noise delta NLL")
    fig, axes = new_figure(1, len(grids), figsize=(4.2 * len(grids), 1.5 + 0.2 * len(grids[0][0])))
    axes = np.atleast_1d(axes)
    for k, (ax, (layers, types, grid), title) in enumerate(zip(axes, grids, titles)):
        data = np.array([[float(v) for v in row] for row in grid])
        if k == 0:  # Hutchinson traces can be negative and noisy: signed scale, unreliable cells crossed
            lim = np.nanmax(np.abs(data)) or 1.0
            im = ax.imshow(data, aspect="auto", cmap="RdBu_r",
                           norm=SymLogNorm(linthresh=lim * 1e-3, vmin=-lim, vmax=lim))
            ok = result.get("hessian_module_reliable") or {}
            _, _, okgrid = layer_module_grid({**result, "ok": {n: float(v) for n, v in ok.items()}}, "ok")
            for i, row in enumerate(okgrid if ok else []):
                for j, v in enumerate(row):
                    if v == 0.0:
                        ax.text(j, i, "x", ha="center", va="center", fontsize=7, color="0.3")
            ax.set_title(f"{title} (x: stderr above target)")
        else:
            im = ax.imshow(np.log10(np.abs(data) + 1e-12), aspect="auto", cmap="viridis")
            ax.set_title(f"log10 |{title}|")
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    return save_figure(fig, path)


def plot_activation_profile(profile: dict, path, super_layers: Sequence[int] = ()):
    fig, ax = new_figure(figsize=(6, 3.5))
    for key, label in (("down_in_max", "down_proj input"), ("down_out_max", "down_proj output"),
                       ("residual_max", "residual stream")):
        if key in profile:
            ax.plot(profile[key], marker=".", label=label)
    for layer in super_layers:
        ax.axvline(layer, color="red", ls=":", alpha=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("max |activation|")
    ax.legend()
    return save_figure(fig, path)


def make_plots(results: dict, out: Path) -> dict:
    """(Re)draw every plot that the saved results support; returns {name: path relative to out}."""
    out = Path(out)
    plots = {}
    d = out / "plots"

    def add(name, fn, *args):
        plots[name] = str(fn(*args).relative_to(out))

    if results.get("finetune", {}).get("train_losses"):
        add("finetune", plot_training_curve, results["finetune"], d / "finetune_loss.png")
    if results.get("prune"):
        add("prune", plot_sparsity_per_layer, results["prune"], d / "prune_sparsity_per_layer.png")
    if (results.get("quantize") or {}).get("layer_bits"):
        add("quantize", plot_bits_per_layer, results["quantize"], d / "quantize_bits_per_layer.png")
    if results.get("noise"):
        add("noise_sweep", plot_sweep, results["noise"]["sweep"], d / "noise_sweep.png")
        if results["noise"].get("map"):
            add("noise_map", plot_sensitivity_map, results["noise"]["map"], d / "noise_map.png")
    if results.get("adversarial"):
        add("attack_sweep", plot_attack_sweep, results["adversarial"], d / "attack_sweep.png")
    if results.get("analysis"):
        an = results["analysis"]
        add("sensitivity_heatmaps", plot_heatmaps, an, d / "sensitivity_heatmaps.png",
            (results.get("noise") or {}).get("map"))
        add("activations", plot_activation_profile, an["activation_profile"], d / "activations.png",
            an.get("super_weight_layers", []))
    return plots


def markdown_to_html(md: str, base: Path) -> str:
    """report.md -> a self-contained HTML page (Python-Markdown, tables extension); every
    image is inlined as a data URI, a missing one is named in the page."""
    conv = markdown.Markdown(extensions=["tables"], output_format="html")
    # Model outputs (generations, GCG suffixes) land in the report: raw HTML in them is shown
    # as text, never interpreted.
    conv.preprocessors.deregister("html_block")
    conv.inlinePatterns.deregister("html")
    # No text becomes a link, whatever its scheme ([x](javascript:...), <http://...>, [x][ref]):
    # the only reference a page holds is an embedded plots/*.png (``inline`` below).
    for pattern in ("link", "reference", "short_reference", "autolink", "automail", "image_reference",
                    "short_image_ref"):
        if pattern in conv.inlinePatterns:
            conv.inlinePatterns.deregister(pattern)
    conv.parser.blockprocessors.deregister("reference")
    body = conv.convert(md)

    plots = (Path(base) / "plots").resolve()

    def inline(m: re.Match) -> str:
        # Only the run's own plot files are embedded: never a path from a prompt, output or field.
        p = (Path(base) / html.unescape(m.group(2))).resolve()
        if p.parent != plots or p.suffix != ".png":
            return f"<i>missing plot {html.escape(m.group(2))} (only plots/*.png are embedded)</i>"
        if not p.is_file():
            return f"<i>missing plot {m.group(2)}</i>"
        return f'<img alt="{m.group(1)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"'

    body = re.sub(r'<img alt="([^"]*)" src="([^"]+)"', inline, body)
    body = re.sub(r"<i>missing plot ([^<]*)</i>\s*/?>", r"<i>missing plot \1</i>", body)
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
             "th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 3px}")
    # The script lets a headless browser check that every image decoded (data-images-ok).
    script = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
              "document.body.dataset.imagesOk=im.every(i=>i.complete&&i.naturalWidth>0);"
              "document.body.dataset.images=im.length;});</script>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>LLM sensitivity report</title>"
            f"<style>{style}</style>{script}</head><body>\n{body}\n</body></html>\n")


def write_report(results: dict, out: Path) -> tuple[Path, Path]:
    """Write report.md and the self-contained report.html into ``out``."""
    out = Path(out)
    md = report_markdown(results)
    IO.write_text(out / "report.md", md)
    IO.write_text(out / "report.html", markdown_to_html(md, out))
    return out / "report.md", out / "report.html"


def read_results(out: Path) -> dict:
    """``<out>/results.json``, or {} when there is none. A file that is not JSON, or not shaped
    like our results (an object whose sections are objects), is moved aside with a warning
    and never trusted."""
    path = Path(out) / "results.json"
    if not path.is_file():
        return {}
    try:
        res = IO.read_json(path)
        ok = isinstance(res, dict) and all(isinstance(res.get(k, {}), dict) for k in (
            "steps_done", "finetune", "prune", "noise", "adversarial", "analysis", "perplexity", "evaluation",
            "protocol", "variants", "dataset", "manifest"))
    except (OSError, ValueError):
        ok = False
    if not ok:
        aside = path.with_name(f"results.json.unreadable-{int(time.time())}")
        os.replace(path, aside)
        log.warning("%s is not a results file of this tool; moved aside to %s, starting afresh", path, aside.name)
        return {}
    return res


def rebuild_report(out: Path) -> dict:
    """Redraw every plot and rewrite report.md/.html from ``<out>/results.json`` alone."""
    results = read_results(out)
    if not results:
        raise C.UserError(f"--report-only: no readable results.json in {out}")
    try:
        results["plots"] = make_plots(results, out)
        write_report(results, out)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError) as e:
        raise C.UserError(f"--report-only: {out / 'results.json'} has an unexpected shape "
                          f"({C.error_line(e, 120)})")
    IO.write_json(Path(out) / "results.json", results)
    return results


# --------------------------------------------------------------------------- comparing runs


def _finished_run(d: Path) -> dict:
    """A finished run's results.json, read without touching its directory: a regular file of
    bounded size only (a FIFO or a link to /dev/zero is refused, never waited on or read)."""
    try:
        res = IO.read_json(Path(d) / "results.json")
    except (OSError, ValueError):
        res = None
    if not isinstance(res, dict) or not field(res, "perplexity", kind=dict):
        raise C.UserError(f"--compare: {d} holds no finished evaluation (a regular results.json with perplexities)")
    return res


def short_names(paths: Sequence) -> list[str]:
    """The shortest path suffixes that tell the runs apart (exp1/data, exp2/data), for labels."""
    parts = [Path(str(p)).parts or (str(p),) for p in paths]
    for k in range(1, max(map(len, parts), default=1) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{n} #{i + 1}" for i, n in enumerate(map(str, paths))]  # the same folder named twice


def compare_runs(dirs: Sequence, out: Path) -> dict:
    """One table and one plot across finished runs, from their results.json alone: per run the
    model, the pruning and the noise, and every variant's perplexity with its ratio to the
    variant's parent. Writes ``<out>/compare.md``, ``compare.html`` and ``plots/compare.png``.
    Another run's file is read through ``field`` and ``_text``: a missing or wrongly typed field
    shows as "-", and no text of it becomes a link, an image or HTML."""
    out = Path(out)
    rows = []
    for d, label in zip(dirs, short_names(dirs)):
        res = _finished_run(Path(d))
        pr, nz = field(res, "prune", kind=dict), field(res, "noise", "variant", kind=dict)
        qz = field(res, "quantize", kind=dict, default={})
        means = field(res, "zeroshot", "mean", kind=dict, default={})
        rows.append({"run": str(d), "label": label, "model": field(res, "model", default="?"),
                     "pruning": " ".join(_text(field(pr, k)) for k in ("method", "pattern", "overall_sparsity"))
                     if pr else "-",
                     "noise": f"{_text(field(nz, 'mode'))} eps={_text(field(nz, 'epsilon'))}" if nz else "-",
                     "quantization": " ".join(_text(field(qz, k)) for k in ("method", "bit_allocation", "avg_bits"))
                     if field(qz, "status") == "ran" else "-",
                     "perplexity": {str(k): _num(v) for k, v in res["perplexity"].items()},
                     "parents": {str(k): v for k, v in field(res, "variants", kind=dict, default={}).items()
                                 if isinstance(v, str)},
                     "zeroshot": {str(v): _num(field(m, "acc")) for v, m in means.items()}})
    variants = list(dict.fromkeys(v for r in rows for v in r["perplexity"]))
    lines = ["# Comparison of runs", "", "Perplexity of each variant; in brackets, its ratio to its parent "
             "variant in the same run.", "",
             "| run | model | pruning | noise | quantization | " + " | ".join(map(_esc, variants)) + " |",
             "|---" * (5 + len(variants)) + "|"]
    for r in rows:
        cells = []
        for v in variants:
            p, q = r["perplexity"].get(v), r["perplexity"].get(r["parents"].get(v))
            cells.append(fmt(p) + (f" (x{fmt(p / q)})" if p is not None and q else ""))
        lines.append(f"| {_esc(r['run'])} | {_text(r['model'])} | {r['pruning']} | {r['noise']} | {r['quantization']} | "
                     + " | ".join(cells) + " |")
    if any(r["zeroshot"] for r in rows):
        lines += ["", "Zero-shot mean accuracy (%) of each variant, over the tasks each run evaluated; in brackets, "
                  "the change against its parent.", "", "| run | " + " | ".join(map(_esc, variants)) + " |",
                  "|---" * (1 + len(variants)) + "|"]
        for r in rows:
            cells = []
            for v in variants:
                a, b = r["zeroshot"].get(v), r["zeroshot"].get(r["parents"].get(v))
                cells.append("-" if a is None
                             else f"{100 * a:.1f}" + (f" ({100 * (a - b):+.1f})" if b is not None else ""))
            lines.append(f"| {_esc(r['run'])} | " + " | ".join(cells) + " |")
    lines += ["", "![comparison](plots/compare.png)"]
    plot = plot_comparison(rows, variants, out / "plots" / "compare.png")
    md = "\n".join(lines) + "\n"
    IO.write_text(out / "compare.md", md)
    IO.write_text(out / "compare.html", markdown_to_html(md, out))
    return {"compare": rows, "plots": {"compare": str(plot.relative_to(out))}}


def plot_comparison(rows: list, variants: list, path) -> Path:
    """Grouped bars, one bar per run: perplexity (log scale) of each variant and, where runs
    measured it, zero-shot mean accuracy beside it."""
    panels = [("perplexity", "perplexity", True)] + ([("zeroshot", "zero-shot mean acc", False)]
                                                      if any(r.get("zeroshot") for r in rows) else [])
    w = max(5.0, 1.2 * len(variants) * max(1, len(rows)) / 2)
    fig, axes = new_figure(1, len(panels), figsize=(w * len(panels), 3.5), squeeze=False)
    width = 0.8 / max(len(rows), 1)
    for ax, (key, label, log_scale) in zip(axes[0], panels):
        for k, r in enumerate(rows):
            ys = [_float((r.get(key) or {}).get(v)) for v in variants]
            ax.bar([i + k * width for i in range(len(variants))], ys, width, label=r.get("label") or r["run"])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(variants))], variants)
        if log_scale:
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    return save_figure(fig, path)
