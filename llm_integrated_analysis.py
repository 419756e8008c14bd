"""Step 6: Hessian sensitivity, super weights, and quantization guided by them.

Hessian (PyHessian-style, on the LM loss over calibration windows):
    hvp                 Hessian-vector product by double backward (eager attention, since
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
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

import llm_common as C
from llm_config import AnalysisConfig, EvalConfig
from llm_perplexity import evaluate_model, token_set
from llm_sensitivity import SuperWeight, detect_super_weights, gradient_moments, protect_top_fraction

log = logging.getLogger("llm.analysis")


# --------------------------------------------------------------------------- Hessian


def lm_loss_fn(model, windows: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Closure: mean token cross-entropy over windows [n, seq_len], in one batched forward
    (equal-length windows, so the token mean equals the mean of the per-window means). The
    forward runs in eval mode (no dropout: every Hessian product sees one function), and the
    model is left in the mode the caller had."""
    dev = C.input_device(model)

    def loss():
        w = windows.to(dev)
        with C.eval_mode(model):
            return model(input_ids=w, labels=w, use_cache=False).loss.float().to(dev)

    return loss


class HessianOperator:
    """v -> H v for the Hessian of ``loss_fn()`` w.r.t. ``params``, by double backward.

    The forward pass and the first backward (with ``create_graph``) run once, when the
    operator is built; every product is then one more backward through that retained
    graph, so a Hutchinson probe or power iteration costs about one backward of the
    gradient graph instead of a fresh forward + backward + double backward each time.
    Memory: the graph of the first-order gradient stays alive until the operator is freed.
    """

    def __init__(self, loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]):
        self.params = list(params)
        self.grads = torch.autograd.grad(loss_fn(), self.params, create_graph=True)

    def __call__(self, vs: Sequence[torch.Tensor]) -> list:
        dot = sum((g.float() * v.float()).sum() for g, v in zip(self.grads, vs))
        return [h.detach() for h in torch.autograd.grad(dot, self.params, retain_graph=True)]


def hvp(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], vs: Sequence[torch.Tensor]):
    """One H v for the Hessian of loss_fn() w.r.t. ``params``. Returns a list like vs."""
    return HessianOperator(loss_fn, params)(vs)


@dataclass
class TraceResult:
    trace: dict            # module name -> mean Hutchinson estimate of tr(H_module)
    stderr: dict           # module name -> standard error of that mean
    total: float
    total_stderr: float
    probes: int
    converged: bool
    diagonal: Optional[dict] = None  # name -> E[v * Hv] (Hutchinson diagonal), [out, in]
    seconds: float = 0.0
    samples: dict = field(default_factory=dict)  # name -> the per-probe estimates


def _rel_stderr(xs: Sequence[float]) -> float:
    """Standard error of the mean over |mean| (inf for fewer than 2 samples or a zero mean)."""
    m = sum(xs) / len(xs)
    return _stderr(xs) / abs(m) if len(xs) > 1 and m else math.inf


