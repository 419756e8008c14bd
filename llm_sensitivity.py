"""Shared sensitivity math: per-window gradient moments, saliency scores, protection masks,
and the data-free super-weight detector.

Pruning (Taylor/Fisher scores), the noise step (protecting the most salient weights) and the
integrated analysis (Fisher/OBD, quantization that keeps salient weights) all rank weights
by these scores; pruning and noise protect super weights that the analysis also reports. So
they live here, in one place, rather than in any one step module.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from tqdm.auto import tqdm

import llm_common as C
import llm_model as LM
import llm_variants as V


def gradient_moments(model, windows: torch.Tensor, names: dict[str, torch.nn.Module], progress: bool = True):
    """Per-window gradients of the mean LM loss for the weights of ``names``.

    Returns {name: (mean g, mean g^2)}, each [out, in] in float32, averaged over the
    windows [n, seq_len]; each window is one sample. Only these weights get gradients,
    and their ``requires_grad`` flags are restored afterwards.
    """
    acc = {n: [torch.zeros(LM.weight_view(m).shape, dtype=torch.float32, device=m.weight.device),
               torch.zeros(LM.weight_view(m).shape, dtype=torch.float32, device=m.weight.device)]
           for n, m in names.items()}
    dev = LM.input_device(model)
    with LM.trainable_only(model, [m.weight for m in names.values()]):
        for w in tqdm(windows, desc="gradients", disable=not progress or len(windows) < 4):
            w = w[None].to(dev)
            model(input_ids=w, labels=w, use_cache=False).loss.backward()
            for n, m in names.items():
                g = LM.out_in(m, m.weight.grad).float()
                acc[n][0] += g
                acc[n][1] += g.pow(2)
                m.weight.grad = None
    n = len(windows)
    return {k: (a / n, b / n) for k, (a, b) in acc.items()}


def saliency_scores(model, windows, names: dict[str, torch.nn.Module], score: str = "fisher", progress: bool = True):
    """Per-weight saliency [out, in] from gradients of the LM loss on calibration windows.

    "taylor": |w * mean(g)|; "fisher": w^2 * mean(g^2) (diagonal-Fisher OBD saliency).
    """
    moments = gradient_moments(model, windows, names, progress)
    out = {}
    for name, (g1, g2) in moments.items():
        w = LM.weight_view(names[name]).detach().float()
        out[name] = w.pow(2) * g2 if score == "fisher" else (w * g1).abs()
    return out


def noise_saliency(model, windows, names: dict[str, torch.nn.Module], mode: str, progress: bool = True):
    """Expected loss increase per weight [out, in] under weight noise of ``mode``, up to the
    common factor eps^2 / 2: the diagonal-Fisher estimate 0.5 F_ii sigma_i^2 with
    sigma_i = eps (absolute), eps * std(W) of the tensor (relative), eps * |w_i|
    (multiplicative; also used for bit flips, whose damage scales with the value). For the
    additive modes this ranks by F and not by w^2 F: a small weight hit by noise of fixed
    size hurts as much as a large one with the same curvature."""
    moments = gradient_moments(model, windows, names, progress)
    out = {}
    for name, (_, g2) in moments.items():
        w = LM.weight_view(names[name]).detach().float()
        if mode == "absolute":
            out[name] = g2
        elif mode == "relative":
            out[name] = g2 * w.std().pow(2)
        else:
            out[name] = g2 * w.pow(2)
    return out


def protect_top_fraction(scores: Mapping[str, torch.Tensor], fraction: float,
                         coords: Sequence[tuple[str, int, int]] = ()) -> dict[str, torch.Tensor]:
    """Bool masks keeping the top ``fraction`` of weights by score (global ranking) plus
    explicit (parameter name, row, col) coordinates such as super weights."""
    masks = {n: torch.zeros(s.shape, dtype=torch.bool) for n, s in scores.items()}
    if fraction > 0 and scores:
        flat = torch.cat([s.detach().float().flatten().cpu() for s in scores.values()])
        k = max(1, int(flat.numel() * fraction))
        thresh = torch.topk(flat, k).values[-1]
        for n, s in scores.items():
            masks[n] = s.detach().float().cpu() >= thresh
    for name, r, c in coords:
        if name not in masks:
            continue
        masks[name][r, c] = True
    return masks


# --------------------------------------------------------------------------- Hessian (Hutchinson, PyHessian-style)


def lm_loss_fn(model, windows: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Closure: mean token cross-entropy over windows [n, seq_len], in one batched forward
    (equal-length windows, so the token mean equals the mean of the per-window means). The
    forward runs in eval mode (no dropout: every Hessian product sees one function), and the
    model is left in the mode the caller had."""
    dev = LM.input_device(model)

    def loss():
        w = windows.to(dev)
        with LM.eval_mode(model):
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


