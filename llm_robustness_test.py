"""The noise step: weight-noise robustness, as a measured curve rather than one saturated number.

Noise modes (``NoiseConfig.mode``), with xi ~ N(0, 1) drawn per weight:
    absolute        W + eps * xi                  (the historical setting, eps = 0.05)
    relative        W + eps * std(W) * xi          (std per tensor)
    multiplicative  W * (1 + eps * xi)
    bitflip         each bit of the 16-bit (bf16 or fp16) view flips with probability eps;
                    fp32 weights flip bits of their top 16 bits, which *are* the bf16 view,
                    so only the flipped bits change.
Parameter groups: all, linears (decoder-block linears), layer:N, module:NAME (q_proj,
k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, ...), embeddings, norms. Tied
tensors (SmolLM2's embedding and lm_head) are perturbed once.

``apply_robustness_test`` is the whole step: the eps sweep (without, then with the most
Fisher-salient weights and any super weights kept clean), the layer x module map, and last
the noisy variant, left in the model. ``noisy_weights`` is the context manager that
perturbs in place and restores bit for bit (one spare copy of the perturbed tensors).
``noise_sweep`` measures perplexity, NLL, KL and top-1 agreement over an eps grid and
several seeds; ``sensitivity_map`` perturbs one (layer, module type) cell at a time.

The embedded SmolLM2 was quantized to GGUF Q4_1 before we dequantized it: its decoder
linears sit on 16 levels per block of 32 (fp16 scale, unrounded minimum), which 4-bit RTN
with ``--quant-group 32 --quant-zero-point float`` reproduces exactly; GPTQ's integer zero
point reproduces 0.27% of them (4-bit RTN at group 128: WikiText-2 perplexity 29.19 -> 40.60).
Noise much smaller than a grid step moves weights off the grid without changing what the
grid can represent.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import llm_common as C
import llm_data as D
import llm_io as IO
import llm_model as LM
import llm_stats as ST
import llm_variants as V
from llm_config import EvalConfig, NoiseConfig
from llm_run import Run
from llm_perplexity import evaluate_model, reference_logprobs, safe_exp, token_set
from llm_sensitivity import noise_saliency, protect_top_fraction, protected_coordinates, saliency_scores

log = logging.getLogger("llm.noise")

@dataclass
class NoiseResult:
    mode: str
    epsilon: float
    group: str
    seed: int
    tensors: list = field(default_factory=list)   # parameter names perturbed (tied ones once)
    n_weights: int = 0                             # weights eligible for noise
    n_protected: int = 0                           # of which kept clean
    bitflips: dict = field(default_factory=dict)   # {"sign": k, "exponent": k, "mantissa": k}


def _module_type(name: str) -> str:
    return name.rsplit(".", 2)[-2] if name.endswith(".weight") or name.endswith(".bias") else name


def select_params(model, group: str) -> dict[str, torch.nn.Parameter]:
    """Parameters of ``group``, by name; tied parameters appear once (first name)."""
    params = dict(model.named_parameters())  # remove_duplicate=True: tied tensors once
    layers = LM.decoder_layers(model)
    layer_prefix = {}
    for n, m in model.named_modules():
        for i, layer in enumerate(layers):
            if m is layer:
                layer_prefix[i] = n + "."
    emb = {id(model.get_input_embeddings().weight)}
    if model.get_output_embeddings() is not None:
        emb.add(id(model.get_output_embeddings().weight))
    lin_ids = {id(m.weight) for layer in layers for m in LM.block_linears(layer).values()}
    if group == "all":
        return params
    if group == "linears":
        return {n: p for n, p in params.items() if id(p) in lin_ids}
    if group == "embeddings":
        return {n: p for n, p in params.items() if id(p) in emb}
    if group == "norms":
        return {n: p for n, p in params.items() if "norm" in n.lower() or ".ln_" in n}
    if group.startswith("layer:"):
        try:
            i = int(group.split(":", 1)[1])
            prefix = layer_prefix[i]
        except (ValueError, KeyError):
            raise C.UserError(f"--noise-group {group}: the model has layers 0..{len(layers) - 1}")
        return {n: p for n, p in params.items() if n.startswith(prefix)}
    if group.startswith("module:"):
        kind = group.split(":", 1)[1]
        out = {n: p for n, p in params.items() if id(p) in lin_ids and _module_type(n) == kind}
        if not out:
            raise C.UserError(f"--noise-group {group}: no decoder linear is called {kind!r}")
        return out
    raise C.UserError(f"--noise-group must be all, linears, layer:N, module:NAME, embeddings or norms, not {group!r}")


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator per (seed, tensor name): results do not depend on iteration order."""
    s = int.from_bytes(hashlib.sha256(f"{seed}|{name}".encode()).digest()[:8], "little") & (2**63 - 1)
    return torch.Generator(device=device).manual_seed(s)


