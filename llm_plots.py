"""Every figure of the report and the comparison, drawn from saved results only (matplotlib, Agg).

``make_plots(results, out)`` redraws every plot that a results.json supports and returns
their paths; each ``plot_*`` takes a section of it (plain dicts, numbers as JSON keeps them).
Each figure goes out as PNG and PDF; under ``captioned`` (as ``make_plots`` draws them) the
PNG carries a caption line (model, eval text, windows, tokens) also written to
``<name>.caption.txt``.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib
import matplotlib.text
import numpy as np

matplotlib.use("Agg")  # before pyplot: plots are files, never windows
import matplotlib.patches as mpatches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LogNorm, SymLogNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator  # noqa: E402

import llm_io as IO
import llm_results as R
from llm_common import UserError, error_line

log = logging.getLogger("llm.plots")
from llm_figures import (captioned, legend_covers_data, log_ticks, log_x_axis, new_figure, plain_number,  # noqa: F401
                         save_figure)  # (re-exported: the figure machinery's home is llm_figures)


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


def _per_layer_bars(per: dict, ref: float, ref_label: str, ylabel: str, title: str):
    """Bars of a per-block value ({"0": v, ...}) with a dashed reference line."""
    fig, ax = new_figure(figsize=(6, 3))
    layers = sorted(per, key=int)
    ax.bar([int(k) for k in layers], [per[k] for k in layers])
    ax.axhline(ref, color="red", ls="--", label=ref_label)
    ax.set_xlabel("decoder block")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig, ax, layers


def plot_sparsity_per_layer(result: dict, path):
    """Achieved sparsity per block (bars), the target, and a non-uniform allocation's per-layer
    target; for a grid (``result["grid"]``), one line of achieved sparsity per variant."""
    if result.get("grid"):
        return _plot_grid_sparsity_per_layer(result["grid"], path)
    fig, ax, layers = _per_layer_bars(result.get("layer_sparsity") or result["per_layer"], result["target_sparsity"],
                                      "target", "sparsity", f"{result['method']} {result['pattern']}")
    alloc = result.get("allocation") or {}
    if alloc.get("mode") not in (None, "uniform") and alloc.get("target"):
        ax.plot([int(k) for k in layers], [alloc["target"].get(k) for k in layers], "k.-",
                label=f"{alloc['mode']} allocation")
    ax.legend()
    return save_figure(fig, path)


def _plot_grid_sparsity_per_layer(records: list, path):
    """A grid's achieved sparsity as a variant x block heatmap: with uniform targets its per-variant
    lines lie on each other (nine flat lines), while a row per variant keeps each readable."""
    names = [str(r.get("name")) for r in records]
    pers = [r.get("layer_sparsity") or r.get("per_layer") or {} for r in records]
    layers = sorted({int(k) for per in pers for k in per})
    data = np.array([[R.fnum(per.get(str(k))) for k in layers] for per in pers], dtype=float)
    data[~np.isfinite(data)] = np.nan
    fig, ax = new_figure(figsize=(max(5.0, 1.5 + 0.25 * len(layers)), 1.2 + 0.3 * len(names)),
                         layout="constrained")
    top = max(1e-9, float(np.nanmax(data, initial=0)))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=top)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: str(layers[int(v)]) if 0 <= v < len(layers)
                                               else ""))
    ax.set_xlabel("decoder block")
    ax.set_ylabel("variant")
    fig.colorbar(im, ax=ax, label="sparsity (achieved)")
    return save_figure(fig, path)


def plot_prune_curves(results: dict, path):
    """Perplexity, and zero-shot mean accuracy where measured, against achieved sparsity: one
    line per method and pattern, the dense parent as a reference line; perplexity log-scaled
    where it spans more than a decade."""
    curves = R.prune_curves(results)
    dense_ppl, dense_acc = curves.pop("dense")
    with_acc = any(a is not None for pts in curves.values() for _, _, a in pts)
    fig, axes = new_figure(1, 2 if with_acc else 1, figsize=(11 if with_acc else 6, 4), squeeze=False)
    panels = [(axes[0][0], 1, "perplexity", dense_ppl)] + ([(axes[0][1], 2, "zero-shot mean acc", dense_acc)]
                                                          if with_acc else [])
    for ax, k, label, dense in panels:
        ys_all = []
        for (method, pattern), pts in curves.items():
            ys = [R.fnum(p[k]) for p in pts]
            ys_all += [y for y in ys if np.isfinite(y)]
            ax.plot([p[0] for p in pts], ys, marker="o", label=f"{method} {pattern}")
        if dense is not None:
            ax.axhline(dense, color="gray", ls=":", label="dense")
            ys_all.append(dense)
        if k == 1 and ys_all and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 10:
            ax.set_yscale("log")
        ax.set_xlabel("sparsity (achieved)")
        ax.set_ylabel(label)
    panels[-1][0].legend(fontsize=7)  # the same lines in each panel: one legend, on the rightmost
    return save_figure(fig, path)


def plot_bits_per_layer(result: dict, path):
    """Mean code bits per block of the quantized variant, and the average."""
    fig, ax, _ = _per_layer_bars(result["layer_bits"], result["avg_code_bits"], "average code bits", "bits per weight",
                                 f"{result['method']} g{result['group']}, {result['bit_allocation']} bits")
    ax.legend()
    return save_figure(fig, path)


def plot_sweep(sweep: dict, path):
    """Perplexity against eps (mean with min-max band), saturation level marked where the sweep
    comes within a decade of it (otherwise its line would squash the curves flat: it is named in
    the title instead)."""
    fig, ax = new_figure(figsize=(6, 4))
    top = []
    for tag, summ in sweep["summary"].items():
        s = summ["perplexity"]
        xs = sorted(s, key=float)
        mean = [R.fnum(s[x]["mean"]) for x in xs]
        ax.plot([float(x) for x in xs], mean, marker="o", label=tag)
        hi = [R.fnum(s[x]["max"]) for x in xs]
        ax.fill_between([float(x) for x in xs], [R.fnum(s[x]["min"]) for x in xs], hi, alpha=0.2)
        top += [v for v in hi + mean if math.isfinite(v)]
    ax.axhline(R.fnum(sweep["clean"]["perplexity"]), color="gray", ls=":", label="clean")
    sat = f"saturation (vocab {int(sweep['saturation'])})"
    if top and max(top) >= sweep["saturation"] / 10:
        ax.axhline(sweep["saturation"], color="red", ls="--", label=sat)
    else:
        ax.set_title(f"{sat} far above the sweep", fontsize=9)
    ax.set_yscale("log")
    log_x_axis(ax, [x for summ in sweep["summary"].values() for x in summ["perplexity"]])
    ax.set_xlabel(f"epsilon ({sweep['mode']} noise, {sweep['group']})")
    ax.set_ylabel("perplexity")
    ax.legend()
    return save_figure(fig, path)


def plot_sensitivity_map(smap: dict, path):
    fig, ax = new_figure(figsize=(1.0 + 0.8 * len(smap["modules"]), 1.0 + 0.22 * len(smap["layers"])))
    data = np.array([[R.fnum(v) for v in row] for row in smap["delta_nll"]])
    data[~np.isfinite(data)] = np.nan
    im = ax.imshow(data, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(smap["modules"])), smap["modules"], rotation=45, ha="right")
    ax.set_xlabel("module")
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
    """Layer x module heatmaps of Hessian trace (signed, symlog), Fisher (log) and, if given, the
    noise NLL increase. A Hessian cell whose standard error is above the target is dotted (its
    colour stays readable): at a CPU budget that can be every cell."""
    panels = [("hessian_trace", "Hessian trace", "signed"), ("fisher_sum", "Fisher (sum)", "log")]
    grids = [layer_module_grid(result, k) for k, _, _ in panels]
    if noise_map:
        grids.append((noise_map["layers"], noise_map["modules"], noise_map["delta_nll"]))
        panels.append(("delta_nll", "noise delta NLL", "linear"))
    fig, axes = new_figure(1, len(grids), figsize=(4.6 * len(grids), 1.8 + 0.2 * len(grids[0][0])),
                           layout="constrained")
    axes = np.atleast_1d(axes)
    for ax, (layers, types, grid), (key, title, kind) in zip(axes, grids, panels):
        data = np.array([[float(v) for v in row] for row in grid])
        data[~np.isfinite(data)] = np.nan  # NaN/Inf weights give non-finite cells: blank, never the scale
        if kind == "signed":  # Hutchinson traces can be negative and noisy: signed scale
            finite = np.abs(data[np.isfinite(data)])
            lim = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
            im = ax.imshow(data, aspect="auto", cmap="RdBu_r",
                           norm=SymLogNorm(linthresh=lim * 1e-3, vmin=-lim, vmax=lim))
            ok = result.get("hessian_module_reliable") or {}
            _, _, okgrid = layer_module_grid({**result, "ok": {n: float(v) for n, v in ok.items()}}, "ok")
            for i, row in enumerate(okgrid if ok else []):
                for j, v in enumerate(row):
                    if v == 0.0:
                        ax.add_patch(mpatches.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="..",
                                                        edgecolor="0.15", linewidth=0))
            title += " (dotted: stderr above target)" if ok else ""
            label = "trace (symlog)"
            ticks = _symlog_ticks(lim)
        elif kind == "log":
            mag = np.abs(data)
            mag[mag <= 0] = np.nan  # a zero has no place on a log scale: blank
            good = mag[np.isfinite(mag)]
            im = ax.imshow(mag, aspect="auto", cmap="viridis",
                           norm=LogNorm(vmin=good.min(), vmax=good.max()) if good.size else None)
            label, ticks = "|value| (log scale)", None
        else:
            im = ax.imshow(data, aspect="auto", cmap="magma")
            label, ticks = "nats/token", None
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
        ax.set_xlabel("module")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label=label, ticks=ticks)
    return save_figure(fig, path)


def _symlog_ticks(lim: float) -> list[float]:
    """Colorbar ticks of a signed symlog scale up to ``lim``: 0 and at most three powers of ten each
    side (every decade labelled crowds the labels into each other on a short heatmap)."""
    top, bottom = math.floor(math.log10(lim)), math.ceil(math.log10(lim * 1e-3))
    ks = list(range(top, bottom - 1, -1))
    ks = ks[::max(1, math.ceil(len(ks) / 3))]
    return sorted([10.0 ** k for k in ks] + [-(10.0 ** k) for k in ks] + [0.0])


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


def _figure_scope(results: dict, name: str) -> str:
    """What a figure's own numbers were measured on, where that is not the perplexity protocol."""
    sw = R.field(results, "noise", "sweep", kind=dict, default={})
    acfg = R.field(results, "analysis", "config", kind=dict, default={})
    recs = R.variant_records(results, "prune", "pruned")
    cal = R.field(recs[0][1] if recs else {}, "calibration", kind=dict, default={})
    adv = R.field(results, "adversarial", kind=dict, default={})
    scope = {
        "noise_sweep": f"sweep scored on {R.field(sw, 'clean', 'token_set')}",
        "noise_map": f"scored on {R.field(sw, 'clean', 'token_set')}",
        "sensitivity_heatmaps": f"Hessian on {acfg.get('calib_windows')} calibration window(s) of "
                                f"{acfg.get('calib_seq_len')} tokens, Fisher on {acfg.get('fisher_windows')}",
        "activations": f"activations on the prompt {acfg.get('super_weight_prompt')!r}",
        "prune": f"calibrated on {cal.get('windows')} windows of {cal.get('seq_len')} tokens of "
                 f"{cal.get('source')}",
        "attack_sweep": f"{adv.get('n_samples')} prompts, {adv.get('norm')} ball",
        "finetune": f"trained on {R.field(results, 'dataset', 'train', 'source')}",
    }.get(name)
    return f"; {scope}" if scope and "None" not in scope else ""


