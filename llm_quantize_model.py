"""The quantize step: weight quantization of the decoder linears, the ``quantized`` variant.

Methods (both min-max per group of input columns, asymmetric as both papers, or symmetric with
``--quant-symmetric``: GPTQ's ``sym=True``, the uint4b8 / uint8b128 grids vLLM's Marlin kernels read):
    rtn   round to nearest (the RTN baseline of the GPTQ and AWQ papers).
    gptq  GPTQ (Frantar et al. 2023; IST-DASLab/gptq ``fasterquant``): OBS column by column on
          the layer Hessian H = 2 X X^T / n, the machinery of our SparseGPT kernel
          (``llm_compress``), blocks of 128 columns, optional act order, dampening 1%.
          Blocks are quantized in order and each block's quantized outputs feed the next, as
          the reference's sequential driver; the linears of one block share one calibration
          pass (the reference's default, without ``--true-sequential``).
Super weights (Yu et al. 2024; ``--protect-super-weights``) and optionally the top
``--quant-keep-fraction`` of weights by OBD saliency 0.5 F w^2 stay in full precision.

Mixed precision by sensitivity (HAWQ-style, Dong et al. 2019-2021; ``--bit-allocation``):
each linear gets 2, 3, 4 or 8 bits, minimising sum_l s_l ||Q_b(W_l) - W_l||^2 under an average
of ``--avg-bits`` code bits per weight, where s_l is the layer's mean diagonal curvature per
weight (Hutchinson tr(H)/n, or diagonal Fisher / n) and Q_b its RTN at b bits. Solved greedily
(``allocate_bits``): all layers start at 2 bits; the upgrade with the largest decrease of the
objective per added bit that fits the budget is taken until none fits.

The variant is stored as codes (uint8), per-group scales and zeros, the column-group index and
the kept weights (``llm_compress.Quantized``), and rebuilt bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import torch
from tqdm.auto import tqdm

import llm_common as C
import llm_data as D
import llm_io as IO
import llm_model as LM
import llm_variants as V
from llm_compress import (BITS_COUNTED, Quantized, capture_block_inputs, coded_weights, counted_bits,
                          gptq_quantize, grid_bits, linear_input_stats, next_block_inputs, rtn_quantize, save_codes,
                          stored_bits)
from llm_config import QuantizeConfig
from llm_output_error import held_out_windows, output_error
from llm_run import Run
from llm_sensitivity import (fisher_curvature, gradient_moments, layer_curvature, protect_top_fraction,
                             protected_coordinates)

log = logging.getLogger("llm.quantize")

BIT_CHOICES = (2, 3, 4, 8)


@dataclass
class QuantizeResult:
    method: str
    wbits: int
    group: int
    bits: dict = field(default_factory=dict)           # linear -> bits
    layer_bits: dict = field(default_factory=dict)     # "block index" -> mean code bits of its linears
    avg_code_bits: float = 0.0                         # code bits per weight over the quantized linears
    avg_bits: float = 0.0                              # the papers' count (BITS_COUNTED)
    bits_by_part: dict = field(default_factory=dict)   # that count's parts, bits per weight
    bits_counted: str = BITS_COUNTED                   # what that count counts, in words
    pruned_weights: int = 0                            # held at exactly zero (a pruned model's mask)
    budget_bits: Optional[float] = None                # --avg-bits of the mixed precision
    bit_allocation: str = "uniform"
    sensitivity: dict = field(default_factory=dict)    # linear -> mean curvature per weight (mixed precision)
    objective: dict = field(default_factory=dict)      # sum s ||Q(W) - W||^2: chosen, uniform at --wbits, matched
    matched_uniform: dict = field(default_factory=dict)  # the uniform baseline at the same bits (_matched_uniform)
    groups_used: dict = field(default_factory=dict)    # "g128" / "g128, tail 64" -> linears quantized so
    symmetric: bool = False
    kept_weights: int = 0
    super_weights: list = field(default_factory=list)  # detected for protect="auto"
    protected: list = field(default_factory=list)      # (module, row, col) kept in full precision
    rel_error: dict = field(default_factory=dict)      # linear -> ||Q(W) - W||_F / ||W||_F
    dampening_increased: dict = field(default_factory=dict)  # GPTQ: linear -> dampening used where H needed more
    # {"calibration" / "held_out": linear -> ||(W - Q) X|| / ||W X|| on --quant-error-windows windows of each}
    output_error: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    config: dict = field(default_factory=dict)
    quantized: dict = field(default_factory=dict)      # parameter name -> Quantized (not in results.json)


def allocate_bits(sensitivity: dict, error: dict, sizes: dict, budget: float, choices=BIT_CHOICES) -> dict:
    """Greedy multiple-choice knapsack: bits per layer from ``choices`` minimising
    sum_l sensitivity[l] x error[l][b] under sum_l sizes[l] x b <= budget x sum_l sizes[l].

    Start at the fewest bits everywhere; repeatedly take the upgrade (layer, b -> b') with the
    largest objective decrease per added bit that still fits. Budget left once no upgrade lowers
    the objective still buys bits (more bits never hurt): a layer whose sensitivity is 0 is
    upgraded by its own error decrease per bit, so ``--avg-bits 8`` gives 8 bits everywhere. A
    NaN sensitivity (not measurable) counts as the largest. Raises UserError when the budget is
    below the fewest bits."""
    lo = min(choices)
    total = sum(sizes.values())
    if budget < lo - 1e-9:
        raise C.UserError(f"--avg-bits {budget} is below the fewest bits ({lo})")
    sens = {n: math.inf if math.isnan(v) else max(v, 0.0) for n, v in sensitivity.items()}
    bits = {n: lo for n in sizes}
    used = lo * total
    cap = budget * total + 1e-6
    while True:
        best = None
        for n, b in bits.items():
            for b2 in choices:
                if b2 <= b or used + sizes[n] * (b2 - b) > cap:
                    continue
                drop = error[n][b] - error[n][b2]
                if not drop >= 0:  # more bits that would not lower the error (or a NaN error)
                    drop = 0.0
                gain = sens[n] * drop if sens[n] > 0 and drop > 0 else 0.0
                key = (gain / (sizes[n] * (b2 - b)), drop / (sizes[n] * (b2 - b)), -(b2 - b))
                if best is None or key > best[0]:
                    best = (key, n, b2)
        if best is None:
            return bits
        _, n, b2 = best
        used += sizes[n] * (b2 - bits[n])
        bits[n] = b2


def _keep_masks(model, tokenizer, linears: dict, moments: Optional[dict], config: QuantizeConfig
                ) -> tuple[dict, tuple, list]:
    """Per linear, the bool [out, in] mask of weights kept in full precision (super weights and
    the top ``keep_fraction`` by OBD saliency 0.5 F w^2, from ``gradient_moments``), or None;
    and the coordinates."""
    coords, found = protected_coordinates(model, tokenizer, config.protect, config.super_weight_prompt)
    if config.keep_fraction > 0:
        scores = {n: 0.5 * g2 * LM.weight_view(linears[n]).detach().float().pow(2) for n, (_, g2) in moments.items()}
    else:  # only the linears holding a protected coordinate need a mask (no [out, in] scores of zeros)
        named = {name for name, _, _ in coords}
        scores = {n: torch.empty(LM.weight_view(m).shape, device="meta") for n, m in linears.items() if n in named}
    masks = protect_top_fraction(scores, config.keep_fraction, coords)
    return {n: (masks[n] if n in masks and masks[n].any() else None) for n in linears}, coords, found


def _grid_bits(shapes: dict, bits: dict, group: int, symmetric: bool = False) -> int:
    """``grid_bits`` summed over linears of ``shapes`` {name: (out, in)} at ``bits`` per linear."""
    return sum(grid_bits(o, i, bits[n], group, symmetric) for n, (o, i) in shapes.items())


def _matched_uniform(linears: dict, bits: dict, keep: dict, sens: dict, config: QuantizeConfig) -> dict:
    """The uniform baseline at the mixed precision's own bits: RTN at the largest bit width that fits
    the budget, with the group size at which its scales and zeros bring it closest to, and not
    above, the mixed allocation's bits as the papers count them (smaller groups spend the bits the
    allocation spent on wider codes), and its objective sum s ||Q(W) - W||^2. The plain
    ``uniform_Nbit`` objective at --quant-group gets fewer bits than the allocation."""
    shapes = {n: tuple(LM.weight_view(m).shape) for n, m in linears.items()}
    target = _grid_bits(shapes, bits, config.group, config.symmetric)
    b = max(c for c in BIT_CHOICES if c <= config.budget_bits)
    flat = dict.fromkeys(shapes, b)
    widest = max(i for _, i in shapes.values())
    group = next((g for g in range(1, widest + 1) if _grid_bits(shapes, flat, g, config.symmetric) <= target),
                 widest)
    objective = sum(sens[n] * _sq_error(LM.weight_view(m), rtn_quantize(LM.weight_view(m).detach(), b, group,
                                                                        keep[n], config.zero_point, config.scale_dtype,
                                                                        config.symmetric))
                    for n, m in linears.items())
    total = sum(o * i for o, i in shapes.values())
    return {"name": f"uniform_{b}bit_g{group}", "wbits": b, "group": group, "objective": objective,
            "bits": _grid_bits(shapes, flat, group, config.symmetric) / total, "mixed_bits": target / total,
            "how": f"uniform {b}-bit RTN at the group size whose fp16 scales and {b}-bit zeros bring it closest to, "
                   "and not above, the mixed allocation's codes, scales and zeros per weight"}


def _sq_error(W: torch.Tensor, q: Quantized) -> float:
    return float((q.dequantize(torch.float32) - W.detach().float()).pow(2).sum())


def _block0(model, windows: torch.Tensor, shared: dict, seed: int):
    """Decoder block 0's inputs for ``windows`` (``capture_block_inputs``), computed once per
    calibration draw and reused while the input embedding is unchanged: the points of a grid and
    the pruned variants it quantizes (pruning changes only decoder linears) share them."""
    emb = model.get_input_embeddings().weight
    hit = shared.get(("block0", seed))
    if hit is None or not torch.equal(hit[0], emb):
        hit = shared[("block0", seed)] = (emb.detach().clone(), *capture_block_inputs(model, windows))
    return hit[1], hit[2]


def quantize_model(model, tokenizer, calib: "D.Corpus | torch.Tensor", config: QuantizeConfig = QuantizeConfig(),
                   keep_zeros: bool = False, shared: Optional[dict] = None) -> QuantizeResult:
    """Quantize the decoder-block linears of ``model`` in place.

    Args:
        calib: calibration corpus, its ids [n_tokens] or windows [n, seq_len]
            (``D.calibration_windows``); used by GPTQ, the keep fraction and the mixed precision.
        tokenizer: detects super weights for ``config.protect="auto"``.
        keep_zeros: ``model`` is pruned: its weights that are exactly 0 stay exactly 0 (their zero
            code; GPTQ spreads their error, ``gptq_quantize(zeros=...)``), and are counted by a
            bitmask instead of codes. Needs the integer zero point (raises UserError otherwise).
        shared: a dict kept across calls (``quantize_grid``): the calibration windows and block 0's
            inputs are computed once per calibration draw. Results are the same without it.
    Returns a QuantizeResult; ``.quantized`` holds each weight's codes and grids (what the
    pipeline stores), ``.bits`` the bits of each linear, ``.avg_bits`` the papers' count.
    """
    config = config.for_model(model)
    if keep_zeros and config.zero_point != "integer":
        raise C.UserError("--quant-zero-point float has no exact 0 on its grid, so it cannot keep a pruned "
                          "model's zeros: quantize pruned variants with --quant-zero-point integer")
    t0 = time.perf_counter()
    dev0 = LM.input_device(model)
    LM.reset_peak_memory(dev0)
    shared = {} if shared is None else shared
    key = ("windows", config.calib_samples, config.calib_seq_len, config.calibration_seed)
    if key not in shared:
        shared[key] = D.calibration_windows(tokenizer, calib, config.calib_samples, config.calib_seq_len,
                                            config.calibration_seed)
    windows = shared[key]
    linears = LM.decoder_linears(model)
    zeros = {n: LM.weight_view(m).detach() == 0 for n, m in linears.items()} if keep_zeros else {}
    sens_windows = windows[:config.sensitivity_windows]
    # The keep fraction's saliency and the Fisher allocation read the same per-window gradients:
    # one backward per window serves both.
    moments = gradient_moments(model, sens_windows, linears, config.progress) \
        if config.keep_fraction > 0 or config.bit_allocation == "fisher" else None
    keep, coords, found = _keep_masks(model, tokenizer, linears, moments, config)
    keep = {n: k & ~zeros[n].to(k.device) if k is not None and n in zeros else k for n, k in keep.items()}
    sizes = {n: LM.weight_view(m).numel() for n, m in linears.items()}
    res = QuantizeResult(config.method, config.wbits, config.group, bit_allocation=config.bit_allocation,
                         super_weights=found, protected=[list(c) for c in coords], config=asdict(config),
                         calibration={"windows": windows.shape[0], "seq_len": windows.shape[1]})
    bits = {n: config.wbits for n in linears}
    if config.bit_allocation != "uniform":
        res.budget_bits = config.budget_bits
        sens = fisher_curvature(moments) if config.bit_allocation == "fisher" else layer_curvature(
            model, sens_windows, linears, "hessian", config.sensitivity_probes, config.seed, config.progress)
        if any(not math.isfinite(v) for v in sens.values()):
            log.warning("--bit-allocation %s: the sensitivity of %s is not finite; those layers count as the most "
                        "sensitive", config.bit_allocation, ", ".join(n for n, v in sens.items() if not math.isfinite(v)))
        sens = {n: v if math.isnan(v) else max(v, 0.0) for n, v in sens.items()}  # negative Hutchinson: no curvature
        err = {n: {b: _sq_error(LM.weight_view(m), rtn_quantize(LM.weight_view(m).detach(), b, config.group, keep[n],
                                                                 config.zero_point, config.scale_dtype,
                                                                 config.symmetric))
                   for b in BIT_CHOICES} for n, m in linears.items()}
        bits = allocate_bits(sens, err, sizes, res.budget_bits)
        res.sensitivity = sens
        uniform_b = int(res.budget_bits) if int(res.budget_bits) in BIT_CHOICES else config.wbits
        res.objective = {"chosen": sum(sens[n] * err[n][bits[n]] for n in linears),
                         f"uniform_{uniform_b}bit": sum(sens[n] * err[n][uniform_b] for n in linears)}
        res.matched_uniform = _matched_uniform(linears, bits, keep, sens, config)
        res.objective[res.matched_uniform["name"]] = res.matched_uniform["objective"]
    res.bits = bits
    reference = _weights_before(linears)
    if config.method == "rtn":  # an exact 0 is on the integer grid: RTN keeps a pruned zero by itself
        for n, m in tqdm(linears.items(), desc="rtn", disable=not config.progress):
            W = LM.weight_view(m)
            q = rtn_quantize(W.detach(), bits[n], config.group, keep[n], config.zero_point, config.scale_dtype,
                             config.symmetric)
            res.quantized[n + ".weight"] = q
            _write(W, q, res, n, reference[n])
    else:
        inputs, kwargs = _block0(model, windows, shared, config.calibration_seed)
        names_of = LM.module_names(model)
        for layer in tqdm(LM.decoder_layers(model), desc="gptq", disable=not config.progress):
            block = LM.block_linears(layer)
            H = linear_input_stats(layer, inputs, kwargs, "hessian", block)
            for rel, m in block.items():
                n = names_of[m]
                W = LM.weight_view(m)
                q = gptq_quantize(W.detach(), H[rel].to(W.device), bits[n], config.group, config.blocksize,
                                  config.percdamp, config.act_order, keep[n], config.zero_point, zeros.get(n),
                                  config.scale_dtype, config.symmetric)
                q.dequantized = None
                if q.damp != config.percdamp:
                    res.dampening_increased[n] = q.damp
                res.quantized[n + ".weight"] = q
                _write(W, q, res, n, reference[n])
            del H
            inputs = next_block_inputs(layer, inputs, kwargs)  # quantized outputs feed the next block
    # Issue 34: each linear's output error on calibration windows and on a disjoint draw (overfitting)
    seen = windows[:config.error_windows]
    if config.error_windows:
        if key + ("held out",) not in shared:  # one disjoint draw serves every point and model of a grid
            shared[key + ("held out",)] = held_out_windows(tokenizer, calib, windows, config.calibration_seed,
                                                           len(seen))
        held = shared[key + ("held out",)]
        res.output_error = {"calibration": output_error(model, seen, reference),
                            "held_out": output_error(model, held, reference),
                            "calibration_windows": len(seen), "held_out_windows": int(held.shape[0])}
    del reference
    total = sum(sizes.values())
    res.kept_weights = sum(int(k.sum()) for k in keep.values() if k is not None)
    res.pruned_weights = sum(int(z.sum()) for z in zeros.values())
    parts: dict = {}
    for n in linears:
        q = res.quantized[n + ".weight"]
        for part, v in counted_bits(q, bits[n], config.act_order and config.method == "gptq",
                                    int(zeros[n].sum()) if n in zeros else 0).items():
            parts[part] = parts.get(part, 0) + v
    res.bits_by_part = {k: v / total for k, v in parts.items()}
    for n in linears:  # the groups actually used: a width that is not a multiple has a narrower tail group
        q = res.quantized[n + ".weight"]
        gs, inp = int((q.g_idx == 0).sum()), q.codes.shape[1]
        key = f"g{gs}" + (f", tail {inp % gs}" if inp % gs else "")
        res.groups_used[key] = res.groups_used.get(key, 0) + 1
    res.symmetric = config.symmetric
    res.avg_code_bits = sum(sizes[n] * bits[n] for n in linears) / total
    res.avg_bits = sum(parts.values()) / total
    per_layer: dict = {}
    for i, layer in enumerate(LM.decoder_layers(model)):
        mine = set(LM.block_linears(layer).values())  # once per block, not once per linear of the model
        mods = [n for n in linears if linears[n] in mine]
        per_layer[str(i)] = sum(bits[n] * sizes[n] for n in mods) / max(sum(sizes[n] for n in mods), 1)
    res.layer_bits = per_layer
    res.seconds = time.perf_counter() - t0
    res.peak_memory_mb = LM.peak_memory_mb(dev0)
    log.info("%s: %.3f code bits per weight (%.3f as the papers count) over %d linears in %.1f s", config.method,
             res.avg_code_bits, res.avg_bits, len(linears), res.seconds)
    return res


def quantize_grid(model, tokenizer, calib, config: QuantizeConfig, keep_zeros: bool = False,
                  shared: Optional[dict] = None) -> Iterator[tuple[QuantizeConfig, QuantizeResult]]:
    """Every point of a grid config (``config.grid_points()``: several methods, bits, groups,
    allocations or calibration draws), each quantized in place from the model as it is, which
    is restored bit for bit before the next point and at the end:

        for point, res in quantize_grid(model, tok, corpus, QuantizeConfig(method="gptq", wbits=(4, 3))):
            ppl[point.variant_name()] = evaluate_model(model, tok, ids).perplexity

    The calibration windows and block 0's inputs are computed once per draw (pass the same
    ``shared`` dict to share them across models too). Each point equals ``quantize_model`` on
    that point alone."""
    names = [n + ".weight" for n in LM.decoder_linears(model)]
    shared = {} if shared is None else shared
    for point in config.grid_points():
        with V.restored_on_exit(model, names):
            yield point, quantize_model(model, tokenizer, calib, point, keep_zeros, shared)


def _weights_before(linears: dict) -> dict:
    """output_error's W: a copy of the weights before quantization (on the CPU), the one copy of
    every weight the step makes; its relative errors read them too."""
    return {n: LM.weight_view(m).detach().to("cpu", copy=True) for n, m in linears.items()}


def _write(W: torch.Tensor, q: Quantized, res: QuantizeResult, name: str, before: torch.Tensor) -> None:
    """Put the dequantized values into the live weight (in place) and record the error against
    ``before``, the weights as they were (the copy output_error keeps: none made here)."""
    with torch.no_grad():
        W.copy_(q.dequantize(W.dtype))
        old = before.to(W.device).float()
        res.rel_error[name] = float((W.float() - old).norm() / old.norm().clamp(min=1e-30))


def _sources(run: Run, config: QuantizeConfig) -> list[str]:
    """The models ``--quantize-from`` names: ``live`` and/or variants of this run (patterns)."""
    made = [n for n in run.variants if "+quantized" not in n and not n.startswith("quantized")]
    return V.select_variants(made, config.source, run.live, flag="--quantize-from")


def pipeline_step(run: Run, config: QuantizeConfig) -> Optional[str]:
    """The pipeline's quantize step: the ``quantized`` variant of the live model (one per point of a
    grid, ``quantized[gptq,3,g128]``; of each ``--quantize-from`` variant too,
    ``pruned[wanda,2:4]+quantized[gptq,3,g128]``, its zeros kept exactly zero), stored as its
    integer codes and scales (or, with --save-variants, tensors); "off" for --quant-method none.
    The calibration windows and block 0's inputs are computed once for all of them."""
    if config.method == "none":  # no quantized variant
        run.results["quantize"] = {"status": "off", "parent": run.live}
        for name in [n for n in run.variants if n.startswith("quantized") or "+quantized" in n]:
            run.variants.pop(name)
        return "off"
    sources, shared, records = _sources(run, config), {}, []
    for source in sources:
        sparse = source.startswith("pruned")  # a pruned variant: its zeros stay zero
        with V.applied_variant(run.model, run.variants[source]):
            for point, res in quantize_grid(run.model, run.tokenizer, run.texts["train"], config, sparse, shared):
                name = point.variant_name()
                name = name if source == run.live else f"{source}+{name}"
                rec = V.store_variant(run.out, name, run.model, list(res.quantized), mask=False) if \
                    run.cfg.run.save_variants else save_codes(run.out, V.file_stem(name), res.quantized)
                if rec.get("format") == "codes":  # the bytes written per quantized weight
                    rec["stored_bits_per_weight"] = stored_bits(run.out / rec["checkpoint"],
                                                                sum(q.codes.numel() for q in res.quantized.values()))
                d = {f.name: getattr(res, f.name) for f in dataclasses.fields(res) if f.name != "quantized"}
                records.append({**IO.to_strict_json(d), **rec, "status": "ran", "parent": source, "name": name,
                                "calibration_seed": point.calibration_seed})
    for rec in records:
        run.add_variant(rec["name"], variants_of(run, {"grid": [rec]})[rec["name"]], rec["parent"])
    if len(records) == 1:  # one variant: the section is its record, as a single step's
        records[0] = {k: v for k, v in records[0].items() if k not in ("name", "calibration_seed")}
    run.results["quantize"] = records[0] if len(records) == 1 else {**records[0], "grid": records}
    return None


def variants_of(run: Run, section: dict) -> dict:
    """{"quantized" (or one per grid point and quantized model, "quantized[gptq,3,g128]",
    "pruned[...]+quantized[...]"): its weights from its codes or tensors, or None when gone}."""
    return {r.get("name", "quantized"): V.variant_weights(
        run.out, r, from_codes=lambda p: functools.partial(coded_weights, path=p))
        for r in section.get("grid") or [section]}


def planned(config: QuantizeConfig, names: list, live: str) -> tuple[list, str]:
    """Before loading: --quantize-from checked against the models the run will hold when this step
    runs (a typo, ``quantized``, ``ALL`` or a variant of a step not run is one error line now, not
    after the earlier steps ran), and the variant names it adds."""
    if config.method == "none":  # no variant; --quantize-from is named as ignored
        return names, live
    made = [n for n in names if "+quantized" not in n and not n.startswith("quantized")]
    sources = V.select_variants(made, config.source, live, flag="--quantize-from")
    points = config.grid_points()
    return names + [p.variant_name() if s == live else f"{s}+{p.variant_name()}" for s in sources for p in points], live
