"""Step 2: sensitivity-based pruning of the linear layers inside the decoder blocks.

Methods:
    magnitude  |W|, one threshold per matrix (the baseline).
    wanda      |W_ij| * ||X_j||_2, compared within each output row (Sun et al. 2023).
    sparsegpt  OBS with H = 2 X X^T / n, 1% dampening, upper Cholesky of H^-1, blocks of
               128 columns with lazy updates, mask chosen per block (Frantar & Alistarh 2023).
    taylor     first-order |w * dL/dw| summed over calibration windows, compared per row;
               ``taylor_score="fisher"`` uses the diagonal Fisher w^2 * E[g^2] instead.
Patterns: unstructured, or N:M, which keeps N of every M consecutive input weights of a row
(the NVIDIA and SparseGPT convention: "2:4" keeps 2 of 4, sparsity 1 - N/M; 0 < N < M).

magnitude, wanda and sparsegpt run layer by layer (as in the SparseGPT/Wanda code): the
calibration windows' inputs to block 0 are captured, each block is pruned from its own
inputs, and its pruned outputs become the next block's inputs. Peak memory is the model
plus one block's activations for the calibration set. taylor needs gradients of the full
model, so it costs one backward pass per window and gradient memory for the pruned linears.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Optional

import torch
from tqdm.auto import tqdm

import llm_common as C
from llm_config import PruneConfig
from llm_sensitivity import protected_coordinates, saliency_scores

log = logging.getLogger("llm.prune")

@dataclass
class PruneResult:
    method: str
    pattern: str
    target_sparsity: float
    overall_sparsity: float                       # over all pruned matrices
    per_layer: dict = field(default_factory=dict)  # block index -> sparsity over its linears
    per_matrix: dict = field(default_factory=dict)  # linear name -> sparsity
    pruned_names: list = field(default_factory=list)  # parameter names of pruned weights
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    calibration: dict = field(default_factory=dict)  # windows, seq_len of the calibration set
    protected: list = field(default_factory=list)    # (module, row, col) kept unpruned
    super_weights: list = field(default_factory=list)  # detected for protect="auto"
    config: dict = field(default_factory=dict)       # the resolved PruneConfig
    dampening_increased: dict = field(default_factory=dict)  # SparseGPT: linear -> dampening used, where
    #                                                  H was not positive definite at --sparsegpt-percdamp


def parse_pattern(pattern: str) -> Optional[tuple[int, int]]:
    """None for unstructured, else (n_kept, m)."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise C.UserError(f"--sparsity-pattern must be 'unstructured' or N:M like 2:4, got {pattern!r}")
    if not 0 < n < m:
        raise C.UserError(f"--sparsity-pattern {pattern}: need 0 < N < M")
    return n, m


def check_pattern_fits(model, pattern: str) -> None:
    """Refuse, right after loading and before calibration, an N:M pattern whose M does not divide
    the input width of every decoder linear (no kernel can prune a partial group)."""
    nm = parse_pattern(pattern)
    if nm is None:
        return
    bad = sorted({C.weight_view(m).shape[1] for m in C.decoder_linears(model).values()} - {0})
    bad = [w for w in bad if w % nm[1]]
    if bad:
        raise C.UserError(f"--sparsity-pattern {pattern}: the model's linear input widths {bad} are not multiples "
                          f"of {nm[1]}; choose an M that divides them (2:4 and 4:8 fit most models)")


# --------------------------------------------------------------------------- masks