def figure_caption(results: dict, name: str) -> str:
    """One caption line from results.json: the model, the eval text, the windows and the tokens
    scored, then what this figure's own numbers were measured on (``name``: its make_plots key)."""
    ev = R.field(results, "dataset", "eval", kind=dict, default={})
    proto = R.field(results, "protocol", kind=dict, default={})
    text = str(ev.get("source") or ev.get("name") or "?")
    if ev.get("fallback"):
        text += f" (in place of {ev.get('name')})"
    first = next(iter(R.field(results, "evaluation", kind=dict, default={}).values()), {})
    n = f"{first['windows']} " if isinstance(first, dict) and first.get("windows") else ""
    tokens = R.tokens_scored(results) or proto.get("tokens_used") or "?"
    windows = (f"{n}windows of {proto.get('seq_len')} tokens, stride {proto.get('stride')}, {tokens} tokens "
               "scored per variant") if proto else "no perplexity windows"
    design = R.field(proto, "sampling", kind=dict) if proto else None
    if design and design.get("design") in ("spread", "first"):  # which windows: the report's protocol line
        strata = design.get("strata") if isinstance(design.get("strata"), list) else None
        windows += (" (first: the first windows)" if design["design"] == "first" else
                    f" (spread: a stratified sample of the text, two windows in each of {len(strata) // 2} stretches)"
                    if strata else " (spread across the text)")
    return f"Model {results.get('model', '?')}; eval text {text}; {windows}{_figure_scope(results, name)}."


