"""The prune step: sensitivity-based pruning of the linear layers inside the decoder blocks.

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

import dataclasses
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Optional

import torch
from tqdm.auto import tqdm

import llm_common as C
import llm_data as D
import llm_model as LM
import llm_variants as V
from llm_compress import (MAX_DAMP_RETRIES, block_out, bounded_allocation, capture_block_inputs, exact_counts,  # noqa: F401
                          inverse_hessian_factor, linear_input_stats, next_block_inputs, split_count)
from llm_config import PruneConfig
from llm_knobs import parse_nm
from llm_run import Run
from llm_sensitivity import layer_curvature, protected_coordinates, saliency_scores

log = logging.getLogger("llm.prune")

@dataclass
class Shared:
    """Work that every point of a grid shares, done once on the unpruned model: the calibration
    windows, the protected coordinates, decoder block 0's inputs and its linears' input
    statistics (every point prunes block 0 from the same inputs), and the layer scores of a
    non-uniform allocation. Keys say what each was computed from."""

    done: dict = field(default_factory=dict)

    def get(self, key: tuple, compute):
        if key not in self.done:
            self.done[key] = compute()
        return self.done[key]


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
    layer_sparsity: dict = field(default_factory=dict)  # "block index" -> achieved sparsity (zeros / weights)
    allocation: dict = field(default_factory=dict)   # mode, allocated target per layer, layer scores, M, lambda
    target_weights: int = 0                           # weights the allocation prunes: round(target x total)
    pruned_weights: int = 0                           # zeros over the pruned matrices after pruning
    total_weights: int = 0                            # weights of the pruned matrices


def check_pattern_fits(model, pattern: str) -> None:
    """Refuse, right after loading and before calibration, an N:M pattern whose M does not divide
    the input width of every decoder linear (no kernel can prune a partial group)."""
    nm = parse_nm(pattern)
    if nm is None:
        return
    bad = sorted({LM.weight_view(m).shape[1] for m in LM.decoder_linears(model).values()} - {0})
    bad = [w for w in bad if w % nm[1]]
    if bad:
        raise C.UserError(f"--sparsity-pattern {pattern}: the model's linear input widths {bad} are not multiples "
                          f"of {nm[1]}; choose an M that divides them (2:4 and 4:8 fit most models)")


# --------------------------------------------------------------------------- masks


def mask_from_scores(scores: torch.Tensor, sparsity: float, nm: Optional[tuple[int, int]], per_row: bool,
                     count: Optional[int] = None) -> torch.Tensor:
    """Boolean prune mask (True = remove) from scores [out, in]; low score = pruned first.

    Exact counts: unstructured per row removes int(in * sparsity) weights from every row
    (per matrix: int(numel * sparsity)); given ``count``, exactly ``count`` weights instead
    (per row: count // rows from every row and one more from the first count % rows rows,
    so the comparison stays within rows as in Wanda); N:M removes M - N weights from every
    group of M consecutive columns. Scores of +inf (protected weights) are never pruned unless
    a row has nothing else left.
    """
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if nm is not None:
        n, m = nm
        rows, cols = scores.shape
        if cols % m:
            raise C.UserError(f"N:M pattern {n}:{m} needs the input size ({cols}) to be a multiple of {m}")
        groups = scores.reshape(rows, cols // m, m)
        idx = torch.topk(groups, m - n, dim=-1, largest=False).indices
        return mask.reshape(rows, cols // m, m).scatter_(-1, idx, True).reshape(rows, cols)
    if per_row and count is not None:
        rows, cols = scores.shape
        base, extra = divmod(int(count), rows)
        k = base + (extra > 0)
        if k > cols:
            raise ValueError(f"cannot prune {count} of {rows} x {cols} weights")
        if k:
            idx = torch.topk(scores, k, dim=1, largest=False, sorted=True).indices  # lowest first
            take = torch.ones(idx.shape, dtype=torch.bool, device=scores.device)
            if extra:  # only the first ``extra`` rows lose their k-th lowest
                take[:, -1] = torch.arange(rows, device=scores.device) < extra
            mask.scatter_(1, idx, take)
        return mask
    if per_row:
        k = int(scores.shape[1] * sparsity)
        if k:
            mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
        return mask
    k = int(scores.numel() * sparsity) if count is None else int(count)
    if k:
        mask.view(-1)[torch.topk(scores.flatten(), k, largest=False).indices] = True
    return mask


def _protect(scores: torch.Tensor, coords: Iterable[tuple[int, int]]) -> torch.Tensor:
    for r, c in coords:
        scores[r, c] = float("inf")
    return scores


# --------------------------------------------------------------------------- sparsegpt


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, nm: Optional[tuple[int, int]] = None,
                    blocksize: int = 128, percdamp: float = 0.01,
                    protect: Iterable[tuple[int, int]] = (), return_damp: bool = False, count: Optional[int] = None):
    """OBS pruning of one weight matrix, in place.

    Args:
        W: [out, in] weight (any float dtype); overwritten with the pruned, updated weight.
        H: [in, in] layer Hessian 2 X X^T / n_tokens accumulated in float32.
        count: unstructured only: prune exactly this many weights of W, split over the column
            blocks in proportion to their size (else int(block size x sparsity) per block).
    Returns the prune mask [out, in] (True = removed), and with ``return_damp`` the dampening
    fraction that was used (above ``percdamp`` where H needed more to factor).
    """
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
    starts = list(range(0, cols, blocksize))
    per_block = split_count(count, [Wf.shape[0] * (min(s + blocksize, cols) - s) for s in starts]) \
        if count is not None and nm is None else [None] * len(starts)
    for i1, k_block in zip(starts, per_block):
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
            mask1 = mask_from_scores(score, sparsity, None, per_row=False, count=k_block)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                # N:M mask chosen from the weights as updated so far (the OBS order).
                score = W1[:, i:i + nm[1]] ** 2 / d[i:i + nm[1]][None, :] ** 2
                score[protected[:, i1 + i:i1 + i + nm[1]]] = float("inf")
                mask1[:, i:i + nm[1]] = mask_from_scores(score, 0.0, nm, per_row=True)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)  # the reference's clone-then-index, in one op
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Wf[:, i1:i2] = Q1
        full_mask[:, i1:i2] = mask1
        Wf[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the later columns
    W.copy_(Wf.to(W.dtype))
    return (full_mask, used) if return_damp else full_mask


# --------------------------------------------------------------------------- layer-wise driver


def _zero_(mod, mask: torch.Tensor) -> None:
    """Zero the weights of ``mod`` where ``mask`` ([out, in]) is True, in place."""
    with torch.no_grad():
        LM.weight_view(mod)[mask.to(mod.weight.device)] = 0


def _prune_by_scores(model, calib_windows: torch.Tensor, config: PruneConfig, protect: dict,
                     damped: dict, counts: dict, shared: Shared) -> Iterator:
    """magnitude and taylor, in place: scores of the whole model (taylor: gradients over the
    calibration windows), then one mask per matrix of ``counts[name]`` weights (None: N:M).
    Yields (block index, its linears) per block."""
    names_of = LM.module_names(model)
    layers = LM.decoder_layers(model)
    all_linears = {names_of[m]: m for layer in layers for m in LM.block_linears(layer).values()}
    scores = (shared.get(("taylor", config.taylor_score, config.calibration_seed), lambda: saliency_scores(
        model, calib_windows, all_linears, config.taylor_score, config.progress)) if config.method == "taylor" else None)
    for i, layer in enumerate(tqdm(layers, desc=f"{config.method} prune", disable=not config.progress)):
        linears = LM.block_linears(layer)
        for mod in linears.values():
            full = names_of[mod]
            s = scores[full] if scores is not None else LM.weight_view(mod).detach().abs().float()
            s = _protect(s.clone(), protect.get(full, ()))
            _zero_(mod, mask_from_scores(s, config.sparsity, config.nm, per_row=config.method == "taylor",
                                         count=counts.get(full)))
        yield i, linears


def _prune_layerwise(model, calib_windows: torch.Tensor, config: PruneConfig, protect: dict,
                     damped: dict, counts: dict, shared: Shared) -> Iterator:
    """wanda and sparsegpt, in place, block by block as in their reference code: each block is
    pruned from its own calibration inputs and its pruned outputs feed the next block; each
    matrix loses ``counts[name]`` weights (None: N:M). Yields (block index, its linears) per
    block; ``damped`` gets each linear whose SparseGPT Hessian needed more dampening than
    asked, with the fraction used."""
    names_of = LM.module_names(model)
    inputs, kwargs = shared.get(("block0", config.calibration_seed), lambda: capture_block_inputs(model, calib_windows))
    layers = LM.decoder_layers(model)
    kind = "wanda" if config.method == "wanda" else "hessian"
    for i, layer in enumerate(tqdm(layers, desc=f"{config.method} prune", disable=not config.progress)):
        linears = LM.block_linears(layer)
        # Block 0 sees the same inputs at every point of a grid: its statistics are computed once.
        stats = shared.get(("stats0", kind, config.calibration_seed),
                           lambda: linear_input_stats(layer, inputs, kwargs, kind, linears)) \
            if i == 0 else linear_input_stats(layer, inputs, kwargs, kind, linears)
        for rel, mod in linears.items():
            full = names_of[mod]
            W = LM.weight_view(mod)
            if config.method == "wanda":
                s = W.detach().abs().float() * stats[rel].sqrt().to(W.device)[None, :]
                s = _protect(s, protect.get(full, ()))
                _zero_(mod, mask_from_scores(s, config.sparsity, config.nm, per_row=True, count=counts.get(full)))
            else:
                _, used = sparsegpt_prune(W, stats[rel].to(W.device), config.sparsity, config.nm,
                                          config.blocksize, config.percdamp, protect.get(full, ()), return_damp=True,
                                          count=counts.get(full))
                if used != config.percdamp:
                    damped[full] = used
        stats = None
        inputs = next_block_inputs(layer, inputs, kwargs)  # the pruned block's outputs feed the next block
        yield i, linears


# --------------------------------------------------------------------------- layer-wise allocation


def owl_outlier_ratios(model, calib_windows: torch.Tensor, m: float, progress: bool = False) -> list[float]:
    """OWL's layer outlier ratio (Yin et al. 2024, luuyin/OWL ``check_outlier_mean``), per decoder
    block of the unpruned model: the fraction of the block's Wanda scores |W_ij| ||X_j||_2 (all its
    linears together) above ``m`` x their mean. Inputs flow through the unpruned blocks, as in the
    OWL code's first pass. (OWL reports a percentage; the allocation is invariant to the unit.)"""
    inputs, kwargs = capture_block_inputs(model, calib_windows)
    ratios = []
    for layer in tqdm(LM.decoder_layers(model), desc="owl ratios", disable=not progress):
        linears = LM.block_linears(layer)
        stats = linear_input_stats(layer, inputs, kwargs, "wanda", linears)
        scores = torch.cat([(LM.weight_view(mod).detach().abs().float() * stats[rel].sqrt().to(mod.weight.device)[None, :])
                            .flatten() for rel, mod in linears.items()])
        ratios.append(float((scores > m * scores.mean()).sum()) / scores.numel())
        inputs = next_block_inputs(layer, inputs, kwargs)
    return ratios


