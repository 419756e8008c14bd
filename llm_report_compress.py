"""The report's compression sections: a grid of pruned variants, and every pruned, quantized and
stacked variant against its size.

Reads results.json only (``llm_results.pareto_rows``): bits per weight as the papers count them,
perplexity with its paired ratio to the parent, zero-shot mean, and the Pareto front.
"""
from __future__ import annotations

import llm_report_stats as RS
import llm_results as R
from llm_compress import DENSE_BITS, MASK_BITS


def md_compression(results: dict) -> list[str]:
    """"Quality against size": a table of every variant but the noisy ones, sorted by bits, and the
    Pareto figure; nothing when the run compressed nothing."""
    rows = R.pareto_rows(results)
    if not any(r["bits"] < DENSE_BITS for r in rows):
        return []
    ppl = R.field(results, "perplexity", kind=dict, default={})
    dense = [r for r in rows if r["bits"] >= DENSE_BITS]
    ref = dense[0] if dense else None
    quant = dict(R.variant_records(results, "quantize", "quantized"))
    counted = next((q.get("bits_counted") for q in quant.values() if q.get("bits_counted")), None)
    exports = R.field(results, "export", "variants", kind=dict, default={})
    # The group the export wrote (one for every linear, the gcd of groups and widths), where it differs
    made = {n: f"{q.get('method')} {R.quant_bits_words(q)} g{q.get('group')}"
               + (", symmetric" if R.field(q, "config", "symmetric") is True else "")
               + (f", written at g{g}" if (g := R.field(exports, n, "group_size_written")) not in (None, q.get("group"))
                  else "") for n, q in quant.items()}
    made.update({n: f"{p.get('method')} {p.get('pattern')} {R.fmt(R.num(p.get('overall_sparsity')))}"
                 for n, p in R.variant_records(results, "prune", "pruned")})
    has_zs = any(r["zeroshot"] is not None for r in rows)
    # Bits as written to disk, beside the papers' count: the codes checkpoint, and the export.
    written = {n: R.num(q.get("stored_bits_per_weight")) for n, q in quant.items()}
    exported = {n: R.num(R.field(v, "stored_bits_per_weight", "decoder_linears")) for n, v in exports.items()}
    has_w, has_e = any(v is not None for v in written.values()), any(v is not None for v in exported.values())
    lines = ["", "## Quality against size", "",
             f"Bits per weight of the decoder linears as the papers count them: a dense weight {DENSE_BITS} bits "
             f"(fp16); a pruned variant {DENSE_BITS} bits per kept weight and a {MASK_BITS}-bit mask per weight; "
             f"a quantized one {counted or 'its codes, scales and zeros'}. "
             "x parent is the paired perplexity ratio to the variant it was made from († where the paired "
             "interval excludes 1); front marks the Pareto front (no variant with as few bits has a lower "
             "perplexity; not by itself a significant difference)"
             + (f"; x {R.text(ref['variant'])} is the plain ratio to the dense model" if ref else "")
             + ("; written: bits per weight of the files as stored (the codes checkpoint: uint8 codes, fp32 "
                "grids; the compressed-tensors export: packed codes), over the decoder linears" if has_w or has_e
                else "") + ".", "",
             "| variant | parent | made by | bits / weight | " + ("written, codes | " if has_w else "")
             + ("written, export | " if has_e else "") + "perplexity | x parent | "
             + (f"x {R.esc(ref['variant'])} | " if ref else "") + ("zero-shot mean | " if has_zs else "") + "front |",
             "|---" * 7 + "|" + "---|" * (has_w + has_e + bool(ref) + has_zs)]
    for r in rows:
        n = r["variant"]
        lines.append(f"| {R.esc(n)} | {R.esc(r['parent'] or '-')} | {R.text(made.get(n, 'dense'))} | "
                     f"{R.fmt(r['bits'])} | " + (f"{R.fmt(written.get(n))} | " if has_w else "")
                     + (f"{R.fmt(exported.get(n))} | " if has_e else "") + f"{R.fmt(r['perplexity'])} | "
                     f"{RS.ratio_cell(results, n, R.ratio(ppl.get(n), ppl.get(r['parent'])))} | "
                     + (f"{R.fmt(R.ratio(r['perplexity'], ref['perplexity']))} | " if ref else "")
                     + (f"{R.acc_pct(r['zeroshot'])} | " if has_zs else "") + ("yes |" if r["front"] else "|"))
    return lines + ["", "![quality against size](plots/pareto.png)"]


def md_prune_grid(results: dict) -> list[str]:
    """A grid of pruned variants: one row per point, and the curves a paper would print."""
    ppl = R.field(results, "perplexity", kind=dict, default={})
    means = R.field(results, "zeroshot", "mean", kind=dict, default={})
    recs = R.variant_records(results, "prune", "pruned")
    parent = recs[0][1].get("parent") if recs else None
    cal = R.field(recs[0][1], "calibration", kind=dict, default={}) if recs else {}
    lines = ["", "## Pruning (grid)", "",
             f"{len(recs)} pruned variants of {R.text(parent)}, each from the same "
             f"{R.fmt(cal.get('windows'))} calibration windows of {R.fmt(cal.get('seq_len'))} tokens of "
             f"{R.text(cal.get('source'))}. Dense ({R.text(parent)}): perplexity "
             f"{R.fmt(R.num(ppl.get(parent)))}.", "",
             "| variant | method | pattern | allocation | sparsity (achieved) | perplexity | x parent | "
             "zero-shot mean |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in recs:
        lines.append(f"| {R.esc(name)} | {R.text(r.get('method'))} | {R.text(r.get('pattern'))} | "
                     f"{R.text(R.field(r, 'allocation', 'mode', default='uniform'))} | "
                     f"{R.fmt(R.num(r.get('overall_sparsity')))} | {R.fmt(R.num(ppl.get(name)))} | "
                     f"{RS.ratio_cell(results, name, R.ratio(ppl.get(name), ppl.get(parent)))} | "
                     f"{R.acc_pct(R.field(means, name, 'acc'))} |")
    return lines + RS.calibration_draws(results) + ["", "![perplexity against sparsity](plots/prune_curves.png)",
                                                     "", "![sparsity per layer](plots/prune_sparsity_per_layer.png)"]