def make_plots(results: dict, out: Path) -> dict:
    """(Re)draw every plot that the saved results support; returns {name: path relative to out}."""
    out = Path(out)
    plots = {}
    d = out / "plots"

    attempted = set()  # figure stems whose results are here (drawn, or not drawable)

    def add(name, fn, *args):
        attempted.add(next(a for a in args if isinstance(a, Path)).stem)
        try:
            caption = figure_caption(results, name)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a caption never costs a figure
            caption = None
            log.warning("no caption for plot %s: %s", name, error_line(e))
        try:
            with captioned(caption):
                plots[name] = str(fn(*args).relative_to(out))
        except UserError:  # a full disk or an unwritable folder: the caller's one error line
            raise
        except Exception as e:  # values no axis can show (all NaN or Inf): the numbers stay in results.json
            plt.close("all")
            log.warning("plot %s not drawn: %s (its numbers are in results.json and the report)", name,
                        error_line(e))

    if results.get("finetune", {}).get("train_losses"):
        add("finetune", plot_training_curve, results["finetune"], d / "finetune_loss.png")
    if results.get("prune"):
        add("prune", plot_sparsity_per_layer, results["prune"], d / "prune_sparsity_per_layer.png")
        if results["prune"].get("grid") and results.get("perplexity"):
            add("prune_curves", plot_prune_curves, results, d / "prune_curves.png")
    if len([r for r in R.pareto_rows(results) if r["bits"] < 16]) >= 1:  # something was compressed
        add("pareto", plot_pareto, results, d / "pareto.png")
    if (results.get("quantize") or {}).get("layer_bits") and not results["quantize"].get("grid"):  # a grid: pareto
        add("quantize", plot_bits_per_layer, results["quantize"], d / "quantize_bits_per_layer.png")
    if results.get("noise"):
        add("noise_sweep", plot_sweep, results["noise"]["sweep"], d / "noise_sweep.png")
        if results["noise"].get("map"):
            add("noise_map", plot_sensitivity_map, results["noise"]["map"], d / "noise_map.png")
    if results.get("adversarial"):
        add("attack_sweep", plot_attack_sweep, results["adversarial"], d / "attack_sweep.png")
    if any((r.get("parent") for r in (results.get("robustness") or {}).get("rows", {}).values())):
        add("robustness", plot_robustness, results["robustness"], d / "robustness_heatmap.png")
    if results.get("analysis"):
        an = results["analysis"]
        add("sensitivity_heatmaps", plot_heatmaps, an, d / "sensitivity_heatmaps.png",
            (results.get("noise") or {}).get("map"))
        add("activations", plot_activation_profile, an["activation_profile"], d / "activations.png",
            an.get("super_weight_layers", []))
    _set_aside_stale_figures(out, attempted)
    return plots