_BIT_FIELDS = {"bfloat16": (7, 8), "float16": (10, 5)}  # (mantissa bits, exponent bits)


def _flip_bits_(p: torch.Tensor, rate: float, gen: torch.Generator, fmt: str,
                keep: Optional[torch.Tensor], counts: dict) -> None:
    """Flip bits of the 16-bit view in place: k ~ Binomial(n_bits, rate) distinct positions."""
    if p.dtype == torch.float32:
        if fmt != "bfloat16":
            raise C.UserError("fp32 weights can only be bit-flipped in their bfloat16 view")
        view, shift, mant = p.view(torch.int32), 16, 7
    elif p.dtype in (torch.bfloat16, torch.float16):
        view, shift, mant = p.view(torch.int16), 0, _BIT_FIELDS[str(p.dtype).split(".")[1]][0]
    else:
        raise C.UserError(f"bit flips need 16- or 32-bit float weights, got {p.dtype}")
    n_bits = p.numel() * 16
    k = int(np.random.default_rng(gen.initial_seed()).binomial(n_bits, rate)) if rate > 0 else 0
    if k == 0:
        return
    # k distinct positions (without replacement, so the realised rate is k / n_bits, not
    # 1 - exp(-rate)): draw, de-duplicate, top up; collisions are rare, so this takes a round or two
    # and never builds a permutation of all n_bits.
    if k > n_bits // 2:  # dense flips: a permutation is cheaper than collecting coupons
        pos = torch.randperm(n_bits, generator=gen, device=gen.device)[:k]
    else:
        pos = torch.unique(torch.randint(0, n_bits, (k,), generator=gen, device=gen.device))
    while pos.numel() < k:
        more = torch.randint(0, n_bits, (k - pos.numel(),), generator=gen, device=gen.device)
        pos = torch.unique(torch.cat([pos, more]))
    pos = pos.to(p.device)
    elem, bit = pos // 16, pos % 16
    if keep is not None:
        ok = ~keep.reshape(-1)[elem]
        elem, bit = elem[ok], bit[ok]
    flat = view.reshape(-1)
    one = torch.ones((), dtype=flat.dtype, device=flat.device)
    masks = torch.bitwise_left_shift(one.expand_as(bit).clone(), (bit + shift).to(flat.dtype))
    # Several flips may hit one element: combine them with XOR per element.
    for b in range(16):
        sel = bit == b
        if sel.any():
            e = elem[sel]
            flat[e] = torch.bitwise_xor(flat[e], masks[sel])
    counts["sign"] = counts.get("sign", 0) + int((bit == 15).sum())
    counts["exponent"] = counts.get("exponent", 0) + int(((bit >= mant) & (bit < 15)).sum())
    counts["mantissa"] = counts.get("mantissa", 0) + int((bit < mant).sum())


