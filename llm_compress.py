"""Shared compression machinery: layer-wise calibration, the OBS inverse-Hessian factor, the one
group quantizer (RTN and GPTQ), and the bounded layer-wise allocation rule.

Pruning (SparseGPT, Wanda, OWL allocation), the quantize step (RTN, GPTQ) and the analysis
step's RTN study all run on these, so each lives here once:

    capture_block_inputs    calibration windows up to decoder block 0 (as the SparseGPT/GPTQ code)
    linear_input_stats      per linear of one block: sum of squared input norms [in] (Wanda) or
                            H = 2 X X^T / n [in, in] (SparseGPT, GPTQ)
    inverse_hessian_factor  upper Cholesky factor of (H + damp I)^-1, SparseGPT/GPTQ style
    minmax_params / rtn_quantize / quantize_rtn_
                            asymmetric min-max group quantization (GPTQ's ``Quantizer`` with
                            ``sym=False``, the AWQ/GPTQ papers' RTN baseline)
    gptq_quantize           GPTQ (Frantar et al. 2023; IST-DASLab/gptq ``fasterquant``)
    bounded_allocation / split_count
                            OWL's bounded per-layer rule and exact integer counts
"""
from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

import llm_common as C
import llm_io as IO
import llm_model as LM
import llm_variants as V

# --------------------------------------------------------------------------- layer-wise calibration


class _Stop(Exception):
    pass


def capture_block_inputs(model, windows: torch.Tensor):
    """Run windows [n, seq_len] up to decoder block 0 and return (inputs, kwargs).

    ``inputs`` is a list of [1, seq_len, hidden] hidden states; ``kwargs`` holds what the
    model passes to every block (rotary ``position_embeddings``, attention mask,
    position ids), captured rather than rebuilt so that each architecture gets exactly
    what its own forward computes.
    """
    layers = LM.decoder_layers(model)
    inputs, kwargs = [], {}

    def hook(module, args, kw):
        hidden = args[0] if args else kw.pop("hidden_states")
        inputs.append(hidden.detach())
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k not in ("hidden_states",)})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    dev = LM.input_device(model)
    try:
        with torch.no_grad(), LM.use_cache(model, False):
            for w in windows:
                try:
                    model(input_ids=w[None].to(dev), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    for key in ("past_key_values", "past_key_value", "cache"):  # "cache" in transformers 5
        kwargs.pop(key, None)
    kwargs["use_cache"] = False
    return inputs, kwargs


def block_out(out):
    """A decoder block's hidden states, whether it returns a tensor or a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def next_block_inputs(layer, inputs: list, kwargs: dict) -> list:
    """The block's outputs for every window: the next block's inputs."""
    with torch.no_grad():
        return [block_out(layer(h, **kwargs)).detach() for h in inputs]


def linear_input_stats(layer, inputs, kwargs, kind: str, linears: dict) -> dict:
    """One pass of the block over all windows with hooks that accumulate, per linear,
    the sum of squared input norms per channel (``kind="wanda"``, [in]) or the layer Hessian
    H = 2 X X^T / n_tokens (``kind="hessian"``, [in, in], float32). Linears fed the very same input
    tensor (q, k, v; gate, up) share one product: a Hessian is the pass's largest cost."""
    stats, counts, handles = {}, {}, []
    last: list = [None, None]  # the last input tensor seen, and its statistic

    def make_hook(name):
        def hook(mod, args, out):
            if args[0] is not last[0]:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, in]
                last[:] = args[0], (x.pow(2).sum(0) if kind == "wanda" else 2 * x.t() @ x)
            s = last[1]
            stats[name] = stats[name] + s if name in stats else s  # (never in place: s may be shared)
            counts[name] = counts.get(name, 0) + args[0].numel() // args[0].shape[-1]
        return hook

    for name, mod in linears.items():
        handles.append(mod.register_forward_hook(make_hook(name)))
    try:
        with torch.no_grad():
            for h in inputs:
                layer(h, **kwargs)
    finally:
        last[:] = None, None
        for hd in handles:
            hd.remove()
    return {k: v / counts[k] if kind == "hessian" else v for k, v in stats.items()}


MAX_DAMP_RETRIES = 6  # 10x more dampening each time: from 1e-5 of mean diag(H) to 10x it at most