def hutchinson_trace(loss_fn, named_params: dict[str, torch.Tensor], max_probes: int = 50, min_probes: int = 3,
                     tol: float = 1e-2, seed: int = 0, keep_diagonal: bool = False,
                     progress: bool = True, operator: Optional[HessianOperator] = None,
                     groups: Optional[dict] = None, rel_stderr: Optional[float] = None) -> TraceResult:
    """Hutchinson estimate of tr(H) per named parameter, sharing one probe across all of them.

    Stopping, after at least ``min_probes``: with ``groups`` (name -> group, e.g. its layer) and
    ``rel_stderr``, when every group's summed trace has a standard error of at most
    ``rel_stderr`` x |its mean| (adaptive: precise enough to compare layers); otherwise when
    |mean_k - mean_{k-1}| / (|mean_{k-1}| + 1e-6) < tol for the total trace (the PyHessian
    criterion, with the absolute value). ``max_probes`` caps both; ``converged`` says which.
    """
    t0 = time.perf_counter()
    names = list(named_params)
    params = [named_params[n] for n in names]
    g = torch.Generator().manual_seed(seed)
    samples = {n: [] for n in names}
    diag = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named_params.items()} if keep_diagonal else None
    prev, converged, k = None, False, 0
    op = operator or HessianOperator(loss_fn, params)  # a given operator must be over ``params``
    bar = tqdm(range(max_probes), desc="hutchinson", disable=not progress)
    for k in bar:
        vs = [(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p.device, torch.float32) for p in params]
        hv = op(vs)
        per_module = torch.stack([(v * h.float()).sum().to(vs[0].device) for v, h in zip(vs, hv)]).tolist()
        for n, v, h, x in zip(names, vs, hv, per_module):
            samples[n].append(x)
            if diag is not None:
                diag[n] += v * h.float()
        del hv
        total = sum(sum(s) / len(s) for s in samples.values())
        bar.set_postfix(trace=f"{total:.4g}")
        if k + 1 >= min_probes:
            if groups is not None and rel_stderr is not None:
                sums = {}
                for n in names:
                    sums.setdefault(groups[n], [0.0] * (k + 1))
                    sums[groups[n]] = [a + b for a, b in zip(sums[groups[n]], samples[n])]
                converged = max(_rel_stderr(v) for v in sums.values()) <= rel_stderr
            else:
                converged = prev is not None and abs(total - prev) / (abs(prev) + 1e-6) < tol
            if converged:
                break
        prev = total
    del op  # frees the retained gradient graph
    n_probes = k + 1
    trace = {n: sum(s) / len(s) for n, s in samples.items()}
    stderr = {n: _stderr(s) for n, s in samples.items()}
    per_probe_total = [sum(samples[n][i] for n in names) for i in range(n_probes)]
    if diag is not None:
        diag = {n: d / n_probes for n, d in diag.items()}
    return TraceResult(trace, stderr, sum(trace.values()), _stderr(per_probe_total), n_probes, converged, diag,
                       time.perf_counter() - t0, samples)