def allocate_sparsity(model, calib_windows: torch.Tensor, config: PruneConfig, shared: Optional[Shared] = None
                      ) -> dict:
    """Per-layer sparsity and exact per-matrix prune counts for ``config.allocation``.

    uniform: every layer at the target. owl: OWL's outlier ratios (``owl_outlier_ratios``) in
    OWL's bounded rule (``bounded_allocation``: target +- lambda, more outliers keep more).
    hessian / fisher (ours): the same bounded rule on log mean diagonal curvature per weight of
    the layer (Hutchinson tr(H)/n, or diagonal-Fisher mass / n, on the first
    ``allocation_windows`` calibration windows): layers with more curvature per weight keep
    more weights. The log, because curvatures span orders of magnitude across layers and a
    min-max of raw values would put every layer but the first at one end. In every mode the
    counts add up to round(target x total weights), exactly (``exact_counts``).
    Returns {"layer_sparsity": [target per layer], "counts": {linear: weights to prune},
    "scores": [per-layer score] or None}."""
    names_of = LM.module_names(model)
    layers = LM.decoder_layers(model)
    mats = [{names_of[m]: LM.weight_view(m).numel() for m in LM.block_linears(layer).values()} for layer in layers]
    sizes = [sum(d.values()) for d in mats]
    shared = shared or Shared()
    scores = None
    if config.allocation == "owl":  # scores of the unpruned model: shared by every point of a grid
        scores = shared.get(("owl", config.owl_m, config.calibration_seed),
                            lambda: owl_outlier_ratios(model, calib_windows, config.owl_m, config.progress))
    elif config.allocation in ("hessian", "fisher"):
        scores = shared.get((config.allocation, config.allocation_windows, config.allocation_probes,
                             config.calibration_seed),
                            lambda: _curvature_scores(model, calib_windows, config, mats))
    target = config.sparsity
    layer_s = [target] * len(layers) if scores is None else bounded_allocation(scores, sizes, target, config.owl_lambda)
    k_layer = exact_counts(layer_s, sizes, target)
    counts = {}
    for d, k in zip(mats, k_layer):
        counts.update(zip(d, split_count(k, list(d.values()))))
    return {"layer_sparsity": layer_s, "counts": counts, "scores": scores}


