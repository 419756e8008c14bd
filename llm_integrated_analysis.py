"""The analysis step: Hessian sensitivity, super weights, and quantization guided by them.

Hessian (PyHessian-style, on the LM loss over calibration windows):
    HessianOperator     Hessian-vector products by double backward (eager attention, since
                        fused SDPA kernels have no double backward).
    hutchinson_trace    tr(H) per module from shared Rademacher probes: one HVP gives every
                        module's trace; stops on relative tolerance; returns mean and
                        standard error.
    top_eigenvalue      power iteration, for all analysed weights or one block.
Fisher and saliency:
    fisher_diagonal     mean of squared per-window gradients.
    OBD saliency        0.5 * H_ii * w^2 with H_ii from the Fisher (or Hutchinson's diagonal).
Super weights (Yu et al. 2024):
    detect_super_weights  data-free: one forward pass on a short prompt with hooks on every
                        MLP down projection; the layer whose output spikes gives
                        row = spiking output channel, col = spiking input channel. Zero it,
                        repeat. Each candidate is verified by ablation (perplexity ratio).
Quantization guided by sensitivity:
    round-to-nearest group quantization (asymmetric, groups along the input dimension),
    plain, with the super weights kept in full precision, and with the super weights plus
    the top fraction by saliency kept (dense-and-sparse, as in SqueezeLLM).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

import llm_common as C
import llm_data as D
import llm_model as LM
import llm_stats as ST
import llm_variants as V
from llm_compress import KEPT_BITS, grid_bits, quantize_rtn_, rtn_groups, rtn_quantize  # noqa: F401  (re-exported)
from llm_config import AnalysisConfig, EvalConfig
from llm_run import Run
from llm_perplexity import evaluate_model, token_set
from llm_sensitivity import (HessianOperator, SuperWeight, TraceResult, detect_super_weights, gradient_moments,  # noqa: F401
                             hutchinson_trace, lm_loss_fn, protect_top_fraction, rel_stderr_of, stderr_of)

log = logging.getLogger("llm.analysis")
_rel_stderr, _stderr = rel_stderr_of, stderr_of  # their old names here (the Hutchinson code now lives in llm_sensitivity)


# --------------------------------------------------------------------------- Hessian


def top_eigenvalue(loss_fn, params: Sequence[torch.Tensor], iters: int = 20, tol: float = 1e-3,
                   seed: int = 0, progress: bool = True,
                   operator: Optional[HessianOperator] = None) -> tuple[float, int]:
    """Largest-magnitude Hessian eigenvalue by power iteration. Returns (eigenvalue, iterations)."""
    g = torch.Generator().manual_seed(seed)
    vs = [torch.randn(p.shape, generator=g).to(p.device) for p in params]
    # The iterate is kept at squared norm = number of weights (entries of order 1, like a
    # Rademacher probe), not at unit norm: a unit vector over 1e8 weights has entries near 1e-4,
    # and the double backward then runs through denormal floats, 50x slower on CPU (measured:
    # 139 s against 2.5 s per product on SmolLM2-135M). The Rayleigh quotient is scale-free.
    scale = math.sqrt(sum(v.numel() for v in vs))
    norm = math.sqrt(sum(float((v * v).sum()) for v in vs))
    vs = [v * (scale / norm) for v in vs]
    eig, i = None, 0
    op = operator or HessianOperator(loss_fn, params)
    for i in tqdm(range(iters), desc="power iteration", disable=not progress):
        hv = op(vs)
        new = sum(float((h * v).sum()) for h, v in zip(hv, vs)) / scale ** 2
        norm = math.sqrt(sum(float((h * h).sum()) for h in hv))
        vs = [h * (scale / (norm + 1e-12)) for h in hv]
        if eig is not None and abs(new - eig) / (abs(eig) + 1e-6) < tol:
            return new, i + 1
        eig = new
    return eig, i + 1


def fisher_diagonal(model, windows: torch.Tensor, modules: dict[str, torch.nn.Module],
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: mean over windows of the squared per-window gradient, [out, in]."""
    return {n: g2 for n, (_, g2) in gradient_moments(model, windows, modules, progress).items()}