def mask_from_scores(scores: torch.Tensor, sparsity: float, pattern: str, per_row: bool) -> torch.Tensor:
    """Boolean prune mask (True = remove) from scores [out, in]; low score = pruned first.

    Exact counts: unstructured per row removes int(in * sparsity) weights from every row
    (per matrix: int(numel * sparsity)); N:M removes M - N weights from every group of M
    consecutive columns. Scores of +inf (protected weights) are never pruned unless a row
    has nothing else left.
    """
    nm = parse_pattern(pattern)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if nm is not None:
        n, m = nm
        rows, cols = scores.shape
        if cols % m:
            raise C.UserError(f"N:M pattern {pattern} needs the input size ({cols}) to be a multiple of {m}")
        groups = scores.reshape(rows, cols // m, m)
        idx = torch.topk(groups, m - n, dim=-1, largest=False).indices
        return mask.reshape(rows, cols // m, m).scatter_(-1, idx, True).reshape(rows, cols)
    if per_row:
        k = int(scores.shape[1] * sparsity)
        if k:
            mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
        return mask
    k = int(scores.numel() * sparsity)
    if k:
        mask.view(-1)[torch.topk(scores.flatten(), k, largest=False).indices] = True
    return mask


def _protect(scores: torch.Tensor, coords: Iterable[tuple[int, int]]) -> torch.Tensor:
    for r, c in coords:
        scores[r, c] = float("inf")
    return scores


# --------------------------------------------------------------------------- sparsegpt


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, pattern: str = "unstructured",
                    blocksize: int = 128, percdamp: float = 0.01,
                    protect: Iterable[tuple[int, int]] = (), return_damp: bool = False):
    """OBS pruning of one weight matrix, in place.

    Args:
        W: [out, in] weight (any float dtype); overwritten with the pruned, updated weight.
        H: [in, in] layer Hessian 2 X X^T / n_tokens accumulated in float32.
    Returns the prune mask [out, in] (True = removed), and with ``return_damp`` the dampening
    fraction that was used (above ``percdamp`` where H needed more to factor).
    """
    nm = parse_pattern(pattern)
    if nm is not None and blocksize % nm[1]:
        # An N:M group must not straddle two blocks. The N:M mask is chosen group by group in OBS
        # order whatever the block, so rounding the block up to a multiple of M changes only how
        # the updates are batched (the same arithmetic, regrouped), not which weights are pruned.
        blocksize += nm[1] - blocksize % nm[1]
    Wf = W.float().clone()
    H = H.clone()
    cols = Wf.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Wf[:, dead] = 0
    Hinv, used = inverse_hessian_factor(H, percdamp)
    protected = torch.zeros_like(Wf, dtype=torch.bool)
    for r, c in protect:
        protected[r, c] = True
    full_mask = torch.zeros_like(Wf, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wf[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if nm is None:
            # Mask for the whole block at once, exact count: the lowest OBS errors w^2 / d^2.
            score = W1 ** 2 / d[None, :] ** 2
            score[protected[:, i1:i2]] = float("inf")
            mask1 = mask_from_scores(score, sparsity, "unstructured", per_row=False)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                # N:M mask chosen from the weights as updated so far (the OBS order).
                score = W1[:, i:i + nm[1]] ** 2 / d[i:i + nm[1]][None, :] ** 2
                score[protected[:, i1 + i:i1 + i + nm[1]]] = float("inf")
                mask1[:, i:i + nm[1]] = mask_from_scores(score, 0.0, pattern, per_row=True)
            w = W1[:, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Wf[:, i1:i2] = Q1
        full_mask[:, i1:i2] = mask1
        Wf[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the later columns
    W.copy_(Wf.to(W.dtype))
    return (full_mask, used) if return_damp else full_mask


MAX_DAMP_RETRIES = 6  # 10x more dampening each time: from 1e-5 of mean diag(H) to 10x it at most


def inverse_hessian_factor(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """(upper Cholesky factor of (H + d I)^-1, the dampening fraction used), d = percdamp x mean
    diag(H). Row i of the factor holds the OBS update for eliminating column i given that
    columns < i are fixed. A Hessian that is not positive definite at ``percdamp`` (too few
    calibration tokens, --sparsegpt-percdamp 0) gets SparseGPT's own remedy, more dampening:
    10x more (at least 1e-5) until it factors, a bounded number of times; the caller records it."""
    mean_diag, eye, damp = torch.mean(torch.diag(H)), torch.eye(H.shape[0], device=H.device), percdamp
    for _ in range(MAX_DAMP_RETRIES + 1):
        Hd = H + damp * mean_diag * eye
        L, info = torch.linalg.cholesky_ex(Hd)
        if not info.item():
            Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if not info.item() and torch.isfinite(Hinv).all():
                return Hinv, damp
        damp = max(10 * damp, 1e-5)
    raise C.UserError(f"SparseGPT: a layer Hessian is not positive definite even with dampening {damp / 10:g} x "
                      "mean diag(H) (non-finite activations?); try --prune-method wanda")


# --------------------------------------------------------------------------- layer-wise driver


class _Stop(Exception):
    pass


def capture_block_inputs(model, windows: torch.Tensor):
    """Run windows [n, seq_len] up to decoder block 0 and return (inputs, kwargs).

    ``inputs`` is a list of [1, seq_len, hidden] hidden states; ``kwargs`` holds what the
    model passes to every block (rotary ``position_embeddings``, attention mask,
    position ids), captured rather than rebuilt so that each architecture gets exactly
    what its own forward computes.
    """
    layers = C.decoder_layers(model)
    inputs, kwargs = [], {}

    def hook(module, args, kw):
        hidden = args[0] if args else kw.pop("hidden_states")
        inputs.append(hidden.detach())
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k not in ("hidden_states",)})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    dev = C.input_device(model)
    try:
        with torch.no_grad(), C.use_cache(model, False):
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


def _block_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _linear_inputs_stats(layer, inputs, kwargs, method, linears):
    """One pass of the block over all windows with hooks that accumulate, per linear,
    sum of squared input norms per channel (wanda, [in]) or H = 2 X X^T / n (sparsegpt)."""
    stats, counts, handles = {}, {}, []

    def make_hook(name):
        def hook(mod, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, in]
            n = x.shape[0]
            if method == "wanda":
                s = x.pow(2).sum(0)
            else:
                s = 2 * x.t() @ x
            stats[name] = stats[name] + s if name in stats else s
            counts[name] = counts.get(name, 0) + n
        return hook

    for name, mod in linears.items():
        handles.append(mod.register_forward_hook(make_hook(name)))
    try:
        with torch.no_grad():
            for h in inputs:
                layer(h, **kwargs)
    finally:
        for hd in handles:
            hd.remove()
    return {k: v / counts[k] if method == "sparsegpt" else v for k, v in stats.items()}


def _zero_(mod, mask: torch.Tensor) -> None:
    """Zero the weights of ``mod`` where ``mask`` ([out, in]) is True, in place."""
    with torch.no_grad():
        C.weight_view(mod)[mask.to(mod.weight.device)] = 0


def _prune_by_scores(model, calib_windows: torch.Tensor, config: PruneConfig, protect: dict,
                     damped: dict) -> Iterator:
    """magnitude and taylor, in place: scores of the whole model (taylor: gradients over the
    calibration windows), then one mask per matrix. Yields (block index, its linears) per block."""
    names_of = {m: n for n, m in model.named_modules()}
    layers = C.decoder_layers(model)
    all_linears = {names_of[m]: m for layer in layers for m in C.block_linears(layer).values()}
    scores = (saliency_scores(model, calib_windows, all_linears, config.taylor_score, config.progress)
              if config.method == "taylor" else None)
    for i, layer in enumerate(tqdm(layers, desc=f"{config.method} prune", disable=not config.progress)):
        linears = C.block_linears(layer)
        for mod in linears.values():
            full = names_of[mod]
            s = scores[full] if scores is not None else C.weight_view(mod).detach().abs().float()
            s = _protect(s.clone(), protect.get(full, ()))
            _zero_(mod, mask_from_scores(s, config.sparsity, config.pattern, per_row=config.method == "taylor"))
        yield i, linears


def _prune_layerwise(model, calib_windows: torch.Tensor, config: PruneConfig, protect: dict,
                     damped: dict) -> Iterator:
    """wanda and sparsegpt, in place, block by block as in their reference code: each block is
    pruned from its own calibration inputs and its pruned outputs feed the next block.
    Yields (block index, its linears) per block; ``damped`` gets each linear whose SparseGPT
    Hessian needed more dampening than asked, with the fraction used."""
    names_of = {m: n for n, m in model.named_modules()}
    inputs, kwargs = capture_block_inputs(model, calib_windows)
    layers = C.decoder_layers(model)
    for i, layer in enumerate(tqdm(layers, desc=f"{config.method} prune", disable=not config.progress)):
        linears = C.block_linears(layer)
        stats = _linear_inputs_stats(layer, inputs, kwargs, config.method, linears)
        for rel, mod in linears.items():
            full = names_of[mod]
            W = C.weight_view(mod)
            if config.method == "wanda":
                s = W.detach().abs().float() * stats[rel].sqrt().to(W.device)[None, :]
                s = _protect(s, protect.get(full, ()))
                _zero_(mod, mask_from_scores(s, config.sparsity, config.pattern, per_row=True))
            else:
                _, used = sparsegpt_prune(W, stats[rel].to(W.device), config.sparsity, config.pattern,
                                          config.blocksize, config.percdamp, protect.get(full, ()), return_damp=True)
                if used != config.percdamp:
                    damped[full] = used
        del stats
        with torch.no_grad():  # the pruned block's outputs feed the next block
            inputs = [_block_out(layer(h, **kwargs)).detach() for h in inputs]
        yield i, linears


def prune_model(model, tokenizer, calib: "C.Corpus | torch.Tensor", config: PruneConfig = PruneConfig()
                ) -> PruneResult:
    """Prune the decoder-block linear layers of ``model`` in place.

    Args:
        calib: the calibration corpus (``C.load_corpus(...)``), its token ids [n_tokens], or
            ready windows [n_windows, seq_len]. ``config.calib_samples`` windows of
            ``config.calib_seq_len`` tokens are drawn from it, seeded by ``config.seed``, as the
            pipeline draws them (``C.calibration_windows``: C4 and local JSON shards document
            by document, as the papers' get_c4). Unused by ``magnitude``.
        tokenizer: tokenizes a corpus, and detects super weights for ``config.protect="auto"``.
        config.protect: "auto", or (linear module name, row, col) coordinates that stay
            unpruned; module names are as in ``model.named_modules()``.
    Returns a PruneResult with the achieved sparsity per block and per matrix.
    """
    config = config.for_model(model)
    check_pattern_fits(model, config.pattern)
    calib_windows = C.calibration_windows(tokenizer, calib, config.calib_samples, config.calib_seq_len, config.seed)
    coords, found = protected_coordinates(model, tokenizer, config.protect, config.super_weight_prompt)
    t0 = time.perf_counter()
    dev0 = C.input_device(model)
    if dev0.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev0)
    protect: dict[str, list] = {}
    for name, r, c in coords:
        protect.setdefault(name, []).append((int(r), int(c)))
    nm = parse_pattern(config.pattern)
    result = PruneResult(config.method, config.pattern, config.sparsity if nm is None else 1 - nm[0] / nm[1], 0.0,
                         calibration={"windows": calib_windows.shape[0], "seq_len": calib_windows.shape[1]},
                         protected=[list(c) for c in coords], super_weights=found, config=asdict(config))
    names_of = {m: n for n, m in model.named_modules()}
    prune = _prune_by_scores if config.method in ("magnitude", "taylor") else _prune_layerwise
    total_zero = total = 0
    for i, linears in prune(model, calib_windows, config, protect, result.dampening_increased):
        z = n = 0
        for mod in linears.values():
            W = C.weight_view(mod)
            nz = int((W == 0).sum())
            result.per_matrix[names_of[mod]] = nz / W.numel()
            result.pruned_names.append(names_of[mod] + ".weight")
            z, n = z + nz, n + W.numel()
        result.per_layer[i] = z / n if n else 0.0
        total_zero, total = total_zero + z, total + n
    if result.dampening_increased:
        log.warning("SparseGPT: the Hessians of %d linears are not positive definite at --sparsegpt-percdamp %g; "
                    "more dampening was used (up to %g; recorded in results: prune.dampening_increased)",
                    len(result.dampening_increased), config.percdamp, max(result.dampening_increased.values()))
    result.overall_sparsity = total_zero / max(total, 1)
    result.seconds = time.perf_counter() - t0
    result.peak_memory_mb = C.peak_memory_mb(dev0)
    log.info("%s %s: sparsity %.4f over %d matrices in %.1f s", config.method, config.pattern,
             result.overall_sparsity, len(result.per_matrix), result.seconds)
    return result
