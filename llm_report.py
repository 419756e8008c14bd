"""The report, rebuilt from ``results.json`` alone (``--report-only``).

``write_report`` writes ``report.md`` and a self-contained ``report.html`` (plots embedded as
data URIs) whose findings are filled in from the numbers in ``results.json``. Figures are
drawn by ``llm_plots``; every reading of a results.json goes through ``llm_results``.
"""
from __future__ import annotations

import base64
import html
import math
import logging
import re
from pathlib import Path
from typing import Optional

import markdown

import llm_common as C
import llm_io as IO
import llm_matrix as M
import llm_report_compress as RC
import llm_report_labels as L
import llm_report_safety as RSF
import llm_report_stats as RS
import llm_results as R
import llm_tables as T
from llm_plots import make_plots

log = logging.getLogger("llm.report")


def _section(title: str, sentence: str, figure: Optional[str] = None, alt: Optional[str] = None) -> list[str]:
    """A section's heading and opening sentence, then its figure ``plots/<figure>`` when it has one."""
    return ["", f"## {title}", "", sentence] + (["", f"![{alt}](plots/{figure})"] if figure else [])


def _md_perplexity(results: dict) -> list[str]:
    """Every variant against its parent."""
    lines: list[str] = []
    lines += ["", "## Perplexity", "",
              "Each variant against the variant it was derived from (its parent); KL (nats/token, mean and p99 "
              "over tokens) and top-1 agreement against the parent and against the base (with --kl). "
              + RS.perplexity_note(results), "",
              "| variant | what it is | perplexity [95%] | x parent [95%] | nll (nats) | bits/byte | tokens | KL (p99) | "
              "top-1 agree | KL to base (p99) | top-1 base |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    parents, ppl = results.get("variants") or {}, results.get("perplexity", {})
    for name, ev in results.get("evaluation", {}).items():
        parent = parents.get(name)
        ratio = R.ratio(ev["perplexity"], ppl.get(parent))
        lines.append(f"| {R.esc(name)} | {R.text(R.describe_variant(results, name))} | "
                     f"{RS.perplexity_cell(results, name)} | {RS.ratio_cell(results, name, ratio)} | "
                     f"{R.fmt(ev['nll'])} | "
                     f"{R.fmt(ev['bits_per_byte'])} | {ev['tokens_scored']} | {_kl(ev)} | "
                     f"{R.fmt(ev.get('top1_agreement'))} | {_kl(ev.get('vs_base'))} | "
                     f"{R.fmt(R.field(ev, 'vs_base', 'top1_agreement'))} |")
    return lines


def _kl(rec) -> str:
    """"0.0123 (0.456)": a mean KL and its p99 over tokens, or "-"."""
    kl = R.num(R.field(rec, "kl"))
    return "-" if kl is None else f"{R.fmt(kl)} ({R.fmt(R.num(R.field(rec, 'kl_percentiles', 'p99')))})"


def _md_finetune(results: dict) -> list[str]:
    """The fine-tune's held-out perplexity before and after."""
    lines: list[str] = []
    ft = results.get("finetune")
    if ft and ft.get("heldout_loss_before") is not None:
        held = ft.get("heldout_token_set") or "the held-out tail of the training text"
        lines += _section("Fine-tuning",
                          f"{ft['mode']} fine-tune, {ft['steps']} steps "
                          f"({'loaded from disk' if ft['loaded_existing'] else 'trained'}): held-out "
                          f"perplexity {R.fmt(ft['heldout_ppl_before'])} -> {R.fmt(ft['heldout_ppl_after'])} "
                          f"(on {held}).", "finetune_loss.png", "fine-tuning curve")
    return lines


def _md_prune(results: dict) -> list[str]:
    """Achieved sparsity and calibration."""
    lines: list[str] = []
    pr = results.get("prune")
    if pr and pr.get("grid"):
        lines += RC.md_prune_grid(results)
    elif pr:
        lines += _section("Pruning",
                          f"{R.text(pr['method'])} {R.text(pr['pattern'])}: achieved sparsity "
                          f"{R.fmt(pr['overall_sparsity'])} (target {R.fmt(pr['target_sparsity'])}) in "
                          f"{R.fmt(pr['seconds'])} s, calibrated on {pr['calibration']['windows']} windows "
                          f"of {pr['calibration']['seq_len']} tokens.",
                          "prune_sparsity_per_layer.png", "sparsity per layer")
        alloc = pr.get("allocation") or {}
        if alloc.get("mode") not in (None, "uniform"):
            lines += ["", f"Layer-wise allocation {R.text(alloc['mode'])} "
                          f"(lambda {R.fmt(alloc.get('lambda'))}"
                      + (f", M {R.fmt(alloc.get('owl_m'))}" if alloc["mode"] == "owl" else "") + "): "
                      f"{pr.get('pruned_weights')} of {pr.get('total_weights')} weights pruned."]
    q = results.get("quantize")
    if q and q.get("status") == "ran" and not q.get("grid"):
        lines += _section("Quantization",
                          f"{R.text(q['method'])} g{q['group']}, {R.quant_bits_words(q)}: "
                          f"{R.fmt(q['avg_code_bits'])} code bits per weight, {R.fmt(q['avg_bits'])} as the "
                          f"papers count them (scales, zeros and {q['kept_weights']} weights kept in full "
                          f"precision), in {R.fmt(q['seconds'])} s.",
                          "quantize_bits_per_layer.png", "bits per layer")
    return lines


def _md_noise(results: dict) -> list[str]:
    """The noisy variant, the eps sweep and the map."""
    lines: list[str] = []
    nz = results.get("noise")
    if nz:
        v, sw = nz["variant"], nz["sweep"]
        lines += ["", "## Weight noise", "",
                  f"Noisy variant: {R.text(v['mode'])} noise, eps={R.text(v['epsilon'])}, group "
                  f"{R.text(v['group'])} ({v['n_weights']} weights). Saturation (uniform guesser) = "
                  f"{R.fmt(sw['saturation'])}.", "",
                  *(["Noisy variants (one per eps): " + ", ".join(R.esc(n) for n, _ in R.variant_records(
                      results, "noise", "noisy")) + ".", ""] if nz.get("grid") else []),
                  f"The sweep is scored on {sw['clean'].get('token_set', 'a subset of the evaluation text')} "
                  f"(clean perplexity {R.fmt(sw['clean']['perplexity'])}).", "",
                  f"Sweep ({sw['mode']} noise on decoder linears, {len(sw['points'])} points): "
                  f"perplexity {L.doubling(sw, 'unprotected')} without protection, and "
                  f"{L.doubling(sw, 'protected')} with the top {R.pct(sw.get('protect_fraction'))} of "
                  "weights by "
                  f"{sw.get('protect_score', 'w^2 F')} kept clean.", "",
                  "| eps | ppl (mean) | ppl protected | KL | top-1 |", "|---|---|---|---|---|"]
        up = sw["summary"]["unprotected"]
        pr_ = sw["summary"].get("protected", {}).get("perplexity", {})
        for e in sorted(up["perplexity"], key=float):
            lines.append(f"| {e} | {R.fmt(up['perplexity'][e]['mean'])} | "
                         f"{R.fmt(pr_.get(e, {}).get('mean'))} | {R.fmt(up['kl'][e]['mean'])} | "
                         f"{R.fmt(up['top1'][e]['mean'])} |")
        lines += ["", "![noise sweep](plots/noise_sweep.png)"]
        if nz.get("top_cells"):
            lines += ["", "Most noise-sensitive cells: " + ", ".join(
                f"layer {c['layer']} {c['module']} (+{R.fmt(c['delta_nll'])} nats)" for c in nz["top_cells"]),
                "", "![noise map](plots/noise_map.png)"]
    return lines


def _acc(m: Optional[dict], key: str = "acc") -> str:
    """An accuracy in percent with its standard error, from an lm-eval metrics dict."""
    if not m or R.num(m.get(key)) is None:
        return "-"
    se = R.num(m.get(f"{key}_stderr"))
    return f"{100 * m[key]:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def _md_zeroshot(results: dict) -> list[str]:
    """Zero-shot accuracy per variant and task, and the change of the mean against the parent."""
    zs = results.get("zeroshot")
    if not zs or zs.get("status") == "off":
        return []
    lines = ["", "## Zero-shot accuracy (lm-evaluation-harness)", ""]
    if zs.get("status") != "ran":
        return lines + [f"> **Not measured:** {R.esc(zs.get('reason'))}"] + \
            [f"> - {R.esc(t)}: {R.esc(why)}" for t, why in (zs.get("unavailable") or {}).items()]
    pr = zs["protocol"]
    lines.append(f"lm-eval {pr.get('lm_eval')}, {pr.get('num_fewshot')}-shot, "
                 "accuracy in % ± standard error; "
                 + (f"**at most the first {pr['limit']} examples per task** (a CPU budget, not the papers' "
                    "protocol)" if pr.get("limit") else "every example")
                 + ". The mean is unweighted over tasks, as in the papers. " + RS.zeroshot_note(results))
    if zs.get("unavailable"):
        lines += ["",
                  "> **Tasks not evaluated** (their data could not be had; the mean leaves them out):"] + \
            [f"> - {R.esc(t)}: {R.esc(why)}" for t, why in zs["unavailable"].items()]
    tasks, parents = pr.get("tasks", []), zs.get("parents") or {}
    lines += ["", "| variant | parent | " + " | ".join(R.esc(t) for t in tasks)
              + " | mean acc | change vs parent | paired (pooled) | mean acc_norm |", "|---" * (len(tasks) + 6) + "|"]
    for name, per_task in zs["tasks"].items():
        mean, parent = zs["mean"][name], parents.get(name)
        p = (zs["mean"].get(parent) or {}).get("acc")
        change = (f"{100 * (mean['acc'] - p):+.1f}"
                  if R.num(p) is not None and R.num(mean.get("acc")) is not None else "-")
        lines.append(f"| {R.esc(name)} | {R.text(parent)} | "
                     + " | ".join(_acc(per_task.get(t)) + RS.task_mark(results, name, t) for t in tasks)
                     + f" | {_acc(mean)} | {change} | {RS.pooled_cell(results, name)} | {_acc(mean, 'acc_norm')} |")
    return lines


def _md_export(results: dict) -> list[str]:
    """Where each exported variant lies, and the measured 2:4 speed-up."""
    ex = results.get("export")
    if not ex or ex.get("status") != "ran":
        return []
    lines = ["", "## Exports", "",
             "Each directory loads with `AutoModelForCausalLM.from_pretrained` and holds a model card "
             "(README.md).", ""]
    lines += [f"- {name}: `{R.esc(v['path'])}`, {v['bytes'] / 2 ** 20:.1f} MiB, "
              f"{R.pct(round(v['zero_fraction_linears'], 4))} zeros in the decoder linears"
              for name, v in ex["variants"].items()]
    tf = ex.get("two_of_four") or {}
    if tf.get("status") == "ran":
        lines += ["", f"2:4 semi-structured sparse ({tf['linears']} linears of the {tf['variant']} variant, "
                      f"{R.esc(tf['device'])}, {tf['seq_len']} tokens per sequence; max logit change "
                      f"{R.fmt(tf['max_abs_logit_diff'])}):", "",
                  "| batch | dense tokens/s | 2:4 tokens/s | speed-up |", "|---|---|---|---|"]
        lines += [f"| {b} | {R.fmt(r['dense'])} | {R.fmt(r['2:4'])} | {R.fmt(r['speedup'])} |"
                  for b, r in tf["tokens_per_s"].items()]
    elif tf:
        lines += ["", f"2:4 speed-up not measured: {R.esc(tf.get('reason'))}."]
    return lines


def _md_adversarial(results: dict) -> list[str]:
    """Attack table, targeted success, GCG and the defences."""
    lines: list[str] = []
    adv = results.get("adversarial")
    if adv:
        lines += ["", "## Adversarial robustness (input embeddings)", "",
                  f"eps is relative to the mean embedding-row norm ({R.fmt(adv['embedding_row_norm'])}), "
                  f"{adv['norm']} ball, {adv['n_samples']} prompts.", "",
                  "| method | eps | clean NLL | attacked NLL | delta NLL | top-1 agreement |",
                  "|---|---|---|---|---|---|"]
        for r in adv["table"]:
            lines.append(f"| {r['method']} | {r['eps']} | {R.fmt(r['clean_nll'])} | "
                         f"{R.fmt(r['attacked_nll'])} | {R.fmt(r['delta_nll'])} | "
                         f"{R.fmt(r['top1_agreement'])} |")
        t, gcg, pf, at = adv["targeted"], adv["gcg"], adv["perplexity_filter"], adv["adversarial_training"]
        lines += ["", f"Targeted PGD (target {R.esc(repr(t['target']))}, eps {t['eps']}): "
                      f"success rate {R.fmt(t['success_rate'])} over {t['n']} prompts.",
                  f"GCG suffix {R.esc(repr(gcg['suffix_text']))}: target loss {R.fmt(gcg['initial_loss'])} "
                  f"-> {R.fmt(gcg['final_loss'])}, success {gcg['success']}.",
                  f"Perplexity filter ({pf.get('scored', '')}; threshold {R.fmt(pf['threshold'])} from "
                  f"{pf.get('calibration_prompts')} calibration prompts): false-positive rate "
                  f"{R.fmt(pf['false_positive_rate'])} on {pf.get('heldout_prompts')} held-out clean "
                  f"prompts, true-positive rate {R.fmt(pf.get('true_positive_rate'))} on "
                  f"{pf.get('attacked_prompts')} prompts with the GCG suffix; windowed "
                  f"({(pf.get('windowed') or {}).get('window')} tokens): FPR "
                  f"{R.fmt((pf.get('windowed') or {}).get('false_positive_rate'))}, TPR "
                  f"{R.fmt((pf.get('windowed') or {}).get('true_positive_rate'))}.",
                  L.defence_line(at), ""]
        for prompt, ans in adv["answers"].items():
            lines.append(f"- *{R.esc(prompt)}* clean: {R.esc(ans['clean'])}  \n  under PGD eps={ans['eps']}: "
                         f"{R.esc(ans['attacked'])}")
        lines += ["", "![attack sweep](plots/attack_sweep.png)"]
    return lines


def _md_analysis(results: dict) -> list[str]:
    """Hessian, saliency, super weights and quantization."""
    lines: list[str] = []
    an = results.get("analysis")
    if an:
        lines += ["", "## Sensitivity analysis", "",
                  "Hessian trace over decoder linears "
                  f"{R.fmt(an['hessian_total'])} ± {R.fmt(an['hessian_total_stderr'])} "
                  f"({an['hutchinson_probes']} Hutchinson probes; every layer within "
                  f"{R.pct((an.get('config') or {}).get('rel_stderr'))} standard error: "
                  f"{an.get('hessian_converged')}); top eigenvalue {R.fmt(an['top_eigenvalue'])}.",
                  f"Layers by Hessian trace, tied where the 95% intervals overlap: {_ranking(an)}; by "
                  f"Fisher: {an['top_layers']['fisher_sum']}; super-weight layers: "
                  f"{an['super_weight_layers']}.",
                  "Rank correlations: " + ", ".join(f"{k} {R.fmt(v)}"
                                                    for k, v in an["rank_correlation"].items()),
                  "", "| layer | Hessian trace | 95% interval | per weight | within target |",
                  "|---|---|---|---|---|",
                  *[f"| {i} | {R.fmt(m)} | [{R.fmt(lo)}, {R.fmt(hi)}] | {R.fmt(per)} | {ok} |"
                    for i, (m, (lo, hi), per, ok) in enumerate(zip(
                        an.get("hessian_layer_trace", []), an.get("hessian_layer_ci95", []),
                        an.get("hessian_layer_per_param", []), an.get("hessian_layer_reliable", [])))], "",
                  f"Massive-activation channel of the residual stream: "
                  f"{R.fmt(an.get('activation_profile', {}).get('massive_channel'))}.", "",
                  "Most salient weights (OBD 0.5 H_ii w^2): " + "; ".join(
                      f"{t['module']}[{t['row']}, {t['col']}] = {R.fmt(t['value'])} ({R.fmt(t['saliency'])})"
                      for t in an.get("top_salient", [])[:5]), "",
                  *(["| layer | module | row | col | value | \\|in\\| | \\|out\\| | ppl ratio zeroed |",
                     "|---|---|---|---|---|---|---|---|"] if an["super_weights"]
                    else [L.no_super_weight(an)])]
        for sw in an["super_weights"]:
            lines.append(f"| {sw['layer']} | {sw['module']} | {sw['row']} | {sw['col']} | "
                         f"{R.fmt(sw['value'])} | {R.fmt(sw['input_abs'])} | {R.fmt(sw['output_abs'])} | "
                         f"{R.fmt(sw['ppl_ratio'])} |")
        ratio = (an.get("config") or {}).get("super_weight_min_ratio")
        rejected = an.get("super_weights_rejected") or []
        lines += ["", f"Accepted: candidates whose ablation multiplies perplexity by at least "
                      f"{R.fmt(ratio)}. Rejected candidates (output spikes whose ablation does not hurt): "
                      + (", ".join(
                          f"layer {sw['layer']} [{sw['row']}, {sw['col']}] (x{R.fmt(sw['ppl_ratio'])})"
                          for sw in rejected) or "none") + "."]
        lines += ["", f"Quantization (RTN; clean perplexity {R.fmt(an['clean_perplexity'])} on "
                      f"{an.get('clean_token_set', 'a subset of the evaluation text')}):", "",
                  "| bits | variant | perplexity | kept weights | extra storage % |", "|---|---|---|---|---|"]
        for q in an["quantization"]:
            lines.append(f"| {q['bits']} | {q['variant']} | {R.fmt(q['perplexity'])} | {q['kept_weights']} | "
                         f"{R.fmt(q['extra_storage_pct'])} |")
        lines += ["", "![heatmaps](plots/sensitivity_heatmaps.png)", "",
                  "![activations](plots/activations.png)"]
    return lines


def _ranking(an: dict) -> str:
    """"3 > {5, 7} > 1 ...": the first five groups of the interval ranking."""
    groups = an.get("hessian_ranking") or [[i] for i in an["top_layers"]["hessian_trace"]]
    return " > ".join(str(g[0]) if len(g) == 1 else "{" + ", ".join(map(str, g)) + "}" for g in groups[:5])


def _md_generations(results: dict) -> list[str]:
    """Greedy answers of every variant."""
    lines: list[str] = []
    for name, ev in results.get("evaluation", {}).items():
        for prompt, answer in ev.get("generations", {}).items():
            lines.append(f"- **{name}** — *{R.esc(prompt)}*  \n  {R.esc(answer)}")
    return ["", "## Sample generations", ""] + lines if lines else []  # none under --max-new-tokens 0


def _md_manifest(results: dict) -> list[str]:
    """Command, versions, and wall time and memory per step."""
    lines: list[str] = []
    m = results.get("manifest", {})
    if m:
        lines += ["", "## Run manifest", "", f"- command: {R.text(m.get('command'))}",
                  f"- git commit: {m.get('git_commit')}",
                  "- versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()), "",
                  *([f"- peak resident memory of the process (max RSS, as the OS reports it): "
                     f"{R.fmt(m['peak_rss_mib'])} MiB = {R.fmt(m['peak_rss_mib'] * 2 ** 20 / 1e9)} GB", ""]
                    if isinstance(m.get("peak_rss_mib"), (int, float)) else []),
                  "| step | wall time (s) | peak RSS so far (MiB) | peak CUDA allocated in the step (MiB) | "
                  "skipped (resumed) |", "|---|---|---|---|---|"]
        for step, st in m.get("steps", {}).items():  # an older results.json: one peak_memory_mb, as it was
            lines.append(f"| {step} | {R.fmt(st.get('wall_s'))} | {R.fmt(st.get('peak_rss_mib', st.get('peak_memory_mb')))} | "
                         f"{R.fmt(st.get('peak_cuda_allocated_mib'))} | {st.get('skipped', False)} |")
    return lines


def summary_table(results: dict) -> str:
    """The compact plain-text table a run prints at its end: every variant with its parent,
    perplexity, ratio to the parent and zero-shot mean accuracy, then how they were measured."""
    parents, ppl = (R.field(results, "variants", kind=dict, default={}),
                    R.field(results, "perplexity", kind=dict, default={}))
    means = R.field(results, "zeroshot", "mean", kind=dict, default={})
    matrix = R.field(results, "robustness", kind=dict) or M.robustness_matrix(results)
    extra = [k for k in M.HEADLINE if k in R.field(matrix, "measures", kind=dict, default={})]
    rows = [("variant", "parent", "perplexity", "95% interval", "x parent", "zero-shot mean",
             *(M.MEASURES[k][0] for k in extra))]
    for name, p in ppl.items():
        parent = parents.get(name)
        ci, ratio = RS.summary_cells(results, name)
        rows.append((str(name), parent or "-", R.fmt(R.num(p)), ci,
                     ratio if ratio != "-" else R.fmt(R.ratio(p, ppl.get(parent))),
                     R.acc_pct(R.field(means, name, "acc")),
                     *[h for k, h in zip(M.HEADLINE, M.headline(matrix, name)) if k in extra]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    proto, src = (R.field(results, "protocol", kind=dict, default={}),
                  R.field(results, "dataset", "eval", "source"))
    words = R.field(proto, "sampling", "words", kind=str) if proto else None
    if words:
        lines.append(f"perplexity of {src}: {words}")
    elif proto:
        lines.append(f"perplexity of {src}: windows of {proto.get('seq_len')} tokens, "
                     f"{R.tokens_scored(results)} tokens scored")
    note = RS.summary_note(results)
    lines += [note] if note else []
    unfinished = R.unfinished_steps(results)
    if unfinished:
        lines.append(f"not finished: {', '.join(unfinished)}")
    return "\n".join(lines)


def report_markdown(results: dict) -> str:
    """Markdown report built from ``results.json`` alone, so it can be regenerated."""
    lines = [f"# Sensitivity and robustness report: {R.esc(results.get('model', '?'))}", ""]
    unfinished = R.unfinished_steps(results)
    if unfinished:  # a killed or interrupted run: what is below is not the whole run
        lines += [f"> **This run did not finish: step{'s' * (len(unfinished) > 1)} {', '.join(unfinished)} "
                  "never ran.** Run the same command again to resume from the finished steps.", ""]
    for which, d in (results.get("dataset") or {}).items():
        if isinstance(d, dict) and d.get("fallback"):
            lines += [f"> **Warning: the {which} text is not what was asked for.** {d.get('name')} was "
                      f"unavailable ({R.esc(d['fallback'])}), so the embedded corpus was used: these are "
                      f"not {d.get('name')} numbers. Rerun with the data cached, or with --no-fallback to "
                      "make this an error.", ""]
    preset = R.field(results, "preset", kind=dict)
    if results.get("smoke"):
        lines += ["**Smoke run (--smoke): every budget was cut to the least that runs each step; these numbers "
                  "check the pipeline, not the model, and its intervals and † marks are not evidence of "
                  "anything. Run without --smoke for results.**", ""]
    if preset:
        over = R.field(preset, "overridden", kind=list, default=[])
        lines += [f"**Protocol: as {R.text(preset.get('paper'))} ({R.text(preset.get('code'))}), "
                  + (f"except: {', '.join(R.esc(o) for o in over)} (set by you).**" if over
                     else "with no field changed.**"), ""]
        lines += [f"- where this preset differs from the paper's code: {R.text(d)}"
                  for d in R.field(preset, "differs", kind=list, default=[])] + [""]
    ds = results.get("dataset", {})
    proto = results.get("protocol", {})
    for which, d in ds.items():
        if which == "overlap":
            lines.append(f"- overlap: {d.get('shared')} of {d.get('eval_paragraphs')} evaluation paragraphs "
                         f"(of at least {d.get('min_chars')} characters) also occur in the calibration text"
                         + (" (allowed with --allow-overlap)" if d.get("shared") or d.get("same_text")
                            else ""))
            continue
        fb = f" (fallback: {R.esc(d['fallback'])})" if d.get("fallback") else ""
        fb += f" ({R.esc(d['replaced'])})" if d.get("replaced") else ""
        size = (f"{d.get('documents')} documents, sampled document by document" if d.get("chars") is None
                and d.get("documents") else f"{d.get('chars')} characters")
        how = f"; protocol: {R.esc(d['protocol'])}" if d.get("protocol") else ""
        lines.append(f"- {which} text: {R.esc(d.get('source'))}, {size}{fb}{how}")
    design = R.field(proto, "sampling", kind=dict) if proto else None
    if design and R.field(design, "words", kind=str):
        lines.append(f"- protocol: {R.esc(design['words'])} (--eval-sampling {R.esc(R.text(design.get('design')))}"
                     + (", every window of the text" if design.get("design") == "all" else "") + ")")
    elif proto:
        lines.append(f"- protocol: windows of {proto.get('seq_len')} tokens, stride {proto.get('stride')}, "
                     f"first {proto.get('eval_tokens') or 'all'} tokens")
    mt = R.field(results, "robustness", "multiple_testing", kind=dict)
    if mt:
        lines.append(f"- significance: † marks {RS.marks_words(results)}")
    lines.append(f"- seed {results.get('seed')}, device {results.get('device')}, "
                 f"dtype {results.get('dtype')}")
    found = findings(results)
    if found:
        lines += ["", "## Findings", ""] + [f"- {f}" for f in found]
    for section in (_md_perplexity, _md_zeroshot, RSF.md_safety, M.report_section, _md_finetune, _md_prune, RC.md_compression,
                    _md_noise,
                    _md_export, _md_adversarial, _md_analysis, _md_generations, _md_manifest):
        lines += section(results)
    return "\n".join(lines) + "\n"


def findings(results: dict) -> list[str]:
    """Short sentences whose numbers come from ``results``; only for steps that ran."""
    out = []
    ppl = results.get("perplexity", {})
    ft = results.get("finetune") or {}
    if R.num(ft.get("heldout_ppl_before")) is not None:
        out.append(f"Fine-tuning ({ft.get('mode')}, {ft.get('steps')} steps) moved held-out perplexity on "
                   f"the training domain from {R.fmt(ft['heldout_ppl_before'])} to "
                   f"{R.fmt(ft['heldout_ppl_after'])}.")
    parents = results.get("variants") or {}
    if "base" in ppl and "fine-tuned" in ppl:
        out.append(f"On the evaluation text, the unmodified model has perplexity {RS.perplexity_cell(results, 'base')} "
                   f"and the fine-tuned one {RS.perplexity_cell(results, 'fine-tuned')} "
                   f"(x{RS.ratio_cell(results, 'fine-tuned', R.ratio(ppl['fine-tuned'], ppl['base']))} paired).")
    base = ppl.get(parents.get("pruned")) or next((ppl[k] for k in ("fine-tuned", "base") if k in ppl), None)
    pr = results.get("prune")
    if pr and "pruned" in ppl and R.num(base):
        out.append(f"{pr['method']} pruning to {R.fmt(pr['overall_sparsity'])} sparsity ({pr['pattern']}) "
                   f"gives perplexity "
                   f"{RS.perplexity_cell(results, 'pruned')} against {R.fmt(base)} for its dense parent "
                   f"(x{RS.ratio_cell(results, 'pruned', R.num(ppl['pruned']) / R.num(base))} paired).")
    for name, q in R.variant_records(results, "quantize", "quantized")[:4]:  # a grid's are in its table
        qbase = ppl.get(parents.get(name))
        if q.get("status") == "ran" and name in ppl and R.num(qbase):
            out.append(f"{q['method'].upper()} quantization ({R.quant_bits_words(q)}, group {q['group']}: "
                       f"{R.fmt(q['avg_bits'])} bits per weight as the papers count them) gives "
                       f"{R.text(name) + ' ' if name != 'quantized' else ''}perplexity "
                       f"{RS.perplexity_cell(results, name)} against {R.fmt(qbase)} for its parent "
                       f"{R.text(parents.get(name))} (x{RS.ratio_cell(results, name, R.num(ppl[name]) / R.num(qbase))}"
                       " paired).")
    nz = results.get("noise")
    if nz and "noisy" in ppl:
        v, sat = nz["variant"], nz["sweep"]["saturation"]
        frac = R.num(ppl["noisy"]) / sat if R.num(ppl["noisy"]) is not None else float("nan")
        out.append(f"{v['mode'].capitalize()} noise eps={v['epsilon']} on {v['group']} weights gives "
                   f"perplexity {RS.perplexity_cell(results, 'noisy')}, {R.fmt(100 * frac)}% of the saturation level "
                   f"{int(sat)} (a uniform guesser over the vocabulary).")
    if nz:
        sw = nz["sweep"]
        out.append(f"Under relative noise on the decoder linears perplexity {L.doubling(sw, 'unprotected')}; "
                   f"with the top {R.pct(sw.get('protect_fraction'))} of weights by "
                   f"{sw.get('protect_score', 'w^2 F')} kept clean, it {L.doubling(sw, 'protected')}.")
        if nz.get("top_cells"):
            c = nz["top_cells"][0]
            out.append(f"The most noise-sensitive cell is layer {c['layer']} {c['module']} "
                       f"(+{R.fmt(c['delta_nll'])} nats/token).")
    zs = results.get("zeroshot") or {}
    for name, parent in (zs.get("parents") or {}).items() if zs.get("status") == "ran" else ():
        a, b = (zs["mean"].get(name) or {}).get("acc"), (zs["mean"].get(parent) or {}).get("acc")
        if R.num(a) is not None and R.num(b) is not None:
            out.append(f"Zero-shot mean accuracy over {zs['mean'][name]['tasks']} tasks: {name} "
                       f"{100 * a:.1f}% against {100 * b:.1f}% for its parent {parent} "
                       f"({RS.pooled_cell(results, name, f'{100 * (a - b):+.1f}')} points on the pooled questions).")
    return out + _findings_attacks_and_analysis(results)


def _findings_attacks_and_analysis(results: dict) -> list[str]:
    out = []
    adv = results.get("adversarial")
    if adv and adv.get("table"):
        top = max(r["eps"] for r in adv["table"])
        row = {r["method"]: r for r in adv["table"] if r["eps"] == top}
        ci = {m: RS.interval(row[m].get("delta_nll_ci95")) for m in ("pgd", "fgsm")}
        out.append(f"At eps={top} (relative to the mean embedding norm) PGD raises the continuation NLL by "
                   f"{R.fmt(row['pgd']['delta_nll'])} {ci['pgd']} nats/token, FGSM by "
                   f"{R.fmt(row['fgsm']['delta_nll'])} {ci['fgsm']} (95% intervals over the attacked samples); "
                   f"targeted PGD reaches {R.esc(repr(adv['targeted']['target']))} on "
                   f"{R.fmt(100 * adv['targeted']['success_rate'])}% of {adv['targeted']['n']} prompts"
                   + (f" (Wilson 95% {RS.interval(adv['targeted'].get('success_ci95'))})"
                      if RS.interval(adv['targeted'].get('success_ci95')) else "") + ".")
        out += L.defence_finding(adv["adversarial_training"])
    an = results.get("analysis")
    if an:
        sws = an.get("super_weights") or []
        if sws:
            s = sws[0]
            out.append(f"Super weight at layer {s['layer']} {s['module'].split('.')[-1]}[{s['row']}, "
                       f"{s['col']}] (value {R.fmt(s['value'])}): zeroing it alone multiplies perplexity by "
                       f"{R.fmt(s['ppl_ratio'])}.")
        else:
            out.append(L.no_super_weight(an))
        q = {(r["bits"], r["variant"].split(" ")[0]): r for r in an.get("quantization", [])}
        for bits in sorted({b for b, _ in q}, reverse=True):
            plain, prot = q.get((bits, "plain")), [r for (b, v), r in q.items() if b == bits and v != "plain"]
            if plain and prot:
                best = min(prot, key=lambda r: (R.num(r["perplexity"]) if R.num(r["perplexity"]) is not None
                                                else math.inf))
                out.append(f"{bits}-bit RTN: perplexity {R.fmt(plain['perplexity'])} plain, "
                           f"{R.fmt(best['perplexity'])} with {best['variant']} "
                           f"(+{R.fmt(best['extra_storage_pct'])}% storage).")
    return out


def markdown_to_html(md: str, base: Path) -> str:
    """report.md -> a self-contained HTML page (Python-Markdown, tables extension); every
    image is inlined as a data URI, a missing one is named in the page."""
    conv = markdown.Markdown(extensions=["tables"], output_format="html")
    # Model outputs (generations, GCG suffixes) land in the report: raw HTML in them is shown
    # as text, never interpreted.
    conv.preprocessors.deregister("html_block")
    conv.inlinePatterns.deregister("html")
    # No text becomes a link, whatever its scheme ([x](javascript:...), <http://...>, [x][ref]):
    # the only references a page holds are an embedded plots/*.png (``inline`` below) and the links
    # to the report's own tables/*.csv, .tex and plots/*.pdf (``llm_tables.html_tables``).
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
        return (f'<img alt="{m.group(1)}" '
                f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"')

    body = re.sub(r'<img alt="([^"]*)" src="([^"]+)"', inline, body)
    body = T.html_tables(re.sub(r"<i>missing plot ([^<]*)</i>\s*/?>", r"<i>missing plot \1</i>", body), base)
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;"
             "color:#222}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
             "th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 3px}"
             # a generated answer or a path without spaces wraps instead of widening the page
             "p,li{overflow-wrap:anywhere}pre{white-space:pre-wrap;overflow-wrap:anywhere}" + T.TABLE_CSS)
    # The script lets a headless browser check that every image decoded (data-images-ok).
    script = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
              "document.body.dataset.imagesOk=im.every(i=>i.complete&&i.naturalWidth>0);"
              "document.body.dataset.images=im.length;});</script>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>LLM sensitivity report</title>"
            f"<style>{style}</style>{script}</head><body>\n{body}\n</body></html>\n")


def write_report(results: dict, out: Path) -> tuple[Path, Path]:
    """Write report.md, the self-contained report.html and every table as tables/*.csv, .tex into ``out``."""
    out = Path(out)
    md = T.paper_markdown(report_markdown(results), results, out)  # captions, tables/*.csv and .tex
    IO.write_text(out / "report.md", md)
    IO.write_text(out / "report.html", markdown_to_html(md, out))
    return out / "report.md", out / "report.html"



def rebuild_report(out: Path) -> dict:
    """Redraw every plot and rewrite report.md/.html from ``<out>/results.json`` alone; a file not
    shaped like this tool's results is moved aside (one error line), never half-read. It holds the
    folder's lock, as a run does: a report rebuilt while a run writes there is refused."""
    path = Path(out) / "results.json"
    if not Path(out).is_dir():
        raise C.UserError(f"--report-only: no readable results.json in {out}")
    with IO.output_lock(out), IO.writing_into(out):
        results = R.read_results(out)  # a file not shaped like ours is moved aside, as on a resume
        if not results:
            raise C.UserError(f"--report-only: no readable results.json in {out}")
        try:
            results["plots"] = make_plots(results, out)
            write_report(results, out)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError) as e:
            raise C.UserError(f"--report-only: {path} has an unexpected shape ({C.error_line(e, 120)})")
        IO.write_json(path, results)
    return results