def _curvature_scores(model, calib_windows: torch.Tensor, config: PruneConfig, mats: list) -> list[float]:
    linears = {n: model.get_submodule(n) for d in mats for n in d}
    windows = calib_windows[:config.allocation_windows]
    per_weight = layer_curvature(model, windows, linears, config.allocation, config.allocation_probes,
                                 config.seed, config.progress)
    raw = [sum(per_weight[n] * k for n, k in d.items()) / sum(d.values()) for d in mats]
    floor = min((x for x in raw if x > 0), default=1e-30)  # a Hutchinson estimate can come out <= 0
    return [math.log(max(x, floor)) for x in raw]


def prune_model(model, tokenizer, calib: "D.Corpus | torch.Tensor", config: PruneConfig = PruneConfig(),
                shared: Optional[Shared] = None) -> PruneResult:
    """Prune the decoder-block linear layers of ``model`` in place.

    Args:
        calib: the calibration corpus (``D.load_corpus(...)``), its token ids [n_tokens], or
            ready windows [n_windows, seq_len]. ``config.calib_samples`` windows of
            ``config.calib_seq_len`` tokens are drawn from it, seeded by ``config.seed``, as the
            pipeline draws them (``D.calibration_windows``: C4 and local JSON shards document
            by document, as the papers' get_c4). Unused by ``magnitude``.
        tokenizer: tokenizes a corpus, and detects super weights for ``config.protect="auto"``.
        config.protect: "auto", or (linear module name, row, col) coordinates that stay
            unpruned; module names are as in ``model.named_modules()``.
        shared: work shared across the points of a grid (``prune_grid``); it must have been
            filled from this very unpruned model and calibration text.
    Returns a PruneResult with the achieved sparsity per block and per matrix.
    Raises UserError for a grid config (several values of method, sparsity or pattern): use
    ``prune_grid``.
    """
    config = config.for_model(model)
    if config.grid_axes():
        raise C.UserError(f"prune_model prunes one point; this config is a grid of {len(config.grid_points())} "
                          "(use prune_grid)")
    shared = shared or Shared()
    check_pattern_fits(model, config.pattern)
    calib_windows = shared.get(("windows", config.calib_samples, config.calib_seq_len, config.calibration_seed),
                               lambda: D.calibration_windows(tokenizer, calib, config.calib_samples,
                                                             config.calib_seq_len, config.calibration_seed))
    coords, found = shared.get(("protect", config.protect, config.super_weight_prompt), lambda: protected_coordinates(
        model, tokenizer, config.protect, config.super_weight_prompt))
    t0 = time.perf_counter()
    dev0 = LM.input_device(model)
    if dev0.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev0)
    protect: dict[str, list] = {}
    for name, r, c in coords:
        protect.setdefault(name, []).append((int(r), int(c)))
    nm = config.nm
    result = PruneResult(config.method, config.pattern, config.sparsity if nm is None else 1 - nm[0] / nm[1], 0.0,
                         calibration={"windows": calib_windows.shape[0], "seq_len": calib_windows.shape[1],
                                      "seed": config.calibration_seed},
                         protected=[list(c) for c in coords], super_weights=found, config=asdict(config))
    names_of = LM.module_names(model)
    counts = {}
    if nm is None:  # N:M fixes every layer at 1 - N/M (non-uniform allocation is refused by the config)
        alloc = allocate_sparsity(model, calib_windows, config, shared)
        counts = alloc["counts"]
        result.allocation = {"mode": config.allocation, "target": {str(i): s for i, s in enumerate(alloc["layer_sparsity"])},
                             "scores": alloc["scores"], "owl_m": config.owl_m, "lambda": config.owl_lambda}
        result.target_weights = sum(counts.values())
    prune = _prune_by_scores if config.method in ("magnitude", "taylor") else _prune_layerwise
    total_zero = total = 0
    for i, linears in prune(model, calib_windows, config, protect, result.dampening_increased, counts, shared):
        z = n = 0
        for mod in linears.values():
            W = LM.weight_view(mod)
            nz = int((W == 0).sum())
            result.per_matrix[names_of[mod]] = nz / W.numel()
            result.pruned_names.append(names_of[mod] + ".weight")
            z, n = z + nz, n + W.numel()
        result.per_layer[i] = z / n if n else 0.0
        result.layer_sparsity[str(i)] = result.per_layer[i]
        total_zero, total = total_zero + z, total + n
    if result.dampening_increased:
        log.warning("SparseGPT: the Hessians of %d linears are not positive definite at --sparsegpt-percdamp %g; "
                    "more dampening was used (up to %g; recorded in results: prune.dampening_increased)",
                    len(result.dampening_increased), config.percdamp, max(result.dampening_increased.values()))
    result.overall_sparsity = total_zero / max(total, 1)
    result.pruned_weights, result.total_weights = total_zero, total
    result.seconds = time.perf_counter() - t0
    result.peak_memory_mb = LM.peak_memory_mb(dev0)
    log.info("%s %s: sparsity %.4f over %d matrices in %.1f s", config.method, config.pattern,
             result.overall_sparsity, len(result.per_matrix), result.seconds)
    return result