@torch.no_grad()
def perturb_(params: Mapping[str, torch.Tensor], cfg: NoiseConfig,
             protect: Optional[Mapping[str, torch.Tensor]] = None,
             stds: Optional[Mapping[str, torch.Tensor]] = None,
             draws: Optional[Mapping[str, torch.Tensor]] = None) -> NoiseResult:
    """Add noise to ``params`` in place. ``protect[name]`` is a bool mask of weights kept clean.
    ``stds``: each clean tensor's ``std()`` for relative noise (``clean_stds``), so a sweep that
    restores the clean weights between points does not recompute them; ``draws``: the standard
    normal draws of ``cfg.seed`` (``normal_draws``), which every epsilon of that seed shares. The
    same values either way."""
    cfg.validate()
    res = NoiseResult(cfg.mode, cfg.epsilon, cfg.group, cfg.seed, tensors=list(params))
    protect = protect or {}
    for name, p in params.items():
        keep = protect.get(name)
        if keep is not None:
            keep = keep.to(p.device)
            res.n_protected += int(keep.sum())
        res.n_weights += p.numel()
        if cfg.mode == "bitflip":
            _flip_bits_(p.data, cfg.epsilon, _generator(cfg.seed, name, p.device), cfg.bitflip_format, keep,
                        res.bitflips)
            continue
        # Shared by the sweep's epsilons: scaled into a copy, never in place; else this seed's own draw.
        xi = draws[name].to(p.device, copy=True) if draws is not None else normal_draws({name: p}, cfg.seed)[name]
        data = p.data
        w = data.float()  # ``data`` itself when it is float32
        # In place on xi and on fp32 weights: a sweep perturbs every linear weight at every point,
        # and the temporaries of ``w + eps * xi`` cost more than the draw. Same values bit for bit:
        # each product and sum is the one the expression computes.
        if cfg.mode == "multiplicative":
            xi.mul_(cfg.epsilon).add_(1)
            if keep is not None:
                xi.masked_fill_(keep, 1)
            new = w.mul_(xi) if w is data else w * xi
        else:
            if cfg.mode == "relative":
                xi.mul_(cfg.epsilon * (stds[name] if stds is not None else w.std()))
            else:
                xi.mul_(cfg.epsilon)
            if keep is not None:
                xi.masked_fill_(keep, 0)
            new = w.add_(xi) if w is data else w + xi
        if new is not data:
            data.copy_(new.to(p.dtype))
    return res