def _stderr(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return float("inf")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def top_eigenvalue(loss_fn, params: Sequence[torch.Tensor], iters: int = 20, tol: float = 1e-3,
                   seed: int = 0, progress: bool = True,
                   operator: Optional[HessianOperator] = None) -> tuple[float, int]:
    """Largest-magnitude Hessian eigenvalue by power iteration. Returns (eigenvalue, iterations)."""
    g = torch.Generator().manual_seed(seed)
    vs = [torch.randn(p.shape, generator=g).to(p.device) for p in params]
    norm = math.sqrt(sum(float((v * v).sum()) for v in vs))
    vs = [v / norm for v in vs]
    eig, i = None, 0
    op = operator or HessianOperator(loss_fn, params)
    for i in tqdm(range(iters), desc="power iteration", disable=not progress):
        hv = op(vs)
        new = sum(float((h * v).sum()) for h, v in zip(hv, vs))
        norm = math.sqrt(sum(float((h * h).sum()) for h in hv))
        vs = [h / (norm + 1e-12) for h in hv]
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
    cfg = EvalConfig(**{**eval_config.__dict__, "max_new_tokens": 0, "progress": False})
    clean = evaluate_model(model, tokenizer, ids, cfg).perplexity
    for sw in candidates:
        name = sw.module + ".weight"
        with C.restored_on_exit(model, [name]):
            with torch.no_grad():
                C.weight_view(model.get_submodule(sw.module))[sw.row, sw.col] = 0
            sw.ppl_ratio = evaluate_model(model, tokenizer, ids, cfg).perplexity / clean
    return clean


# --------------------------------------------------------------------------- quantization


def rtn_groups(in_features: int, group_size: int) -> list[tuple[int, int]]:
    """Column ranges [start, end) of RTN groups: ``group_size`` consecutive input columns, and
    one narrower tail group when the width is not a multiple (576 = 4 x 128 + 64)."""
    return [(s, min(s + group_size, in_features)) for s in range(0, in_features, group_size)]


@torch.no_grad()
def quantize_rtn_(W: torch.Tensor, bits: int, group_size: int = 128, keep: Optional[torch.Tensor] = None) -> None:
    """Round-to-nearest asymmetric group quantization of W [out, in], in place.

    Groups are ``group_size`` consecutive input columns of a row (see ``rtn_groups``: the last
    group is narrower when ``in`` is not a multiple). The range of each group includes 0.
    Weights in ``keep`` are excluded from their group's min/max and left in full precision
    (dense-and-sparse).
    """
    out, inp = W.shape
    gs = min(group_size, inp)
    full = inp // gs * gs
    parts = [(0, full, gs)] + ([(full, inp, inp - full)] if full < inp else [])
    big = torch.finfo(torch.float32).max
    qmax = 2 ** bits - 1
    for start, end, width in parts:  # the whole groups in one reshape, then the tail group
        Wf = W[:, start:end].float().reshape(out, -1, width)
        K = keep[:, start:end].reshape(out, -1, width).to(W.device) if keep is not None else None
        lo = (torch.where(K, big, Wf) if K is not None else Wf).amin(-1, keepdim=True)
        hi = (torch.where(K, -big, Wf) if K is not None else Wf).amax(-1, keepdim=True)
        lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
        scale = ((hi - lo) / qmax).clamp(min=1e-10)
        zero = torch.round(-lo / scale)
        q = (torch.clamp(torch.round(Wf / scale) + zero, 0, qmax) - zero) * scale
        if K is not None:
            q = torch.where(K, Wf, q)
        W[:, start:end] = q.reshape(out, end - start).to(W.dtype)


def quantization_study(model, tokenizer, ids: torch.Tensor, super_weights: list[SuperWeight],
                       saliency: dict[str, torch.Tensor], bits: Sequence[int] = (4, 3), group_size: int = 128,
                       top_fraction: float = 0.0005, eval_config: EvalConfig = EvalConfig(),
                       progress: bool = True) -> list[dict]:
    """Perplexity of RTN quantization of all decoder linears: plain, super weights kept,
    super weights + top ``top_fraction`` by saliency kept. The model is restored after each.

    ``saliency``: module name -> [out, in] score. Extra storage counts each kept weight as
    16 bits of value + 32 bits of index, relative to the quantized size.
    """

    cfg = EvalConfig(**{**eval_config.__dict__, "max_new_tokens": 0, "progress": False})
    layers = C.decoder_layers(model)
    names_of = {m: n for n, m in model.named_modules()}
    mods = {names_of[m]: m for layer in layers for m in C.block_linears(layer).values()}
    sw_coords = [(sw.module, sw.row, sw.col) for sw in super_weights]
    keep_sw = protect_top_fraction({n: torch.zeros(C.weight_view(m).shape) for n, m in mods.items()}, 0.0, sw_coords)
    keep_both = protect_top_fraction({n: saliency[n] for n in mods}, top_fraction, sw_coords)
    variants = [("plain", None), ("super weights kept", keep_sw),
                (f"super weights + top {top_fraction:.2%} saliency kept", keep_both)]
    n_weights = sum(C.weight_view(m).numel() for m in mods.values())
    # One fp16 scale and one fp16 zero per real group (tail groups included).
    n_groups = sum(C.weight_view(m).shape[0] * len(rtn_groups(C.weight_view(m).shape[1], group_size))
                   for m in mods.values())
    rows = []
    jobs = [(b, v) for b in bits for v in variants]
    for b, (label, keep) in tqdm(jobs, desc="quantization", disable=not progress):
        with C.restored_on_exit(model, [n + ".weight" for n in mods]):
            for n, m in mods.items():
                quantize_rtn_(C.weight_view(m), b, group_size, keep[n] if keep is not None else None)
            r = evaluate_model(model, tokenizer, ids, cfg)
        kept = int(sum(k.sum() for k in keep.values())) if keep is not None else 0
        base_bits = n_weights * b + n_groups * 32  # codes + fp16 scale and zero per group
        rows.append({"bits": b, "variant": label, "perplexity": r.perplexity, "kept_weights": kept,
                     "groups": n_groups, "bits_per_weight": base_bits / n_weights,
                     "extra_storage_pct": 100 * kept * 48 / base_bits})
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
    seconds: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)            # the resolved AnalysisConfig