# --------------------------------------------------------------------------- super weights


def verify_super_weights(model, tokenizer, ids: torch.Tensor, candidates: list[SuperWeight],
                         eval_config: EvalConfig) -> float:
    """Fill each candidate's ``ppl_ratio`` (perplexity with it alone zeroed / clean). Returns clean ppl."""
    cfg = eval_config.scoring_only()
    clean = evaluate_model(model, tokenizer, ids, cfg).perplexity
    for sw in candidates:
        name = sw.module + ".weight"
        with V.restored_on_exit(model, [name]):
            with torch.no_grad():
                LM.weight_view(model.get_submodule(sw.module))[sw.row, sw.col] = 0
            sw.ppl_ratio = evaluate_model(model, tokenizer, ids, cfg).perplexity / clean
    return clean


# --------------------------------------------------------------------------- quantization


def quantization_study(model, tokenizer, ids: torch.Tensor, super_weights: list[SuperWeight],
                       saliency: dict[str, torch.Tensor], bits: Sequence[int] = (4, 3), group_size: int = 128,
                       top_fraction: float = 0.0005, eval_config: EvalConfig = EvalConfig(),
                       progress: bool = True) -> list[dict]:
    """Perplexity of RTN quantization of all decoder linears: plain, super weights kept,
    super weights + top ``top_fraction`` by saliency kept. The model is restored after each.

    ``saliency``: module name -> [out, in] score. Bits per weight count the codes and per group an
    fp16 scale and a zero of the code's bits; extra storage counts each kept weight as 16 bits of
    value + 32 bits of index, relative to that.
    """

    cfg = eval_config.scoring_only()
    layers = LM.decoder_layers(model)
    names_of = LM.module_names(model)
    mods = {names_of[m]: m for layer in layers for m in LM.block_linears(layer).values()}
    sw_coords = [(sw.module, sw.row, sw.col) for sw in super_weights]
    keep_sw = protect_top_fraction({n: torch.zeros(LM.weight_view(m).shape) for n, m in mods.items()}, 0.0, sw_coords)
    keep_both = protect_top_fraction({n: saliency[n] for n in mods}, top_fraction, sw_coords)
    variants = [("plain", None), ("super weights kept", keep_sw),
                (f"super weights + top {top_fraction:.2%} saliency kept", keep_both)]
    n_weights = sum(LM.weight_view(m).numel() for m in mods.values())
    # Per real group (tail groups included) an fp16 scale and a zero code, as the quantize step counts.
    n_groups = sum(LM.weight_view(m).shape[0] * len(rtn_groups(LM.weight_view(m).shape[1], group_size))
                   for m in mods.values())
    rows = []
    jobs = [(b, v) for b in bits for v in variants]
    for b, (label, keep) in tqdm(jobs, desc="quantization", disable=not progress):
        with V.restored_on_exit(model, [n + ".weight" for n in mods]):
            for n, m in mods.items():
                quantize_rtn_(LM.weight_view(m), b, group_size, keep[n] if keep is not None else None)
            r = evaluate_model(model, tokenizer, ids, cfg)
        kept = int(sum(k.sum() for k in keep.values())) if keep is not None else 0
        base_bits = sum(grid_bits(*LM.weight_view(m).shape, b, group_size) for m in mods.values())  # as quantize counts
        rows.append({"bits": b, "variant": label, "perplexity": r.perplexity, "kept_weights": kept,
                     "groups": n_groups, "bits_per_weight": base_bits / n_weights,
                     "extra_storage_pct": 100 * kept * KEPT_BITS / base_bits})
    return rows


# --------------------------------------------------------------------------- driver