def inverse_hessian_factor(H: torch.Tensor, percdamp: float, what: str = "SparseGPT") -> tuple[torch.Tensor, float]:
    """(upper Cholesky factor of (H + d I)^-1, the dampening fraction used), d = percdamp x mean
    diag(H). Row i of the factor holds the OBS update for eliminating column i given that
    columns < i are fixed. A Hessian that is not positive definite at ``percdamp`` (too few
    calibration tokens, --sparsegpt-percdamp 0) gets SparseGPT's own remedy, more dampening:
    10x more (at least 1e-5) until it factors, a bounded number of times; the caller records it."""
    mean_diag, eye, damp = torch.mean(torch.diag(H)), torch.eye(H.shape[0], device=H.device, dtype=H.dtype), percdamp
    for _ in range(MAX_DAMP_RETRIES + 1):
        Hd = H + damp * mean_diag * eye
        L, info = torch.linalg.cholesky_ex(Hd)
        if not info.item():
            Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if not info.item() and torch.isfinite(Hinv).all():
                return Hinv, damp
        damp = max(10 * damp, 1e-5)
    hint = "try --prune-method wanda" if what == "SparseGPT" else "try --quant-method rtn"
    raise C.UserError(f"{what}: a layer Hessian is not positive definite even with dampening {damp / 10:g} x "
                      f"mean diag(H) (non-finite activations?); {hint}")


# --------------------------------------------------------------------------- the group quantizer


def rtn_groups(in_features: int, group_size: int) -> list[tuple[int, int]]:
    """Column ranges [start, end) of quantization groups: ``group_size`` consecutive input columns
    (0: the whole row), and one narrower tail group when the width is not a multiple
    (576 = 4 x 128 + 64)."""
    gs = group_size or in_features
    return [(s, min(s + gs, in_features)) for s in range(0, in_features, gs)]


def minmax_params(x: torch.Tensor, bits: int, keep: Optional[torch.Tensor] = None, zero_point: str = "integer",
                  scale_dtype: str = "float32", symmetric: bool = False):
    """Asymmetric min-max grid of each row of ``x`` [rows, width] (or [rows, groups, width]):
    (scale, zero), shaped like ``x`` with the last dimension 1.

    ``zero_point`` "integer", as GPTQ's ``Quantizer.find_params(weight=True)`` with ``sym=False``:
    the range always includes 0, scale = (max - min) / (2^bits - 1), zero = round(-min / scale)
    (a code). Where GPTQ replaces an all-zero range by [-1, 1] we clamp the scale at 1e-10; both
    give the same values (0). ``zero_point`` "float", as GGUF Q4_1 (``gguf.quants.Q4_1``) and HQQ:
    the range is [min, max] itself (0 need not be on the grid), scale = (max - min) / (2^bits - 1)
    and zero = min, an unrounded offset in weight units; both rounded to fp16 as GGUF stores
    them, so that the dequantized Q4_1 weights come back bit for bit (a constant group: scale 0).
    Entries in ``keep`` (kept in full precision) are left out of the range. ``scale_dtype``
    "float16" rounds an integer grid's scale to fp16 before the zero and the codes are taken from
    it, as AutoGPTQ and compressed-tensors store it (GPTQ's reference keeps it in the layer's
    dtype, float32 here): the values stay exactly what a 16-bit-scale checkpoint holds.
    ``symmetric`` (integer zero point only), as GPTQ's ``sym=True`` and compressed-tensors'
    symmetric int scheme: the range is [-max|x|, max|x|], scale = 2 max|x| / (2^bits - 1) and the
    zero is the fixed code 2^(bits-1), so a reader needs no zero point (vLLM's uint4b8 / uint8b128
    Marlin types: code - 8 or code - 128)."""
    big = torch.finfo(x.dtype).max
    lo = (torch.where(keep, big, x) if keep is not None else x).amin(-1, keepdim=True)
    hi = (torch.where(keep, -big, x) if keep is not None else x).amax(-1, keepdim=True)
    if zero_point == "float":
        lo = torch.where(lo > hi, 0, lo)  # a group kept in full: any grid
        hi = torch.maximum(hi, lo)
        return ((hi - lo) / (2 ** bits - 1)).half().to(x.dtype), lo.half().to(x.dtype)
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    scale = ((hi - lo) / (2 ** bits - 1)).clamp(min=1e-10)
    if scale_dtype == "float16":  # the smallest fp16 subnormal stands in for 1e-10 (an all-zero group: 0 either way)
        scale = scale.clamp(max=65504).half().to(x.dtype).clamp(min=2 ** -24)
    if symmetric:  # the fixed middle code (round(-lo / scale) would move with an fp16-rounded scale)
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    return scale, torch.round(-lo / scale)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   zero_point: str = "integer") -> torch.Tensor:
    """Integer codes (as floats): clamp(round(x / scale) + zero, 0, 2^bits - 1) for an integer
    zero point, clamp(round((x - zero) / scale), 0, 2^bits - 1) for a float one (0 where scale is 0)."""
    if zero_point == "float":
        return torch.clamp(torch.round(torch.where(scale > 0, (x - zero) / scale, 0)), 0, 2 ** bits - 1)
    # in place on the one temporary x / scale: the same values as clamp(round(x / scale) + zero)
    return (x / scale).round_().add_(zero).clamp_(0, 2 ** bits - 1)