def normal_draws(params: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """{name: the float32 standard normal draw ``perturb_`` makes for that tensor with ``seed``}."""
    return {n: torch.randn(p.shape, generator=_generator(seed, n, p.device), device=p.device, dtype=torch.float32)
            for n, p in params.items()}


def clean_stds(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: std of the tensor as float32}: the scale of relative noise (see ``perturb_``)."""
    with torch.no_grad():
        return {n: p.data.float().std() for n, p in params.items()}


@contextlib.contextmanager
def noisy_weights(model, cfg: NoiseConfig, protect: Optional[Mapping[str, torch.Tensor]] = None
                  ) -> Iterator[NoiseResult]:
    """Perturb the model in place for the body; restore bit for bit on exit, also on error."""
    params = select_params(model, cfg.group)
    with V.restored_on_exit(model, list(params)):
        yield perturb_(params, cfg, protect)


# --------------------------------------------------------------------------- sweeps


@dataclass
class SweepResult:
    mode: str
    group: str
    clean: dict                                   # perplexity, nll
    points: list = field(default_factory=list)    # {eps, seed, perplexity, nll, kl, top1, protected}
    summary: dict = field(default_factory=dict)   # "protected|unprotected" -> eps -> mean/spread
    doubling_eps: dict = field(default_factory=dict)  # eps where perplexity doubles, per curve
    saturation: float = 0.0                       # vocabulary size: a uniform guesser's perplexity
    seconds: float = 0.0
    peak_memory_mb: float = 0.0


def _per_eps_stats(points: list, key: str) -> dict:
    """Per eps: mean, min, max over seeds, and how many seeds gave a non-finite value. A
    non-finite seed is never dropped: the mean is inf if any seed is inf, nan if any is nan."""
    out = {}
    for eps in sorted({p["eps"] for p in points}):
        vals = [float(p[key]) for p in points if p["eps"] == eps]
        nonfinite = sum(not math.isfinite(v) for v in vals)
        mean = statistics.fmean(vals) if not nonfinite else (
            float("nan") if any(math.isnan(v) for v in vals) else float("inf"))
        out[str(eps)] = {"mean": mean, "min": min(vals), "max": max(vals), "n": len(vals), "nonfinite": nonfinite}
    return out


def doubling_epsilon(summary: dict, clean_ppl: float) -> Optional[float]:
    """Smallest eps where mean perplexity reaches 2x clean (or stops being finite),
    log-interpolated on the grid."""
    xs = sorted(summary, key=float)
    prev = (0.0, clean_ppl)
    for x in xs:
        y = summary[x]["mean"]
        if not math.isfinite(y) or y >= 2 * clean_ppl:  # inf or nan: the model is already broken there
            x0, y0 = prev
            if x0 <= 0 or not math.isfinite(y):
                return float(x)
            t = (math.log(2 * clean_ppl) - math.log(y0)) / (math.log(y) - math.log(y0))
            return math.exp(math.log(x0) + t * (math.log(float(x)) - math.log(x0)))
        prev = (float(x), y)
    return None


def noise_tolerance(points: list, clean_ppl: float, curve: str = "unprotected") -> dict:
    """The eps at which perplexity doubles, per seed of a sweep (log-interpolated on its grid,
    ``doubling_epsilon``), and its spread over seeds: mean, min, max, std and a Student-t 95%
    interval (``llm_stats.mean_interval``). A seed whose curve never doubles within the grid is
    counted in ``never_doubled`` and leaves the mean undefined (None): its eps is only known to
    exceed ``max_eps``."""
    pts = [p for p in points if p.get("curve", "unprotected") == curve]
    seeds = sorted({p["seed"] for p in pts})
    per_seed = [doubling_epsilon({str(p["eps"]): {"mean": p["perplexity"]} for p in pts if p["seed"] == s},
                                 clean_ppl) for s in seeds]
    found = [e for e in per_seed if e is not None]
    whole = len(found) == len(per_seed) and found
    return {"doubling_eps": statistics.fmean(found) if whole else None, "per_seed": per_seed, "seeds": seeds,
            "min": min(found) if found else None, "max": max(found) if found else None,
            "std": statistics.stdev(found) if whole and len(found) > 1 else None,
            "ci95": list(ST.mean_interval(found)) if whole else None,
            "never_doubled": len(per_seed) - len(found), "max_eps": max((p["eps"] for p in pts), default=None),
            "clean_perplexity": clean_ppl}


def sweep_variants(model, tokenizer, input_ids: torch.Tensor, variants: Mapping[str, object],
                   parents: Mapping[str, Optional[str]], config: NoiseConfig, done: Optional[dict] = None) -> dict:
    """The unprotected eps sweep of ``config`` on every variant (applied in place, one at a time,
    restored bit for bit), with the same eps, seeds and windows: the noise of seed s is the same
    draw on every variant (common random numbers), so tolerances compare paired by seed.
    ``done``: {name: SweepResult dict} already measured (the live model's sweep). Returns
    {name: {"parent", "tolerance" (``noise_tolerance``), "curve" (mean perplexity per eps),
    "vs_parent" (paired difference of the doubling eps over seeds, when both are defined)}}. Under
    torchrun every rank sweeps every variant, each sweep's points split over the ranks."""
    done = dict(done or {})
    seq = min(config.sweep_seq_len, config.sweep_tokens)
    ecfg = EvalConfig(seq_len=seq, eval_tokens=config.sweep_tokens, batch_size=config.batch_size, seed=config.seed)
    seeds = [config.seed + i for i in range(config.sweep_seeds)]
    # Variant by variant on every rank: under torchrun each sweep splits its points over the ranks
    # (``noise_sweep`` gathers them), so the variants must not be split as well.
    for name in [n for n in variants if n not in done]:
        log.info("noise sweep of variant %r", name)
        with V.applied_variant(model, variants[name]):
            done[name] = asdict(noise_sweep(model, tokenizer, input_ids, config.sweep_eps, seeds,
                                            config.sweep_mode, config.sweep_group, ecfg, progress=False))
    out = {}
    for name in variants:
        sw = done[name]
        tol = noise_tolerance(sw["points"], sw["clean"]["perplexity"])
        out[name] = {"parent": parents.get(name), "tolerance": tol, "clean": sw["clean"],
                     "curve": {e: v["mean"] for e, v in sw["summary"]["unprotected"]["perplexity"].items()}}
    for name, row in out.items():
        par = out.get(row["parent"] or "")
        a, b = (par or {}).get("tolerance", {}).get("per_seed"), row["tolerance"]["per_seed"]
        if a and None not in a and None not in b:
            row["vs_parent"] = ST.paired_difference(a, b, seed=config.seed, units="noise seeds")
    return out


def noise_sweep(model, tokenizer, input_ids: torch.Tensor, epsilons: Sequence[float], seeds: Sequence[int],
                mode: str = "relative", group: str = "linears", eval_config: EvalConfig = EvalConfig(),
                protect: Optional[Mapping[str, torch.Tensor]] = None, progress: bool = True) -> SweepResult:
    """Perplexity, NLL, KL and top-1 agreement against the clean model over eps x seeds.

    ``input_ids``: [n_tokens]. The clean model's log-probabilities are computed once and kept
    on CPU, so only one copy of the model is ever in memory. With ``protect`` the grid is run
    twice, without and with the protected weights kept clean.
    """
    t0 = time.perf_counter()
    cfg = eval_config.scoring_only().for_model(model)
    ref, clean_nll = reference_logprobs(model, input_ids, cfg, return_nll=True)  # one clean pass serves both
    clean_ppl = safe_exp(clean_nll)
    clean = {"perplexity": clean_ppl, "nll": clean_nll, "token_set": token_set(input_ids.numel(), cfg)}
    res = SweepResult(mode, group, clean,
                      saturation=float(model.get_output_embeddings().weight.shape[0]))
    runs = [("unprotected", None)] + ([("protected", protect)] if protect else [])
    jobs = [(tag, pm, e, s) for tag, pm in runs for e in epsilons for s in seeds]
    # Under accelerate launch / torchrun each rank takes every world_size-th job; the merged
    # list is in job order, so it equals a single-process sweep.
    mine = []
    params = select_params(model, group)
    stds = clean_stds(params) if mode == "relative" else None
    # Seed by seed: every epsilon (and both curves) of a seed scales the same normal draw, so it is
    # drawn once when a copy fits in a quarter of the free memory (a point's draw costs about
    # half its evaluation on a CPU). Each job keeps its index, so the order of the points is the
    # job order whatever order they run in.
    need = 4 * sum(p.numel() for p in params.values())
    share = mode != "bitflip" and bool(params) and \
        all(need < 0.25 * LM.free_memory_bytes(d) for d in {p.device for p in params.values()})
    mine_jobs = sorted(C.shard_jobs(jobs), key=lambda ij: seeds.index(ij[1][3]))
    draws, drawn_for = None, None
    # One spare copy for the whole sweep, restored after each point: a copy per point costs as
    # much as the point's evaluation on a CPU.
    with V.snapshot(model, list(params)) as restore:
        for i, (tag, pm, eps, seed) in tqdm(mine_jobs, desc=f"{mode} noise sweep", disable=not progress):
            if share and drawn_for != seed:
                draws, drawn_for = None, seed  # the last seed's draw goes before the next is made
                draws = normal_draws(params, seed)
            try:
                perturb_(params, NoiseConfig(mode, eps, group, seed), pm, stds, draws)
                r = evaluate_model(model, tokenizer, input_ids, cfg, reference=ref)
            finally:
                restore()
            mine.append((i, {"curve": tag, "eps": eps, "seed": seed, "perplexity": r.perplexity, "nll": r.nll,
                             "kl": r.kl, "top1": r.top1_agreement}))
    res.points = C.gather_jobs(mine)
    for tag, _ in runs:
        pts = [p for p in res.points if p["curve"] == tag]
        res.summary[tag] = {k: _per_eps_stats(pts, k) for k in ("perplexity", "nll", "kl", "top1")}
        res.doubling_eps[tag] = doubling_epsilon(res.summary[tag]["perplexity"], clean_ppl)
    res.seconds = time.perf_counter() - t0
    res.peak_memory_mb = LM.peak_memory_mb(LM.input_device(model))
    return res


def sensitivity_map(model, tokenizer, input_ids: torch.Tensor, epsilon: float = 0.1, seed: int = 0,
                    eval_config: EvalConfig = EvalConfig(), progress: bool = True) -> dict:
    """NLL increase (nats/token) when relative noise hits one (layer, module type) cell.

    Returns {"layers": [...], "modules": [...], "delta_nll": [[...] per layer], "clean_nll": x}.
    """
    cfg = eval_config.scoring_only()
    clean = evaluate_model(model, tokenizer, input_ids, cfg).nll
    layers = LM.decoder_layers(model)
    # Cells are named by the linear's path inside the block ("self_attn.q_proj", "mlp.c_proj"):
    # GPT-2 has two "c_proj" modules, so the last name alone would merge them.
    kinds = sorted(LM.block_linears(layers[0]))
    grid = [[float("nan")] * len(kinds) for _ in layers]
    params = dict(model.named_parameters())
    names_of = {id(p): n for n, p in params.items()}
    cells = [(i, j) for i in range(len(layers)) for j in range(len(kinds))]
    for i, j in tqdm(cells, desc="noise sensitivity map", disable=not progress):
        mods = [m for n, m in LM.block_linears(layers[i]).items() if n == kinds[j]]
        sel = {names_of[id(m.weight)]: m.weight for m in mods if id(m.weight) in names_of}
        with V.restored_on_exit(model, list(sel)):
            perturb_(sel, NoiseConfig("relative", epsilon, f"cell:{i}:{kinds[j]}", seed))
            grid[i][j] = evaluate_model(model, tokenizer, input_ids, cfg).nll - clean
    return {"layers": list(range(len(layers))), "modules": kinds, "delta_nll": grid, "clean_nll": clean,
            "epsilon": epsilon}


def top_cells(smap: dict, k: int = 5) -> list:
    cells = [(smap["delta_nll"][i][j], i, m) for i in smap["layers"] for j, m in enumerate(smap["modules"])]
    cells.sort(key=lambda t: -t[0] if math.isfinite(t[0]) else -math.inf)
    return [{"layer": i, "module": m, "delta_nll": d} for d, i, m in cells[:k]]


# --------------------------------------------------------------------------- the step

# The ranking of the protected sweep, as the report words it.
_SIGMA = {"absolute": "F sigma^2, sigma = eps", "relative": "F sigma^2, sigma = eps std(W)",
          "multiplicative": "F sigma^2, sigma = eps |w|", "bitflip": "F w^2"}


@dataclass
class RobustnessResult:
    variant: NoiseResult                           # the noise left in the model (the noisy variant)
    sweep: Optional[dict] = None                   # SweepResult as a dict, plus protect_fraction
    map: Optional[dict] = None                     # sensitivity_map, when config.map
    top_cells: list = field(default_factory=list)  # the map's 5 most sensitive cells
    protected: list = field(default_factory=list)  # (module, row, col) kept clean in the protected sweep
    super_weights: list = field(default_factory=list)  # detected for protect="auto"
    config: dict = field(default_factory=dict)     # the resolved NoiseConfig


def protection_masks(model, tokenizer, calib: "Optional[D.Corpus | torch.Tensor]", config: NoiseConfig,
                     coords: Sequence[tuple]) -> Optional[dict[str, torch.Tensor]]:
    """Bool masks (parameter name -> mask in the parameter's layout) of the weights kept clean
    in the protected sweep: the top ``protect_fraction`` on ``fisher_windows`` calibration
    windows by the expected loss increase under the sweep's noise (``protect_score="noise"``:
    F sigma^2, see ``noise_saliency``) or by OBD's w^2 F (``"obd"``), plus ``coords``; None
    when nothing is protected."""
    if not (config.protect_fraction > 0 and calib is not None) and not coords:
        return None
    lin = LM.decoder_linears(model)
    if config.protect_fraction > 0 and calib is not None:
        windows = D.calibration_windows(tokenizer, calib, config.fisher_windows, config.fisher_seq_len, config.seed)
        # Masks in each parameter's own layout (Conv1D stores weights [in, out]).
        raw = (noise_saliency(model, windows, lin, config.sweep_mode, config.progress)
               if config.protect_score == "noise" else saliency_scores(model, windows, lin, "fisher", config.progress))
        scores = {n + ".weight": LM.out_in(lin[n], v) for n, v in raw.items()}
    else:
        scores = {n + ".weight": torch.zeros(m.weight.shape) for n, m in lin.items()}
    return protect_top_fraction(scores, config.protect_fraction, [(m + ".weight", r, c) for m, r, c in coords])


def apply_robustness_test(model, tokenizer=None, config: NoiseConfig = NoiseConfig(),
                          eval_ids: Optional[torch.Tensor] = None,
                          calib: "Optional[D.Corpus | torch.Tensor]" = None) -> RobustnessResult:
    """The noise step. Changes ``model`` in place: it is left noisy (the noisy variant).

    Args:
        eval_ids: tokenized evaluation text [n_tokens] for the sweep and the map (both
            skipped when None); the clean model is measured before the noise is applied.
        calib: calibration corpus, its token ids [n_tokens] or windows, for the Fisher saliency
            that picks the protected weights (windows drawn as ``D.calibration_windows``; no
            saliency protection when None).
    Wrap the call in ``noisy_weights`` or ``V.restored_on_exit`` to get the clean model back.
    """
    config = config.for_model(model)
    coords, found = protected_coordinates(model, tokenizer, config.protect, config.super_weight_prompt)
    res = RobustnessResult(variant=None, protected=[list(c) for c in coords], super_weights=found,
                           config=asdict(config))
    if eval_ids is not None:
        seq = min(config.sweep_seq_len, config.sweep_tokens)
        ecfg = EvalConfig(seq_len=seq, eval_tokens=config.sweep_tokens, batch_size=config.batch_size, seed=config.seed)
        masks = protection_masks(model, tokenizer, calib, config, coords)
        seeds = [config.seed + i for i in range(config.sweep_seeds)]  # --seed moves the sweep too
        sweep = noise_sweep(model, tokenizer, eval_ids, config.sweep_eps, seeds,
                            mode=config.sweep_mode, group=config.sweep_group, eval_config=ecfg, protect=masks,
                            progress=config.progress)
        res.sweep = {**asdict(sweep), "protect_fraction": config.protect_fraction,
                     "protect_score": {"noise": _SIGMA[config.sweep_mode], "obd": "w^2 F"}[config.protect_score]}
        if config.map:
            mcfg = EvalConfig(seq_len=min(seq, config.map_tokens), eval_tokens=config.map_tokens,
                              batch_size=config.batch_size, seed=config.seed)
            res.map = sensitivity_map(model, tokenizer, eval_ids, epsilon=config.map_eps, seed=config.seed,
                                      eval_config=mcfg, progress=config.progress)
            res.top_cells = top_cells(res.map, 5)
    res.variant = perturb_(select_params(model, config.group), config)
    return res


RECIPE = ("mode", "epsilon", "group", "seed", "bitflip_format")  # what regenerates the noisy variant


def pipeline_step(run: Run, config: NoiseConfig) -> None:
    """The pipeline's noise step: the sweeps and maps on the live model, and the ``noisy``
    variant (one per epsilon of a grid, named ``noisy[mode,eps]``), each stored as its recipe
    (regenerated bit for bit) or, with --save-variants, tensors. The sweeps and the map do not
    depend on the variant's epsilon: a grid measures them once."""
    points = config.grid_points()
    grid = len(points) > 1

    def store(point):
        name = point.variant_name(grid)
        if not run.cfg.run.save_variants:
            return {"checkpoint": None, "recipe": {k: getattr(point, k) for k in RECIPE}, "name": name}
        with noisy_weights(run.model, point.for_model(run.model)) as made:
            return {**V.store_variant(run.out, name, run.model, made.tensors, mask=False), "name": name}

    with V.restored_on_exit(run.model, list(select_params(run.model, config.group))):
        res = apply_robustness_test(run.model, run.tokenizer, points[0], run.ids("eval"), run.texts["train"])
    records = [store(p) for p in points]
    IO.fault_point("during:noise")
    d = dataclasses.asdict(res)
    d["variant"]["n_tensors"] = len(d["variant"].pop("tensors"))
    if grid:
        run.results["noise"] = {**d, "grid": [{**r, "epsilon": p.epsilon, "parent": run.live}
                                              for p, r in zip(points, records)], "parent": run.live}
    else:
        run.results["noise"] = {**d, **{k: v for k, v in records[0].items() if k != "name"}, "parent": run.live}
    for name, weights in variants_of(run, run.results["noise"]).items():
        run.add_variant(name, weights)
    # Every chosen variant's tolerance, the noisy ones just made included (noise on noise); the
    # live model's sweep above serves its own row.
    run.results["noise"]["variants"] = sweep_variants(
        run.model, run.tokenizer, run.ids("eval"), run.chosen(config.variants), run.parents, points[0],
        {run.live: res.sweep} if res.sweep else None)


def variants_of(run: Run, section: dict) -> dict:
    """{variant name: its weights (a regenerated recipe or stored tensors), or None when gone}."""
    out = {}
    for r in section.get("grid") or [section]:
        out[r.get("name", "noisy")] = functools.partial(noisy_weights, cfg=NoiseConfig(**r["recipe"])) \
            if r.get("recipe") else V.variant_weights(run.out, r)
    return out


def check_model(model, config: NoiseConfig) -> None:
    """Right after loading: a bad --noise-group fails now, not after hours of fine-tuning and pruning."""
    select_params(model, config.group)


def planned(config: NoiseConfig, names: list, live: str) -> tuple[list, str]:
    """Before loading: the variant names the run holds after this step (``noisy``, or one per epsilon)."""
    points = config.grid_points()
    return names + [p.variant_name(len(points) > 1) for p in points], live