def prune_grid(model, tokenizer, calib: "D.Corpus | torch.Tensor", config: PruneConfig, shard: bool = False
               ) -> Iterator[tuple[PruneConfig, PruneResult]]:
    """Every point of a grid config (``config.grid_points()``: several methods, sparsities or
    patterns), each pruned in place from the unpruned model, which is restored bit for bit
    before the next point and at the end:

        for point, res in prune_grid(model, tok, corpus, PruneConfig(method=("wanda", "sparsegpt"),
                                                                   sparsity=(0.5, 0.6))):
            ppl[point.variant_name(True)] = evaluate_model(model, tok, ids).perplexity

    The calibration windows are drawn once, and what depends only on the unpruned model is
    computed once (``Shared``). Each point equals ``prune_model`` on that point alone. With
    ``shard`` under ``accelerate launch``/torchrun, this rank yields only its points (every
    world_size-th, ``llm_common.shard_jobs``); the caller gathers them."""
    config = config.for_model(model)
    names = [n + ".weight" for n in LM.decoder_linears(model)]
    shared = Shared()
    points = config.grid_points()
    for _, point in (C.shard_jobs(points) if shard else enumerate(points)):
        with V.restored_on_exit(model, names):
            yield point, prune_model(model, tokenizer, calib, point, shared)