@dataclass
class AnalysisResult:
    modules: list                    # decoder-linear module names, in order
    module_layer: dict               # name -> block index
    module_type: dict                # name -> q_proj/k_proj/...
    hessian_trace: dict
    hessian_trace_stderr: dict
    hessian_total: float
    hessian_total_stderr: float
    hutchinson_probes: int
    top_eigenvalue: float
    power_iterations: int
    fisher_sum: dict                 # name -> sum of the Fisher diagonal
    obd_saliency_sum: dict           # name -> sum of 0.5 * F_ii * w^2
    top_salient: list                # [{module, row, col, saliency, value}]
    super_weights: list              # accepted candidates: ablation ratio >= super_weight_min_ratio
    activation_profile: dict
    clean_perplexity: float
    clean_token_set: str             # what the ablations and the quantization study are scored on
    quantization: list
    super_weights_rejected: list = field(default_factory=list)  # candidates whose ablation did not pass
    hessian_converged: bool = False              # every layer reached rel_stderr before the probe budget
    hessian_layer_trace: list = field(default_factory=list)   # per layer: mean Hutchinson trace
    hessian_layer_stderr: list = field(default_factory=list)  # ... its standard error over probes
    hessian_layer_ci95: list = field(default_factory=list)    # ... [low, high], mean +- 1.96 stderr
    hessian_layer_reliable: list = field(default_factory=list)  # ... stderr <= rel_stderr x |mean|
    hessian_ranking: list = field(default_factory=list)       # layers by trace, tied where intervals overlap
    hessian_layer_per_param: list = field(default_factory=list)  # per layer: trace / number of weights
    hessian_trace_per_param: dict = field(default_factory=dict)  # module -> trace / number of weights
    hessian_module_reliable: dict = field(default_factory=dict)  # module -> stderr <= rel_stderr x |mean|
    layer_totals: dict = field(default_factory=dict)      # hessian_trace / fisher_sum -> per-layer sums
    top_layers: dict = field(default_factory=dict)        # the same -> 5 largest layers
    rank_correlation: dict = field(default_factory=dict)  # Spearman between the measures (and the noise map)
    super_weight_layers: list = field(default_factory=list)
    curvature: dict = field(default_factory=dict)         # curvature_summary: what the robustness matrix keeps
    variants: dict = field(default_factory=dict)          # analyse_variants: every variant asked for
    seconds: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)            # the resolved AnalysisConfig


def _hessian(model, mods: dict, mlayer: dict, windows: torch.Tensor, config: AnalysisConfig, secs: dict) -> dict:
    """Hutchinson traces per module (all at once, or one block at a time with ``per_block``),
    probing until every layer's trace is known to ``config.rel_stderr`` (or the probe budget
    runs out), and the top eigenvalue (of all modules, or of the first block). Returns a dict:
    trace, stderr, probes, converged, total variance, per-probe module samples, Hutchinson
    diagonal [out, in] ({} unless saliency="hutchinson"), eigenvalue, power iterations."""
    t = time.perf_counter()
    n_layers = len(LM.decoder_layers(model))
    h = {"trace": {}, "stderr": {}, "samples": {}, "probes": 0, "converged": True, "tot_var": 0.0, "hdiag": {},
         "eig": None, "iters": 0}
    secs["power_iteration"] = 0.0
    with LM.attention_implementation(model, "eager"):
        loss_fn = lm_loss_fn(model, windows)
        groups = [list(mods)] if not config.per_block else [
            [n for n in mods if mlayer[n] == i] for i in range(n_layers)]
        for gi, names in enumerate(groups):
            params = {n: mods[n].weight for n in names}
            with LM.trainable_only(model, list(params.values())):
                # One gradient graph per group serves every probe (and, for the first group,
                # the power iteration too).
                op = HessianOperator(loss_fn, list(params.values()))
                tr = hutchinson_trace(loss_fn, params, config.max_probes, tol=config.tol, seed=config.seed,
                                      keep_diagonal=config.saliency == "hutchinson", progress=config.progress,
                                      operator=op, groups=mlayer if config.rel_stderr > 0 else None,
                                      rel_stderr=config.rel_stderr or None)
                if gi == 0:
                    t_eig = time.perf_counter()
                    h["eig"], h["iters"] = top_eigenvalue(loss_fn, list(params.values()), config.power_iters,
                                                          seed=config.seed, progress=config.progress, operator=op)
                    secs["power_iteration"] = time.perf_counter() - t_eig
                del op
            if tr.diagonal is not None:  # [out, in] like weight_view; Conv1D weights are stored [in, out]
                h["hdiag"].update({n: LM.out_in(mods[n], d) for n, d in tr.diagonal.items()})
            h["trace"].update(tr.trace)
            h["stderr"].update(tr.stderr)
            h["samples"].update(tr.samples)
            h["probes"] = max(h["probes"], tr.probes)
            h["converged"] &= tr.converged
            h["tot_var"] += tr.total_stderr ** 2
    secs["hutchinson"] = time.perf_counter() - t - secs["power_iteration"]
    return h


