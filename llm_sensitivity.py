"""Shared sensitivity math: per-window gradient moments, saliency scores, protection masks.

Pruning (Taylor/Fisher scores), the noise step (protecting the most salient weights) and the
integrated analysis (Fisher/OBD, quantization that keeps salient weights) all rank weights
by these scores, so they live here, in one place, rather than in any one step module.
"""
from __future__ import annotations

from typing import Mapping, Sequence

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