# Every figure file make_plots may draw (plots/<stem>.png, .pdf, .caption.txt).
FIGURE_STEMS = ("finetune_loss", "prune_sparsity_per_layer", "prune_curves", "pareto", "quantize_bits_per_layer",
                "noise_sweep", "noise_map", "attack_sweep", "robustness_heatmap", "sensitivity_heatmaps", "activations")


def _set_aside_stale_figures(out: Path, attempted: set) -> None:
    """A figure of results that are no longer in results.json (dropped as stale, or a step now off:
    make_plots did not even try to draw it) goes where stale results go: moved to
    ``<out>/stale/plots/``, never left in ``plots/`` beside the figures of this run's results. Only
    files this tool's manifest says it wrote are moved."""
    moved = []
    for stem in FIGURE_STEMS:
        if stem not in attempted:
            moved += [f"{stem}{ext}" for ext in (".png", ".pdf", ".caption.txt")
                      if IO.remove_written(out, f"plots/{stem}{ext}", aside="stale")]
    if moved:
        log.warning("figures of results no longer in results.json moved to %s: %s", Path(out) / "stale" / "plots",
                    ", ".join(moved))


def plot_robustness(matrix: dict, path) -> Path:
    """Heatmap of the robustness matrix: each variant's measures against its parent's (log2 of the
    ratio, or the difference, as ``llm_matrix.MEASURES`` says), scaled per column by its largest
    change and coloured so that red is worse. Each cell shows the value and its change (x ratio
    or + difference); bold where the paired difference is significant, hatched where it is not
    (inside the noise). Root variants have no parent: their cells stay blank."""
    measures, rows = matrix["measures"], matrix["rows"]
    keys, names = list(measures), list(rows)
    # A measure this version does not know (a newer results.json) may lack any of these: drawn plainly.
    compare = {k: R.field(measures, k, "compare", kind=str, default="difference") for k in keys}
    worse = {k: R.field(measures, k, "worse", kind=str, default="higher") for k in keys}
    labels = [R.field(measures, k, "label", kind=str, default=str(k)) for k in keys]
    grid = np.full((len(names), len(keys)), np.nan)
    for i, n in enumerate(names):
        for j, k in enumerate(keys):
            rel = (rows[n]["cells"].get(k) or {}).get("relative")
            if isinstance(rel, (int, float)) and math.isfinite(rel) and (compare[k] != "ratio" or rel > 0):
                x = math.log2(rel) if compare[k] == "ratio" else rel
                grid[i, j] = x if worse[k] == "higher" else -x
    scale = np.nanmax(np.abs(grid), axis=0, initial=0.0)
    shown = grid / np.where(scale > 0, scale, 1.0)
    fig, ax = new_figure(figsize=(1.35 * len(keys) + 3, 0.55 * len(names) + 2.4))
    im = ax.imshow(shown, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    for i, n in enumerate(names):
        for j, k in enumerate(keys):
            c = rows[n]["cells"].get(k) or {}
            v, rel, vs = c.get("value"), c.get("relative"), c.get("vs_parent")
            text = "-" if v is None else f"{v:.3g}"
            if v is None and c.get("never_doubled"):
                text = f"> {c.get('max_eps')}"
            if c.get("of") is not None:
                text += f"/{c['of']}"
            if isinstance(rel, (int, float)) and math.isfinite(rel):
                text += f"\nx{rel:.3g}" if compare[k] == "ratio" else f"\n{rel:+.3g}"
            dark = math.isfinite(shown[i, j]) and abs(shown[i, j]) > 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black",
                    fontweight="bold" if (vs or {}).get("significant") else "normal")
            if vs and not vs.get("significant"):
                ax.add_patch(mpatches.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//",
                                                edgecolor="0.7", linewidth=0))
    ax.set_xticks(range(len(keys)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), [f"{n} (of {rows[n]['parent']})" if rows[n]["parent"] else n for n in names],
                  fontsize=8)
    ax.set_xlabel("measure")
    ax.set_ylabel("variant")
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, ticks=[-1, 0, 1])
    cb.ax.set_yticklabels(["better", "same", "worse"], fontsize=7)
    cb.set_label("change from the parent, scaled per column", fontsize=7)
    ax.set_title("Each variant against its parent (bold: significant after the run's multiple-testing adjustment; "
                 "hatched: within noise)",
                 fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_comparison(rows: list, variants: list, path) -> Path:
    """Grouped bars, one bar per run: perplexity (log scale, plain tick labels) of each variant and,
    where runs measured it, zero-shot mean accuracy beside it; one legend, on the right panel."""
    panels = [("perplexity", "perplexity", True)] + ([("zeroshot", "zero-shot mean acc", False)]
                                                      if any(r.get("zeroshot") for r in rows) else [])
    w = max(5.0, 0.5 * len(variants) * max(1, len(rows)) + 2)
    fig, axes = new_figure(1, len(panels), figsize=(w * len(panels), 4), squeeze=False, layout="constrained")
    width = 0.8 / max(len(rows), 1)
    for ax, (key, label, log_scale) in zip(axes[0], panels):
        left_out = []
        for k, r in enumerate(rows):
            ys = [R.fnum((r.get(key) or {}).get(v)) for v in variants]
            # A run that stopped early (resume exists) holds zeros, negatives or inf: a bar a log (or
            # any) axis cannot show is left out and named, the rest is drawn.
            shown = [y if math.isfinite(y) and (y > 0 or not log_scale) else float("nan") for y in ys]
            left_out += [f"{r.get('label') or r['run']}: {v}" for v, y, z in zip(variants, ys, shown)
                         if not math.isnan(y) and math.isnan(z)]
            ax.bar([i + k * width for i in range(len(variants))], shown, width, label=r.get("label") or r["run"])
        if left_out:
            log.warning("compare: %s not drawn in the %s panel (not a positive finite number; the table has it)",
                        ", ".join(left_out), key)
        # Variant names are long ("pruned[wanda,0.5]"): slanted, they never run into each other.
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(variants))], variants, rotation=30, ha="right",
                      fontsize=8)
        drawn = [h for c in ax.containers for h in c.datavalues if math.isfinite(h)]
        if log_scale and drawn:
            ax.set_yscale("log")
        if not drawn:
            ax.text(0.5, 0.5, "no value to draw (see the table)", transform=ax.transAxes, ha="center", va="center")
        ax.set_xlabel("variant")
        ax.set_ylabel(label)
    axes[0][-1].legend(fontsize=7, title="run", title_fontsize=7)
    return save_figure(fig, path)