def rel_stderr_of(xs: Sequence[float]) -> float:
    """Standard error of the mean over |mean| (inf for fewer than 2 samples or a zero mean)."""
    m = sum(xs) / len(xs)
    return stderr_of(xs) / abs(m) if len(xs) > 1 and m else math.inf


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
        # Rademacher probes drawn as float32 directly: the same values as an int64 draw, a third of the cost.
        vs = [torch.randint(0, 2, p.shape, generator=g, dtype=torch.float32).mul_(2).sub_(1).to(p.device)
              for p in params]
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
                converged = max(rel_stderr_of(v) for v in sums.values()) <= rel_stderr
            else:
                converged = prev is not None and abs(total - prev) / (abs(prev) + 1e-6) < tol
            if converged:
                break
        prev = total
    del op  # frees the retained gradient graph
    n_probes = k + 1
    trace = {n: sum(s) / len(s) for n, s in samples.items()}
    stderr = {n: stderr_of(s) for n, s in samples.items()}
    per_probe_total = [sum(samples[n][i] for n in names) for i in range(n_probes)]
    if diag is not None:
        diag = {n: d / n_probes for n, d in diag.items()}
    return TraceResult(trace, stderr, sum(trace.values()), stderr_of(per_probe_total), n_probes, converged, diag,
                       time.perf_counter() - t0, samples)