def pipeline_step(run: Run, config: PruneConfig) -> None:
    """The pipeline's prune: the ``pruned`` variant of the live model (one per point of a grid,
    named ``pruned[method,sparsity,pattern]``), calibrated on the train text drawn the papers'
    way, stored as a 1-bit mask (or SparseGPT's changed tensors); the live model itself is left
    unpruned. A grid records ``prune.grid``: one record per point, each as a single run's."""
    train = run.texts["train"]  # the step draws its windows: C4 document by document
    grid = bool(config.grid_axes())
    source = run.live if config.source == "auto" else config.source
    if source not in run.variants:
        raise C.UserError(f"--prune-from {config.source}: this run has no such model (it has "
                          f"{', '.join(run.variants)}); fine-tuned needs the finetune step")
    order = {p.variant_name(grid): i for i, p in enumerate(config.grid_points())}
    records = []  # (grid index, record): under accelerate launch each rank prunes its own points
    with V.applied_variant(run.model, run.variants[source]):  # None: the live model itself
        for point, res in prune_grid(run.model, run.tokenizer, train, config, shard=True):
            name = point.variant_name(grid)
            # Only SparseGPT changes the weights it keeps; the others' variant is exactly a 1-bit mask.
            rec = V.store_variant(run.out, name, run.model, res.pruned_names,
                                  mask=res.method != "sparsegpt" and not run.cfg.run.save_variants)
            d = {k: v for k, v in dataclasses.asdict(res).items() if k != "pruned_names"}
            d["calibration"].update(source=train.source, per_document=train.docs is not None)
            records.append((order[name], {**d, **rec, "parent": source, "name": name}))
    records = C.gather_jobs(records)  # every rank's files are written before any rank reads them
    run.results["prune"] = {"grid": records, "parent": source} if grid else \
        {k: v for k, v in records[0].items() if k != "name"}
    for name, weights in variants_of(run, run.results["prune"]).items():
        run.add_variant(name, weights, source)


def variants_of(run: Run, section: dict) -> dict:
    """{variant name: its weights, or None when its file is gone} from the step's section."""
    records = section.get("grid") or [section]
    return {r.get("name", "pruned"): V.variant_weights(run.out, r) for r in records}


def check_model(model, config: PruneConfig) -> None:
    """Right after loading: an N:M pattern the model's widths cannot take fails now, before
    calibration; every pattern of a grid (``--sparsity-pattern unstructured,2:4``) is checked."""
    for point in config.grid_points():
        check_pattern_fits(model, point.pattern)


def planned(config: PruneConfig, names: list, live: str) -> tuple[list, str]:
    """Before loading: the variant names the run holds after this step (one per grid point), so that
    --robustness-variants and --quantize-from are checked against them from the flags alone."""
    source = live if config.source == "auto" else config.source
    if source not in names:  # names: every model the run may hold by then, so nothing valid is refused
        raise C.UserError(f"--prune-from {config.source}: this run will have no such model (it will have "
                          f"{', '.join(names)}); fine-tuned needs the finetune step")
    grid = bool(config.grid_axes())
    return names + [p.variant_name(grid) for p in config.grid_points()], live