def interval_ranking(means: Sequence[float], halfwidths: Sequence[float]) -> list[list[int]]:
    """Indices by decreasing mean, grouped where the intervals mean +- halfwidth do not separate:
    a new group starts only when an interval lies wholly below every interval of the group above."""
    order = sorted(range(len(means)), key=lambda i: -means[i])
    out: list[list[int]] = []
    floor = math.inf
    for i in order:
        if out and means[i] + halfwidths[i] >= floor:
            out[-1].append(i)
            floor = min(floor, means[i] - halfwidths[i])
        else:
            out.append([i])
            floor = means[i] - halfwidths[i]
    return out


def _layer_intervals(h: dict, mlayer: dict, mods: dict, rel_target: float) -> dict:
    """Per-layer Hessian trace (sum of its modules, per probe), standard error, 95% interval,
    reliability, the interval ranking, and each module's trace per parameter."""
    n_layers = max(mlayer.values()) + 1
    per_layer = [[0.0] * len(next(iter(h["samples"].values()))) for _ in range(n_layers)]
    for n, xs in h["samples"].items():
        per_layer[mlayer[n]] = [a + b for a, b in zip(per_layer[mlayer[n]], xs)]
    mean = [sum(xs) / len(xs) for xs in per_layer]
    se = [stderr_of(xs) for xs in per_layer]
    numel = [0] * n_layers
    for n, m in mods.items():
        numel[mlayer[n]] += m.weight.numel()
    return {"hessian_layer_trace": mean, "hessian_layer_stderr": se,
            "hessian_layer_ci95": [[m - 1.96 * e, m + 1.96 * e] for m, e in zip(mean, se)],
            "hessian_layer_reliable": [rel_stderr_of(xs) <= rel_target for xs in per_layer],
            "hessian_ranking": interval_ranking(mean, [1.96 * e for e in se]),
            "hessian_layer_per_param": [m / k if k else float("nan") for m, k in zip(mean, numel)],
            "hessian_trace_per_param": {n: h["trace"][n] / mods[n].weight.numel() for n in mods},
            "hessian_module_reliable": {n: rel_stderr_of(xs) <= rel_target for n, xs in h["samples"].items()}}


def _setup(model, tokenizer, calib, config: AnalysisConfig) -> tuple:
    """What the live model's analysis and every variant's share: the config resolved for the model,
    the analysed linears (name -> module, block index, path inside the block), the Hessian's
    calibration windows and the evaluation config of ablations and quantization."""
    config = config.for_model(model)
    if config.per_block is None:  # 7B: one block's Hessian graph at a time fits where all do not
        config = replace(config, per_block=sum(p.numel() for p in model.parameters()) > 3e9)
    names_of = LM.module_names(model)
    mods, mlayer, mtype = {}, {}, {}
    for i, layer in enumerate(LM.decoder_layers(model)):
        for rel, m in LM.block_linears(layer).items():
            n = names_of[m]
            mods[n], mlayer[n], mtype[n] = m, i, rel  # path inside the block, as in the noise map
    windows = D.calibration_windows(tokenizer, calib, config.calib_windows, config.calib_seq_len, config.seed)
    ecfg = EvalConfig(seq_len=min(config.eval_seq_len, config.eval_tokens), eval_tokens=config.eval_tokens,
                      batch_size=config.batch_size, seed=config.seed)
    return config, mods, mlayer, mtype, windows, ecfg