def _hessian(model, mods: dict, mlayer: dict, windows: torch.Tensor, config: AnalysisConfig, secs: dict) -> dict:
    """Hutchinson traces per module (all at once, or one block at a time with ``per_block``),
    probing until every layer's trace is known to ``config.rel_stderr`` (or the probe budget
    runs out), and the top eigenvalue (of all modules, or of the first block). Returns a dict:
    trace, stderr, probes, converged, total variance, per-probe module samples, Hutchinson
    diagonal [out, in] ({} unless saliency="hutchinson"), eigenvalue, power iterations."""
    t = time.perf_counter()
    n_layers = len(C.decoder_layers(model))
    h = {"trace": {}, "stderr": {}, "samples": {}, "probes": 0, "converged": True, "tot_var": 0.0, "hdiag": {},
         "eig": None, "iters": 0}
    secs["power_iteration"] = 0.0
    with C.attention_implementation(model, "eager"):
        loss_fn = lm_loss_fn(model, windows)
        groups = [list(mods)] if not config.per_block else [
            [n for n in mods if mlayer[n] == i] for i in range(n_layers)]
        for gi, names in enumerate(groups):
            params = {n: mods[n].weight for n in names}
            with C.trainable_only(model, list(params.values())):
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
                h["hdiag"].update({n: C.out_in(mods[n], d) for n, d in tr.diagonal.items()})
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
    se = [_stderr(xs) for xs in per_layer]
    numel = [0] * n_layers
    for n, m in mods.items():
        numel[mlayer[n]] += m.weight.numel()
    return {"hessian_layer_trace": mean, "hessian_layer_stderr": se,
            "hessian_layer_ci95": [[m - 1.96 * e, m + 1.96 * e] for m, e in zip(mean, se)],
            "hessian_layer_reliable": [_rel_stderr(xs) <= rel_target for xs in per_layer],
            "hessian_ranking": interval_ranking(mean, [1.96 * e for e in se]),
            "hessian_layer_per_param": [m / k if k else float("nan") for m, k in zip(mean, numel)],
            "hessian_trace_per_param": {n: h["trace"][n] / mods[n].weight.numel() for n in mods},
            "hessian_module_reliable": {n: _rel_stderr(xs) <= rel_target for n, xs in h["samples"].items()}}


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
                    "value": float(C.weight_view(mods[n])[r, c].detach())})
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


def run_integrated_analysis(model, tokenizer, calib: "C.Corpus | torch.Tensor", eval_ids: torch.Tensor,
                            config: AnalysisConfig = AnalysisConfig(), noise_map: Optional[dict] = None
                            ) -> AnalysisResult:
    """Hessian traces and top eigenvalue, Fisher/OBD saliency, super weights, the
    sensitivity-guided quantization study and the layer-wise comparison (with the noise
    step's ``noise_map`` when given). ``calib`` is a corpus or its token ids [n_tokens] (windows
    drawn as ``C.calibration_windows``); ``eval_ids`` are [n_tokens].
    The model's weights are unchanged on return."""
    config = config.for_model(model)
    if config.per_block is None:  # 7B: one block's Hessian graph at a time fits where all do not
        config = replace(config, per_block=sum(p.numel() for p in model.parameters()) > 3e9)
    C.seed_everything(config.seed)
    secs = {}
    names_of = {m: n for n, m in model.named_modules()}
    mods, mlayer, mtype = {}, {}, {}
    for i, layer in enumerate(C.decoder_layers(model)):
        for rel, m in C.block_linears(layer).items():
            n = names_of[m]
            mods[n], mlayer[n], mtype[n] = m, i, rel  # path inside the block, as in the noise map
    windows = C.calibration_windows(tokenizer, calib, config.calib_windows, config.calib_seq_len, config.seed)
    h = _hessian(model, mods, mlayer, windows, config, secs)
    trace, hdiag = h["trace"], h["hdiag"]

    t = time.perf_counter()
    fwin = C.calibration_windows(tokenizer, calib, config.fisher_windows, config.calib_seq_len, config.seed + 1)
    fisher = fisher_diagonal(model, fwin, mods, config.progress)
    h_ii = hdiag if config.saliency == "hutchinson" else fisher
    obd = {n: 0.5 * h_ii[n] * C.weight_view(m).detach().float().pow(2) for n, m in mods.items()}
    secs["fisher"] = time.perf_counter() - t
    top = _top_salient(obd, mods)

    t = time.perf_counter()
    ecfg = EvalConfig(seq_len=min(config.eval_seq_len, config.eval_tokens), eval_tokens=config.eval_tokens,
                      batch_size=config.batch_size)
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
        quantization=quant, seconds=secs, config=asdict(config))
    layerwise(res, noise_map)
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