def _family(name: str) -> str:
    return ("pruned + quantized" if "+quantized" in name else "quantized" if name.startswith("quantized")
            else "pruned" if name.startswith("pruned") else "dense")


def plot_pareto(results: dict, path) -> Path:
    """Quality against size (``R.pareto_rows``): perplexity (log) and, where measured, zero-shot mean
    accuracy against bits per weight of the decoder linears as the papers count them, one marker
    per variant and family, the dense models as dashed reference lines, the Pareto front as a
    step line through its (ringed, named) points."""
    rows = R.pareto_rows(results)
    panels = [("perplexity", "perplexity (log scale)", "front")]
    if any(r["zeroshot"] is not None for r in rows):
        panels.append(("zeroshot", "zero-shot mean accuracy", "front_zeroshot"))
    fig, axes = new_figure(1, len(panels), figsize=(6.4 * len(panels), 4.2), squeeze=False)
    markers = {"dense": "s", "pruned": "^", "quantized": "o", "pruned + quantized": "D"}
    for ax, (key, label, front) in zip(axes[0], panels):
        pts = [r for r in rows if r[key] is not None and math.isfinite(r[key])]
        for fam, mk in markers.items():
            sel = [r for r in pts if _family(r["variant"]) == fam]
            if sel:
                ax.scatter([r["bits"] for r in sel], [r[key] for r in sel], marker=mk, s=36, label=fam, zorder=3)
        for r in pts:
            if _family(r["variant"]) == "dense":
                ax.axhline(r[key], color="0.6", linestyle="--", linewidth=0.8, zorder=1)
        fr = [r for r in pts if r[front]]
        ax.step([r["bits"] for r in fr], [r[key] for r in fr], where="post", color="black", linewidth=1,
                label="Pareto front", zorder=2)
        ax.scatter([r["bits"] for r in fr], [r[key] for r in fr], s=110, facecolors="none", edgecolors="black",
                   zorder=4)
        for r in fr:
            ax.annotate(r["variant"], (r["bits"], r[key]), textcoords="offset points", xytext=(4, 4), fontsize=6)
        if key == "perplexity" and pts:
            lo, hi = min(r[key] for r in pts), max(r[key] for r in pts)
            ax.set_yscale("log")  # labelled at 5 plain values: a span under a decade gets no 10^k tick
            ticks = sorted({float(f"{v:.3g}") for v in np.geomspace(lo, hi, 5)}) if hi > lo > 0 else [lo]
            ax.set_yticks(ticks, [f"{v:g}" for v in ticks])
            ax.yaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("bits per weight of the decoder linears (codes, scales, zeros, masks)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        ax.grid(alpha=0.3)
    axes[0][0].set_title("Quality against size (lower left is better; dashed: dense)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