def curvature_summary(h: dict, mlayer: dict, mods: dict, rel_target: float) -> dict:
    """What the robustness matrix keeps of ``_hessian``'s result: the total Hutchinson trace with its
    per-probe samples and Student-t 95% interval over probes, the per-layer traces and intervals,
    and the top eigenvalue. Probes are drawn from the same seed on every variant (common random
    numbers), so the first k probes of two variants are the same vectors and pair."""
    li = _layer_intervals(h, mlayer, mods, rel_target)
    k = min(len(xs) for xs in h["samples"].values())
    totals = [sum(xs[i] for xs in h["samples"].values()) for i in range(k)]
    return {"trace_total": sum(h["trace"].values()), "trace_total_stderr": math.sqrt(h["tot_var"]),
            "trace_total_ci95": list(ST.mean_interval(totals)), "trace_total_samples": totals,
            "layer_trace": li["hessian_layer_trace"], "layer_ci95": li["hessian_layer_ci95"],
            "top_eigenvalue": h["eig"], "power_iterations": h["iters"], "probes": h["probes"],
            "converged": h["converged"], "interval": "Student-t 95% over Hutchinson probes"}


def super_weight_status(value: float, parent_value: Optional[float]) -> dict:
    """A super weight in a variant against its parent: intact (bit-equal), pruned (zero where the
    parent's is not), or moved (changed, e.g. by quantization or noise), with the relative change."""
    if parent_value is None:  # a root variant: nothing to compare with
        return {"status": "reference", "value": value, "parent_value": None, "relative_change": None}
    if value == parent_value:
        return {"status": "intact", "value": value, "parent_value": parent_value, "relative_change": 0.0}
    rel = (value - parent_value) / abs(parent_value) if parent_value else float("inf")
    return {"status": "pruned" if value == 0 else "moved", "value": value, "parent_value": parent_value,
            "relative_change": rel}


def analyse_variants(model, tokenizer, calib, eval_ids: torch.Tensor, variants: dict, parents: dict, pool: dict,
                     config: AnalysisConfig, super_weights: Sequence[dict], live: Optional[tuple] = None) -> dict:
    """Curvature and super weights of every variant in ``variants`` ({name: weights}, applied in
    place one at a time and restored bit for bit; ``pool`` holds every variant of the run, for
    the parents' values): the Hutchinson trace (total and per layer, with intervals) and top
    eigenvalue on the same calibration windows and probes as the live model's analysis, and for
    each of ``super_weights`` (found on the live model) its status against the parent's value
    and, where it is still non-zero, its ablation effect on this variant (perplexity with it
    zeroed / without, on the analysis's evaluation tokens). ``live``: (name, its curvature
    summary) already measured. Under torchrun the ranks take disjoint variants."""
    config, mods, mlayer, _, windows, ecfg = _setup(model, tokenizer, calib, config)
    coords = [(sw["module"], sw["row"], sw["col"]) for sw in super_weights]

    def values() -> list:
        return [float(LM.weight_view(model.get_submodule(m)).detach()[r, c]) for m, r, c in coords]

    wanted = list(dict.fromkeys([*variants, *(parents.get(n) for n in variants if parents.get(n) in pool)]))
    mine = []
    for i, name in C.shard_jobs(wanted):
        with V.applied_variant(model, pool[name]):
            row = {"values": values()}
            if name in variants:
                if live and name == live[0]:
                    row["curvature"] = live[1]
                else:
                    C.seed_everything(config.seed)
                    row["curvature"] = curvature_summary(_hessian(model, mods, mlayer, windows, config, {}),
                                                         mlayer, mods, config.rel_stderr)
                present = [SuperWeight(mlayer[m], m, r, c, v, 0.0, 0.0) for (m, r, c), v in zip(coords, row["values"])
                           if v != 0]
                if live and name == live[0]:  # the live model's analysis measured these ablations already
                    full = {(f["module"], f["row"], f["col"]): f.get("ppl_ratio") for f in super_weights}
                    for sw in present:
                        sw.ppl_ratio = full.get((sw.module, sw.row, sw.col))
                elif present:
                    verify_super_weights(model, tokenizer, eval_ids, present, ecfg)
                row["ablation"] = {f"{sw.module}[{sw.row},{sw.col}]": sw.ppl_ratio for sw in present}
        mine.append((i, row))
    got = dict(zip(wanted, C.gather_jobs(mine)))
    out = {}
    for name in variants:
        par = parents.get(name)
        ref = got.get(par, {}).get("values") if par in got else None
        sws = []
        for j, (m, r, c) in enumerate(coords):
            key = f"{m}[{r},{c}]"
            st = super_weight_status(got[name]["values"][j], ref[j] if ref else None)
            sws.append({"weight": key, "layer": mlayer[m], **st, "ablation_ppl_ratio": got[name]["ablation"].get(key)})
        row = {"parent": par, "curvature": got[name]["curvature"], "super_weights": sws,
               "super_weights_kept": sum(s["status"] != "pruned" for s in sws),
               "super_weights_intact": sum(s["status"] == "intact" for s in sws)}
        out[name] = row
    for name, row in out.items():  # paired by Hutchinson probe against the parent
        par = out.get(row["parent"] or "")
        if par:
            a, b = par["curvature"]["trace_total_samples"], row["curvature"]["trace_total_samples"]
            k = min(len(a), len(b))
            row["vs_parent"] = {"trace_total": ST.paired_difference(a[:k], b[:k], seed=config.seed, units="probes")}
    return out


