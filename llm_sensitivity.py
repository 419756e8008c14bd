"""Shared sensitivity math: per-window gradient moments, saliency scores, protection masks,
and the data-free super-weight detector.

Pruning (Taylor/Fisher scores), the noise step (protecting the most salient weights) and the
integrated analysis (Fisher/OBD, quantization that keeps salient weights) all rank weights
by these scores; pruning and noise protect super weights that the analysis also reports. So
they live here, in one place, rather than in any one step module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from tqdm.auto import tqdm

import llm_common as C


def gradient_moments(model, windows: torch.Tensor, names: dict[str, torch.nn.Module], progress: bool = True):
    """Per-window gradients of the mean LM loss for the weights of ``names``.

    Returns {name: (mean g, mean g^2)}, each [out, in] in float32, averaged over the
    windows [n, seq_len]; each window is one sample. Only these weights get gradients,
    and their ``requires_grad`` flags are restored afterwards.
    """
    acc = {n: [torch.zeros(C.weight_view(m).shape, dtype=torch.float32, device=m.weight.device),
               torch.zeros(C.weight_view(m).shape, dtype=torch.float32, device=m.weight.device)]
           for n, m in names.items()}
    dev = C.input_device(model)
    with C.trainable_only(model, [m.weight for m in names.values()]):
        for w in tqdm(windows, desc="gradients", disable=not progress or len(windows) < 4):
            w = w[None].to(dev)
            model(input_ids=w, labels=w, use_cache=False).loss.backward()
            for n, m in names.items():
                g = C.out_in(m, m.weight.grad).float()
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
        w = C.weight_view(names[name]).detach().float()
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
        w = C.weight_view(names[name]).detach().float()
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
    layers = C.decoder_layers(model)
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

        handles.append(C.mlp_down_proj(layer).register_forward_hook(hook))
        handles.append(layer.register_forward_hook(rhook))
    try:
        with torch.no_grad():
            model(input_ids=ids[None].to(C.input_device(model)), use_cache=False)
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
    layers = C.decoder_layers(model)
    downs = [C.mlp_down_proj(layer) for layer in layers]
    names_of = {m: n for n, m in model.named_modules()}
    found: list[SuperWeight] = []
    profile = None
    with C.restored_on_exit(model, [names_of[d] + ".weight" for d in downs]):
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
            W = C.weight_view(downs[i])
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
        if mod is None or not C.is_linear(mod):
            raise C.UserError(f"--protect-super-weights: {name!r} is not a linear module of this model")
        rows, cols = C.weight_view(mod).shape
        if not (0 <= r < rows and 0 <= c < cols):
            raise C.UserError(f"--protect-super-weights: ({r}, {c}) is outside {name}'s [{rows}, {cols}] weight")
    return tuple(tuple(x) for x in protect), found
