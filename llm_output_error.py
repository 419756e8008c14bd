"""Each linear's relative output error after compression, on given windows (issue 34), and a
draw of windows disjoint from the calibration ones, so that overfitting to them shows:

    held_out_windows   windows of the same text sharing no run of HELD_OUT_NGRAM tokens with
                       the calibration windows
    output_error       ||(W - Q) X||_F / ||W X||_F per decoder linear, block by block
"""
from __future__ import annotations

import math
from typing import Optional

import torch

import llm_data as D
import llm_model as LM
from llm_compress import capture_block_inputs, next_block_inputs

HELD_OUT_NGRAM = 16  # a candidate sharing a run of this many tokens with a calibration window is not held out


def held_out_windows(tokenizer, source, calibration: torch.Tensor, seed: int,
                     n: Optional[int] = None) -> torch.Tensor:
    """Windows [k, seq_len] of ``source`` (as ``D.calibration_windows`` draws them, seed ``seed``
    + 1000003) that share no run of ``HELD_OUT_NGRAM`` tokens with any ``calibration`` window
    [m, seq_len]: a disjoint draw of the same text, k <= n (default m; 4n candidates, the first n
    that pass). Works for id streams and document corpora alike: overlap is judged by content."""
    n, seq_len = n or calibration.shape[0], calibration.shape[1]
    k = HELD_OUT_NGRAM

    def grams(w):
        w = w.tolist()  # one conversion per window, then list slices (not a tensor slice per n-gram)
        return {tuple(w[i:i + k]) for i in range(0, len(w) - k + 1)}

    seen = set().union(*(grams(w) for w in calibration))
    cand = D.calibration_windows(tokenizer, source, 4 * n, seq_len, seed + 1000003)
    keep = [w for w in cand if not grams(w) & seen][:n]
    return torch.stack(keep) if keep else cand[:0]


@torch.no_grad()
def output_error(model, windows: torch.Tensor, reference: dict) -> dict:
    """Per decoder linear named in ``reference`` (name -> its weights W [out, in] before
    quantization), the relative output error ||(W - Q) X||_F / ||W X||_F over ``windows``
    [n, seq_len], Q its live (quantized) weights and X [tokens, in] its inputs in the live model:
    the error GPTQ minimises on its calibration windows (its objective, layer-wise, as Frantar et
    al. 2023 eq. 1), measured on any windows. Blocks are run one at a time on the captured
    inputs (``capture_block_inputs``), so only one block's reference weights sit on the device."""
    if not windows.shape[0]:
        return {}
    inputs, kwargs = capture_block_inputs(model, windows)
    names_of, out = LM.module_names(model), {}
    for layer in LM.decoder_layers(model):
        sums, handles = {}, []
        for mod in LM.block_linears(layer).values():
            name = names_of[mod]
            if name not in reference:
                continue
            W = reference[name].to(LM.weight_view(mod).device, torch.float32)
            D_ = W - LM.weight_view(mod).float()
            sums[name] = [0.0, 0.0]

            def hook(m, args, res, W=W, D_=D_, acc=sums[name]):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, in]
                e = x @ D_.T
                acc[0] += float(torch.linalg.vector_norm(e).square())
                if res.dtype in (torch.float32, torch.float64):  # W X = Q X + D X: the module's output
                    # already holds Q X (+ bias), so one matmul instead of two; in a 16-bit model it is
                    # rounded, and W X is computed from W
                    y = res.detach().reshape(e.shape)
                    e += y - m.bias if m.bias is not None else y
                else:
                    e = x @ W.T
                acc[1] += float(torch.linalg.vector_norm(e).square())
            handles.append(mod.register_forward_hook(hook))
        try:
            inputs = next_block_inputs(layer, inputs, kwargs)
        finally:
            for h in handles:
                h.remove()
        out.update({n: math.sqrt(a / b) if b > 0 else 0.0 for n, (a, b) in sums.items()})
    return out