def _top_salient(obd: dict, mods: dict, k: int = 20) -> list:
    """The ``k`` weights of largest OBD saliency over all modules, with their coordinates."""
    flat = torch.cat([obd[n].flatten().cpu() for n in mods])
    offsets, top = [0], []
    for n in mods:
        offsets.append(offsets[-1] + obd[n].numel())
    for idx in torch.topk(flat, min(k, flat.numel())).indices.tolist():
        j = max(i for i in range(len(mods)) if offsets[i] <= idx)
        n = list(mods)[j]
        r, c = divmod(idx - offsets[j], obd[n].shape[1])
        top.append({"module": n, "row": r, "col": c, "saliency": float(flat[idx]),
                    "value": float(LM.weight_view(mods[n])[r, c].detach())})
    return top


def layerwise(res: AnalysisResult, noise_map: Optional[dict] = None) -> None:
    """Fill the per-layer sums, the top layers and the rank correlations between the Hessian
    trace, the Fisher sum and (given the noise step's map) the noise sensitivity per cell."""
    n_layers = max(res.module_layer.values()) + 1
    res.layer_totals = {k: [0.0] * n_layers for k in ("hessian_trace", "fisher_sum")}
    for k, totals in res.layer_totals.items():
        for n, v in getattr(res, k).items():
            totals[res.module_layer[n]] += v
    res.top_layers = {k: sorted(range(n_layers), key=lambda i: -v[i])[:5] for k, v in res.layer_totals.items()}
    cells = list(res.modules)
    h, f = [res.hessian_trace[n] for n in cells], [res.fisher_sum[n] for n in cells]
    res.rank_correlation = {"hessian_vs_fisher": spearman(h, f)}
    if noise_map:
        grid = {(i, m): noise_map["delta_nll"][i][j] for i in noise_map["layers"]
                for j, m in enumerate(noise_map["modules"])}
        nz = [float(grid.get((res.module_layer[n], res.module_type[n]), float("nan"))) for n in cells]
        res.rank_correlation["hessian_vs_noise"] = spearman(h, nz)
        res.rank_correlation["fisher_vs_noise"] = spearman(f, nz)
    res.super_weight_layers = sorted({sw["layer"] for sw in res.super_weights})