def stderr_of(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return float("inf")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def fisher_curvature(moments: dict) -> dict[str, float]:
    """Mean diagonal empirical Fisher per weight of each linear, from ``gradient_moments``."""
    return {n: float(g2.sum()) / g2.numel() for n, (_, g2) in moments.items()}


def layer_curvature(model, windows: torch.Tensor, names: dict, kind: str, probes: int = 8, seed: int = 0,
                    progress: bool = False) -> dict[str, float]:
    """Mean diagonal curvature per weight of each named linear (module name -> float): the
    Hutchinson estimate of tr(H_module) / n_weights (``kind="hessian"``, ``probes`` Rademacher
    probes of the LM loss over ``windows`` [n, seq_len], eager attention) or the diagonal
    empirical Fisher sum / n_weights (``kind="fisher"``, per-window squared gradients). What the
    sensitivity-guided allocations (pruning sparsity, quantization bits) rank layers by."""
    if kind == "fisher":
        return fisher_curvature(gradient_moments(model, windows, names, progress))
    params = {n: m.weight for n, m in names.items()}
    with LM.attention_implementation(model, "eager"), LM.trainable_only(model, list(params.values())):
        tr = hutchinson_trace(lm_loss_fn(model, windows), params, max_probes=probes, min_probes=probes, tol=0.0,
                              seed=seed, progress=progress)
    return {n: tr.trace[n] / params[n].numel() for n in names}


# --------------------------------------------------------------------------- super weights (Yu et al. 2024)


@dataclass
class SuperWeight:
    layer: int
    module: str          # module name of the down projection
    row: int             # output channel
    col: int             # input channel
    value: float
    input_abs: float     # |activation| at the down projection input channel
    output_abs: float    # |activation| at the output channel
    ppl_ratio: Optional[float] = None  # perplexity when zeroed alone / clean perplexity


def _down_proj_maxima(model, ids: torch.Tensor):
    """Per layer: (max |input|, input channel, max |output|, output channel) of the MLP down
    projection, and per layer the residual stream's (max |h|, channel)."""
    layers = LM.decoder_layers(model)
    stats, resid, handles = {}, {}, []
    for i, layer in enumerate(layers):
        def hook(mod, args, out, i=i):
            x = args[0].detach().abs().float().reshape(-1, args[0].shape[-1])
            y = out.detach().abs().float().reshape(-1, out.shape[-1])
            xm, ym = x.max(0).values, y.max(0).values
            stats[i] = (float(xm.max()), int(xm.argmax()), float(ym.max()), int(ym.argmax()))

        def rhook(mod, args, out, i=i):
            h = (out[0] if isinstance(out, (tuple, list)) else out).detach().abs().float()
            hm = h.reshape(-1, h.shape[-1]).max(0).values
            resid[i] = (float(hm.max()), int(hm.argmax()))

        handles.append(LM.mlp_down_proj(layer).register_forward_hook(hook))
        handles.append(layer.register_forward_hook(rhook))
    try:
        with torch.no_grad():
            model(input_ids=ids[None].to(LM.input_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [stats[i] for i in range(len(layers))], [resid[i] for i in range(len(layers))]


def detect_super_weights(model, tokenizer, prompt: str = "Apple Inc. is a worldwide tech company.",
                         max_weights: int = 4, spike_factor: float = 10.0) -> tuple[list[SuperWeight], dict]:
    """Data-free super-weight detection (one prompt, iterative).

    Each round, the *first* layer whose down-projection output max |y| reaches
    ``spike_factor`` x the median over layers names a candidate W[row = argmax |y|,
    col = argmax |x|] (Yu et al.: the super weight is where the massive activation first
    appears; later, larger spikes are often the ones that cancel it). It is zeroed and the
    search repeats. Candidates are only candidates: ``verify_super_weights`` ablates each
    and the analysis accepts those whose ablation passes its threshold. The model is restored
    on exit. Returns (candidates, activation profile of the first, unablated pass).
    """
    ids = torch.tensor(tokenizer(prompt).input_ids) if tokenizer is not None else None
    if ids is None:
        raise ValueError("a tokenizer is needed")
    layers = LM.decoder_layers(model)
    downs = [LM.mlp_down_proj(layer) for layer in layers]
    names_of = LM.module_names(model)
    found: list[SuperWeight] = []
    profile = None
    with V.restored_on_exit(model, [names_of[d] + ".weight" for d in downs]):
        for _ in range(max_weights):
            stats, resid = _down_proj_maxima(model, ids)
            if profile is None:
                profile = {"down_in_max": [s[0] for s in stats], "down_out_max": [s[2] for s in stats],
                           "residual_max": [r[0] for r in resid], "residual_channel": [r[1] for r in resid]}
            outs = sorted(s[2] for s in stats)
            median = outs[len(outs) // 2]
            spikes = [j for j in range(len(stats)) if stats[j][2] >= spike_factor * median]
            if not spikes:
                break
            i = spikes[0]
            in_abs, col, out_abs, row = stats[i]
            if any(f.layer == i and f.row == row and f.col == col for f in found):
                break
            W = LM.weight_view(downs[i])
            found.append(SuperWeight(i, names_of[downs[i]], row, col, float(W[row, col].detach()), in_abs, out_abs))
            with torch.no_grad():
                W[row, col] = 0
    # The massive-activation channel: the residual channel that dominates after the first spike.
    if found and profile:
        after = found[0].layer
        profile["massive_channel"] = profile["residual_channel"][min(after + 1, len(layers) - 1)]
    return found, profile or {}


def protected_coordinates(model, tokenizer, protect, prompt: str) -> tuple[tuple, list]:
    """``protect`` ("auto" or ((module, row, col), ...)) -> (checked coordinates, super weights
    detected for "auto" as dicts). Coordinates index the [out, in] view of each linear."""
    found = []
    if protect == "auto":
        sws, _ = detect_super_weights(model, tokenizer, prompt)
        found = [sw.__dict__ for sw in sws]
        protect = tuple((sw.module, sw.row, sw.col) for sw in sws)
    modules = dict(model.named_modules())
    for name, r, c in protect:
        mod = modules.get(name)
        if mod is None or not LM.is_linear(mod):
            raise C.UserError(f"--protect-super-weights: {name!r} is not a linear module of this model")
        rows, cols = LM.weight_view(mod).shape
        if not (0 <= r < rows and 0 <= c < cols):
            raise C.UserError(f"--protect-super-weights: ({r}, {c}) is outside {name}'s [{rows}, {cols}] weight")
    return tuple(tuple(x) for x in protect), found