def grid_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, zero_point: str = "integer"):
    """The values of float ``codes`` on the grid: scale * (code - zero) for an integer zero point
    (as GPTQ's kernels), code * scale + zero for a float one (as GGUF's ``d * q + m``, float32)."""
    return codes * scale + zero if zero_point == "float" else scale * (codes - zero)


@dataclass
class Quantized:
    """One matrix [out, in] in codes and per-group grids; ``dequantize`` gives its values.

    codes [out, in] uint8; scale, zero [out, n_groups] (float32; zero holds integer codes, or
    with ``zero_point`` "float" the group's minimum in weight units, see ``minmax_params``);
    g_idx [in] int32: the group of each column (columns in GPTQ's act order group by
    position in that order); keep [out, in] bool or None: entries kept in full precision,
    whose values are ``kept`` (1-D, in the model's dtype, row-major order of ``keep``)."""
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    keep: Optional[torch.Tensor] = None
    kept: Optional[torch.Tensor] = None
    damp: float = 0.0
    dequantized: Optional[torch.Tensor] = None  # GPTQ: the kernel's own values [out, in] (tests compare them)
    zero_point: str = "integer"  # or "float": see minmax_params
    scale_dtype: str = "float32"  # or "float16": scales and values as a 16-bit-scale checkpoint holds them
    symmetric: bool = False  # every zero is the fixed code 2^(bits-1): a reader stores no zero point
    # RTN: ``grid_values`` of the codes as the kernel computed them (float32 [out, in]), taken by the
    # first dequantize instead of recomputing them from the codes (and dropped then: never stored)
    grid: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """``grid_values`` (as the kernels compute them), then the kept values: bit for bit the
        weights that were quantized (elementwise float32 ops in the same order). With fp16 scales
        the values are rounded to fp16, as a reader of such a checkpoint computes scale x (code -
        zero) in the scale's dtype (compressed-tensors' decompressor does)."""
        W = self._grid_values()
        W = (W.half() if self.scale_dtype == "float16" else W).to(dtype)
        if self.keep is not None and self.kept is not None and self.kept.numel():
            W[self.keep] = self.kept.to(dtype)
        return W

    def _grid_values(self) -> torch.Tensor:
        """``grid_values`` of every code [out, in]. Groups of consecutive columns (every g_idx but
        act order's) broadcast each group's scale and zero over a [out, groups, width] view:
        elementwise the same products as the general path's two [out, in] gathers, without them."""
        if self.grid is not None:
            W, self.grid = self.grid, None
            return W
        out, cols = self.codes.shape
        g = self.g_idx.long().to(self.codes.device)
        width = int((g == 0).sum())
        if not width or not torch.equal(g, torch.arange(cols, device=g.device) // width):
            return grid_values(self.codes.float(), self.scale[:, g], self.zero[:, g], self.zero_point)
        scale, zero = self.scale.to(self.codes.device), self.zero.to(self.codes.device)
        W = torch.empty(out, cols, dtype=torch.promote_types(torch.float32, scale.dtype), device=self.codes.device)
        full = cols // width * width
        for start, end, w in ((0, full, width), (full, cols, cols - full)):  # whole groups, then the tail
            if end > start:
                gs = slice(start // width, (end - 1) // width + 1)
                c = self.codes[:, start:end].reshape(out, -1, w).float()
                W[:, start:end] = grid_values(c, scale[:, gs, None], zero[:, gs, None], self.zero_point).reshape(
                    out, end - start)
        return W


@torch.no_grad()
def rtn_quantize(W: torch.Tensor, bits: int, group_size: int = 128, keep: Optional[torch.Tensor] = None,
                 zero_point: str = "integer", scale_dtype: str = "float32", symmetric: bool = False) -> Quantized:
    """Round-to-nearest asymmetric group quantization of W [out, in] (float32 math); W unchanged.

    Groups are ``group_size`` consecutive input columns of a row (``rtn_groups``: the last
    group is narrower when ``in`` is not a multiple). Weights in ``keep`` are left out of their
    group's min/max and kept in full precision (dense-and-sparse). ``zero_point``: see
    ``minmax_params``, as ``scale_dtype`` and ``symmetric``."""
    symmetric = _symmetric(symmetric, zero_point)
    out, inp = W.shape
    gs = min(group_size or inp, inp)
    full = inp // gs * gs
    parts = [(0, full, gs)] + ([(full, inp, inp - full)] if full < inp else [])
    codes = torch.empty(out, inp, dtype=torch.uint8, device=W.device)
    scales, zeros, grid = [], [], []
    for start, end, width in parts:  # the whole groups in one reshape, then the tail group
        Wf = W[:, start:end].float().reshape(out, -1, width)
        K = keep[:, start:end].reshape(out, -1, width).to(W.device) if keep is not None else None
        scale, zero = minmax_params(Wf, bits, K, zero_point, scale_dtype, symmetric)
        c = quantize_codes(Wf, scale, zero, bits, zero_point)  # float codes, a tensor of its own
        codes[:, start:end] = c.reshape(out, end - start)
        # grid_values' products in c's own buffer (the same floats: scale * (c - zero), c * scale + zero)
        grid.append((c.mul_(scale).add_(zero) if zero_point == "float" else c.sub_(zero).mul_(scale)).reshape(
            out, end - start))
        scales.append(scale.squeeze(-1))
        zeros.append(zero.squeeze(-1))
    g_idx = torch.arange(inp, device=W.device, dtype=torch.int32) // gs
    keep = keep.to(W.device) if keep is not None else None
    return Quantized(codes, torch.cat(scales, 1), torch.cat(zeros, 1), g_idx, keep,
                     W[keep].detach() if keep is not None else None, zero_point=zero_point,  # (a copy)
                     scale_dtype=scale_dtype if zero_point == "integer" else "float32", symmetric=symmetric,
                     grid=grid[0] if len(grid) == 1 else torch.cat(grid, 1))


def _symmetric(symmetric: bool, zero_point: str) -> bool:
    if symmetric and zero_point != "integer":
        raise ValueError("a symmetric grid has an integer zero point (the fixed code 2^(bits-1))")
    return symmetric


@torch.no_grad()
def quantize_rtn_(W: torch.Tensor, bits: int, group_size: int = 128, keep: Optional[torch.Tensor] = None,
                  zero_point: str = "integer") -> None:
    """``rtn_quantize`` applied to W [out, in] in place (its dequantized values)."""
    W.copy_(rtn_quantize(W, bits, group_size, keep, zero_point).dequantize(W.dtype))


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = 128, blocksize: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, keep: Optional[torch.Tensor] = None,
                  zero_point: str = "integer", zeros: Optional[torch.Tensor] = None,
                  scale_dtype: str = "float32", symmetric: bool = False) -> Quantized:
    """GPTQ of one weight matrix W [out, in] given its layer Hessian H = 2 X X^T / n [in, in].

    Follows ``fasterquant`` of IST-DASLab/gptq (``gptq.py``) with its asymmetric ``Quantizer``:
    dead inputs (H_jj = 0) are zeroed; optional act order (columns by decreasing H_jj); dampening
    ``percdamp`` x mean diag(H) (retried 10x larger where H does not factor, as our SparseGPT);
    the upper Cholesky factor of H^-1; blocks of ``blocksize`` columns, each column quantized in
    turn and its error spread over the later columns of the block (lazy batch update of the
    rest). With groups, a group's grid is taken when the loop reaches its first column, from
    the weights as updated so far (the reference's ``find_params(W[:, i:i+groupsize])``); in act
    order a group is ``group_size`` consecutive columns of that order (the reference without
    ``static_groups``). Without groups (``group_size`` 0) each row has one grid from the
    original weights. Entries in ``keep`` (super weights) stay in full precision: no error, and
    outside their group's range. ``zero_point`` picks the grid (``minmax_params``); the error
    feedback uses that grid's values. ``zeros`` (bool [out, in], a pruned model's mask) are held at
    exactly 0 (the integer grid's zero code) and their error spread like any other column's: GPTQ
    on a fixed sparsity mask, the quantization half of SparseGPT's joint sparsify-and-quantize
    pass (Frantar & Alistarh 2023, ``sparsegpt.py`` with ``wbits``), the mask taken from the pruned
    model instead of chosen in the same sweep; they are left out of each group's range. Math in
    float32 (float64 for a float64 W). W is unchanged. ``symmetric``: GPTQ's ``sym=True`` grid
    (``minmax_params``)."""
    symmetric = _symmetric(symmetric, zero_point)
    dt = torch.promote_types(W.dtype, torch.float32)
    Wf = W.detach().to(dt).clone()
    out, cols = Wf.shape
    H = H.to(Wf.device, dt).clone()
    K = keep.to(Wf.device).clone() if keep is not None else torch.zeros_like(Wf, dtype=torch.bool)
    Z = zeros.to(Wf.device) if zeros is not None else torch.zeros_like(Wf, dtype=torch.bool)
    if zeros is not None:
        if zero_point != "integer":
            raise ValueError("a pruned zero is exactly representable only on the integer zero-point grid")
        K &= ~Z  # a pruned weight is 0, not kept
    gs = group_size or cols
    # before dead columns, as the reference
    row_grid = minmax_params(Wf.masked_fill(Z, 0), bits, K, zero_point, scale_dtype, symmetric) if not group_size \
        else None
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Wf[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    # without act order the order is the columns' own: no [out, in] and [in, in] gathers
    Wf, H, Kp, Zp = (Wf[:, perm], H[perm][:, perm], K[:, perm], Z[:, perm]) if act_order else (Wf, H, K, Z)
    Hinv, damp = inverse_hessian_factor(H, percdamp, "GPTQ")
    Q = torch.zeros_like(Wf)
    n_groups = math.ceil(cols / gs)
    scales = torch.zeros(out, n_groups, dtype=dt, device=Wf.device)
    zeros = torch.zeros_like(scales)
    codes = torch.zeros(out, cols, dtype=torch.uint8, device=Wf.device)
    scale, zero = row_grid if row_grid is not None else (None, None)
    # The column loop is the kernel's cost (a dozen small ops per column): what no entry needs is
    # skipped (an all-False mask's fill and select), and codes are converted once per block.
    any_keep, any_zero = bool(Kp.any()), bool(Zp.any())
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wf[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        C1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if group_size and j % gs == 0:
                Wg = Wf[:, j:j + gs].masked_fill(Zp[:, j:j + gs], 0) if any_zero else Wf[:, j:j + gs]
                scale, zero = minmax_params(Wg, bits, Kp[:, j:j + gs] if any_keep else None, zero_point,
                                            scale_dtype, symmetric)
            if j % gs == 0:
                scales[:, j // gs], zeros[:, j // gs] = scale[:, 0], zero[:, 0]
            w = W1[:, i]
            c = quantize_codes((w.masked_fill(Zp[:, j], 0) if any_zero else w)[:, None], scale, zero, bits,
                               zero_point)  # a pruned entry: its zero code
            q = grid_values(c, scale, zero, zero_point).flatten()
            if any_keep:
                q = torch.where(Kp[:, j], w, q)
            C1[:, i] = c.flatten()
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        codes[:, i1:i2] = C1
        Wf[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the later columns
    inv = torch.argsort(perm) if act_order else torch.arange(cols, device=Wf.device)
    g_idx = (inv // gs).to(torch.int32)  # column c sat at position inv[c] of the quantization order
    Qfinal, codes = (Q[:, inv], codes[:, inv]) if act_order else (Q, codes)
    # A kept entry keeps its value as updated by the earlier columns' errors (OBS: it is free).
    kept = Qfinal[K].to(W.dtype) if keep is not None else None
    return Quantized(codes, scales.float(), zeros.float(), g_idx, K if keep is not None else None, kept,
                     damp, Qfinal, zero_point, scale_dtype if zero_point == "integer" else "float32", symmetric)


# --------------------------------------------------------------------------- bits, as the papers count them

SCALE_BITS = 16  # one fp16 scale per group (AutoGPTQ, compressed-tensors pack-quantized)
G_IDX_BITS = 32  # act order: one int32 group index per input column (AutoGPTQ's g_idx)
KEPT_BITS = 48   # a weight kept in full precision: 16 bits of value + 32 bits of index
DENSE_BITS = 16  # an unquantized weight, as the papers count fp16 models
MASK_BITS = 1    # a pruned matrix's bitmask per weight (compressed-tensors sparse-bitmask; a 2:4
#                  row's 2-bit index per kept value is the same 1 bit per weight)

BITS_COUNTED = ("counts its codes, an fp16 scale and a zero of the code's bits per group (fp16 for a float zero "
                "point), an int32 group index per column with act order, 16 + 32 bits per weight kept in full "
                "precision, and a 1-bit mask when pruned weights are held at zero (pruned weights then have no "
                "code), over the decoder linears (embeddings, norms and the LM head are not counted)")


def grid_bits(rows: int, cols: int, bits: int, group: int, symmetric: bool = False) -> int:
    """Codes, fp16 scales and ``bits``-bit zeros (none when ``symmetric``) of a [rows, cols] matrix
    at ``group`` columns per group (a narrower tail group counted too): its size as
    ``counted_bits`` counts a uniform RTN."""
    zero_bits = 0 if symmetric else bits
    return rows * cols * bits + rows * math.ceil(cols / group) * (SCALE_BITS + zero_bits)


def counted_bits(q: Quantized, bits: int, act_order: bool, pruned: int = 0) -> dict:
    """The bits of one quantized matrix as the papers count them, by part: ``codes`` (``bits`` per
    weight that is neither kept nor pruned), ``grids`` (per row and group an fp16 scale and a
    zero in ``bits`` bits, as AutoGPTQ and compressed-tensors store an integer zero; a float zero
    point is an fp16 minimum, as GGUF's; a symmetric grid stores no zero), ``g_idx`` (act order),
    ``kept`` (``KEPT_BITS`` each) and
    ``mask`` (``MASK_BITS`` per weight when ``pruned`` > 0 weights are held at zero)."""
    rows, cols = q.codes.shape
    kept = int(q.keep.sum()) if q.keep is not None else 0
    zero_bits = 0 if q.symmetric else bits if q.zero_point == "integer" else DENSE_BITS
    return {"codes": (rows * cols - kept - pruned) * bits, "grids": q.scale.numel() * (SCALE_BITS + zero_bits),
            "g_idx": cols * G_IDX_BITS * act_order, "kept": kept * KEPT_BITS,
            "mask": rows * cols * MASK_BITS * (pruned > 0)}


# --------------------------------------------------------------------------- compact storage

_PARTS = ("codes", "scale", "zero", "g_idx")


def save_codes(out, name: str, quantized: dict) -> dict:
    """Store a quantized variant compactly in ``<out>/checkpoints/<name>.safetensors``: per weight
    its uint8 codes, fp32 scales and zeros per group, int32 column groups, and the flat indices
    and values of the weights kept in full precision. Returns its record for results.json."""
    path, tensors = Path(out) / "checkpoints" / f"{name}.safetensors", {}
    for pname, q in quantized.items():
        for part in _PARTS:
            tensors[f"{pname}::{part}"] = getattr(q, part).contiguous()
        if q.keep is not None:
            tensors[f"{pname}::kept_index"] = q.keep.flatten().nonzero().flatten().to(torch.int64)
            tensors[f"{pname}::kept"] = q.kept
        if q.zero_point == "float":  # the marker of a float zero point (the grid's minimum, not a code)
            tensors[f"{pname}::float_zero"] = torch.ones(1, dtype=torch.uint8)
        if q.scale_dtype == "float16":  # the marker of fp16 scales (stored as float32, fp16-exact values)
            tensors[f"{pname}::half_scale"] = torch.ones(1, dtype=torch.uint8)
        if q.symmetric:  # the marker of a symmetric grid (the zeros are then all 2^(bits-1))
            tensors[f"{pname}::symmetric"] = torch.ones(1, dtype=torch.uint8)
    IO.save_tensors(path, tensors, metadata={"variant": name, "format": "codes"})
    return {"checkpoint": str(path.relative_to(out)), "format": "codes"}


def stored_bits(path, n_weights: int) -> float:
    """Bits actually written per weight: the size of the file ``path`` (all of it: codes, scales,
    zeros, column groups, kept weights, the safetensors header) x 8 / ``n_weights``."""
    return 8 * Path(path).stat().st_size / max(n_weights, 1)


def load_codes(path) -> dict:
    """The ``Quantized`` records that ``save_codes`` wrote, by parameter name."""
    t = IO.load_tensors(path)
    out = {}
    for key in t:
        pname, part = key.rsplit("::", 1)
        if part != "codes":
            continue
        q = Quantized(*(t[f"{pname}::{p}"] for p in _PARTS),
                      zero_point="float" if f"{pname}::float_zero" in t else "integer",
                      scale_dtype="float16" if f"{pname}::half_scale" in t else "float32",
                      symmetric=f"{pname}::symmetric" in t)
        if f"{pname}::kept_index" in t:
            keep = torch.zeros(q.codes.numel(), dtype=torch.bool)
            keep[t[f"{pname}::kept_index"]] = True
            q.keep, q.kept = keep.reshape(q.codes.shape), t[f"{pname}::kept"]
        out[pname] = q
    return out


def coded_weights(model, path):
    """Context manager: the model with the stored quantized weights (dequantized into each
    weight's dtype, bit for bit what the quantizer wrote), restored on exit."""
    state = V.named_tensors(model)
    tensors = {}
    for pname, q in load_codes(path).items():
        mod = model.get_submodule(pname.rsplit(".", 1)[0])
        tensors[pname] = LM.out_in(mod, q.dequantize(state[pname].dtype))  # back to the module's layout
    return V.swapped_weights(model, tensors)


# --------------------------------------------------------------------------- allocation


def split_count(total: int, sizes: Sequence[int]) -> list[int]:
    """Split the integer ``total`` over parts of ``sizes`` in proportion (largest remainder):
    the counts sum to ``total`` exactly and none exceeds its size."""
    n = sum(sizes)
    if not n:
        return [0] * len(sizes)
    raw = [total * s / n for s in sizes]
    out = [min(int(math.floor(r)), s) for r, s in zip(raw, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: -(raw[i] - out[i]))
    left = total - sum(out)
    for i in order * 2:
        if left <= 0:
            break
        if out[i] < sizes[i]:
            out[i] += 1
            left -= 1
    return out


def bounded_allocation(scores: Sequence[float], sizes: Sequence[int], target: float, lam: float) -> list[float]:
    """OWL's bounded rule (Yin et al. 2024; luuyin/OWL ``prune_wanda_outlier``): per layer,
    keep ratio = (1 - target) + 2 lam (s_l - min s) / (max s - min s) - centre, so layers with a
    larger score keep more weights and the ratios span 2 lam. OWL centres on the plain mean
    over layers (equal-sized layers in LLaMA); we centre on the size-weighted mean so the
    weights pruned add up to ``target`` for layers of any size (the same for equal sizes).
    Returns the per-layer sparsity, clamped to [0, 1) (``exact_counts`` absorbs the clamp)."""
    s = [float(x) for x in scores]
    span = max(s) - min(s)
    a = [2 * lam * (x - min(s)) / span if span > 0 else 0.0 for x in s]
    centre = sum(x * n for x, n in zip(a, sizes)) / sum(sizes)
    return [min(max(target - (x - centre), 0.0), 1.0 - 1e-6) for x in a]


def exact_counts(sparsities: Sequence[float], sizes: Sequence[int], target: float) -> list[int]:
    """Weights to prune per layer: about ``sparsity x size`` each, adjusted (one weight at a
    time, largest layers first) so that they add up to round(target x total) exactly."""
    want = round(target * sum(sizes))
    k = [min(max(round(s * n), 0), n - 1 if n else 0) for s, n in zip(sparsities, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    while sum(k) != want:
        step = 1 if sum(k) < want else -1
        moved = False
        for i in order:
            if sum(k) == want:
                break
            if 0 <= k[i] + step <= sizes[i] - 1:
                k[i] += step
                moved = True
        if not moved:
            break
    return k