def run_integrated_analysis(model, tokenizer, calib: "D.Corpus | torch.Tensor", eval_ids: torch.Tensor,
                            config: AnalysisConfig = AnalysisConfig(), noise_map: Optional[dict] = None,
                            variants: Optional[dict] = None, parents: Optional[dict] = None,
                            pool: Optional[dict] = None) -> AnalysisResult:
    """Hessian traces and top eigenvalue, Fisher/OBD saliency, super weights, the
    sensitivity-guided quantization study and the layer-wise comparison (with the noise
    step's ``noise_map`` when given). ``calib`` is a corpus or its token ids [n_tokens] (windows
    drawn as ``D.calibration_windows``); ``eval_ids`` are [n_tokens]. With ``variants`` ({name:
    weights}, None for the model as it is; ``parents``: {name: parent}; ``pool``: where the
    parents' weights are, default ``variants``) also their curvature and super weights
    (``analyse_variants``), in ``.variants``. The model's weights are unchanged on return."""
    config, mods, mlayer, mtype, windows, ecfg = _setup(model, tokenizer, calib, config)
    C.seed_everything(config.seed)
    secs = {}
    h = _hessian(model, mods, mlayer, windows, config, secs)
    trace, hdiag = h["trace"], h["hdiag"]

    t = time.perf_counter()
    fwin = D.calibration_windows(tokenizer, calib, config.fisher_windows, config.calib_seq_len, config.seed + 1)
    fisher = fisher_diagonal(model, fwin, mods, config.progress)
    h_ii = hdiag if config.saliency == "hutchinson" else fisher
    obd = {n: 0.5 * h_ii[n] * LM.weight_view(m).detach().float().pow(2) for n, m in mods.items()}
    secs["fisher"] = time.perf_counter() - t
    top = _top_salient(obd, mods)

    t = time.perf_counter()
    sws, profile = detect_super_weights(model, tokenizer, config.super_weight_prompt, config.max_super_weights)
    clean = verify_super_weights(model, tokenizer, eval_ids, sws, ecfg)
    # A candidate is a super weight only if zeroing it alone hurts: Yu et al. see perplexity
    # multiply by 100s on Llama-7B; the late spikes that cancel the massive activation do nothing.
    rejected = [sw for sw in sws if not sw.ppl_ratio >= config.super_weight_min_ratio]
    sws = [sw for sw in sws if sw.ppl_ratio >= config.super_weight_min_ratio]
    secs["super_weights"] = time.perf_counter() - t

    t = time.perf_counter()
    quant = quantization_study(model, tokenizer, eval_ids, sws, obd, config.quant_bits, config.quant_group,
                               config.quant_top_fraction, ecfg, config.progress)
    secs["quantization"] = time.perf_counter() - t
    res = AnalysisResult(
        modules=list(mods), module_layer=mlayer, module_type=mtype, hessian_trace=trace,
        hessian_trace_stderr=h["stderr"], hessian_total=sum(trace.values()),
        hessian_total_stderr=math.sqrt(h["tot_var"]), hutchinson_probes=h["probes"], top_eigenvalue=h["eig"],
        power_iterations=h["iters"], hessian_converged=h["converged"],
        **_layer_intervals(h, mlayer, mods, config.rel_stderr),
        fisher_sum={n: float(f.sum()) for n, f in fisher.items()},
        obd_saliency_sum={n: float(o.sum()) for n, o in obd.items()}, top_salient=top,
        super_weights=[sw.__dict__ for sw in sws], super_weights_rejected=[sw.__dict__ for sw in rejected],
        activation_profile=profile, clean_perplexity=clean, clean_token_set=token_set(eval_ids.numel(), ecfg),
        quantization=quant, curvature=curvature_summary(h, mlayer, mods, config.rel_stderr), seconds=secs,
        config=asdict(config))
    layerwise(res, noise_map)
    if variants:
        t = time.perf_counter()
        live = next((n for n, w in variants.items() if w is None), None)
        res.variants = analyse_variants(model, tokenizer, calib, eval_ids, variants, parents or {}, pool or variants,
                                        config, res.super_weights, (live, res.curvature) if live else None)
        secs["variants"] = time.perf_counter() - t
    return res


# --------------------------------------------------------------------------- layer-wise picture


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties), ignoring non-finite pairs."""
    pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return float("nan")

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va and vb else float("nan")


def pipeline_step(run: Run, config: AnalysisConfig) -> None:
    """The pipeline's analysis of the live model (the noise step's map, when there is one, is
    compared with the Hessian per cell), then the curvature and super weights of every chosen
    variant (``--robustness-variants``)."""
    noise_map = (run.results.get("noise") or {}).get("map")
    run.results["analysis"] = asdict(run_integrated_analysis(
        run.model, run.tokenizer, run.texts["train"], run.ids("eval"), config, noise_map,
        variants=run.chosen(config.variants), parents=run.parents, pool=run.variants))
