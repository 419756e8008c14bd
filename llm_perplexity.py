"""Shared evaluation core: perplexity, bits per byte, KL and top-1 agreement, greedy answers.

The eval step (``llm_evaluate_models``) runs it on every variant; fine-tuning (held-out loss), the
noise sweeps and the analysis (ablations, quantization) call it too, so it lives here.

Protocol (GPTQ / SparseGPT / Wanda): the evaluation text is tokenized once and cut
into windows of ``seq_len`` tokens. With ``stride == seq_len`` (the default) the
windows are disjoint and every token but the first of each window is scored. With
``stride < seq_len`` the windows overlap as in the Hugging Face sliding-window
recipe, but token counting is exact: each target token is scored once, by the
first window that has it in its last ``stride`` positions, and context tokens are
never scored. Only whole windows are used; the tail that does not fill a window is
dropped and ``tokens_scored`` says how many tokens were counted.

The sampling design (``--eval-sampling``): when ``eval_tokens`` buys fewer windows than the text
has, ``spread`` (the default) cuts the whole text's window plan into n/2 equal stretches and scores
two windows drawn at random (seeded) in each (``spread_indices``): a stratified sample that covers the
text, whose interval is the design's own stratified Student-t (``llm_stats.estimate``'s ``strata``).
``first`` scores the first ``eval_tokens`` tokens, as the papers' code and older runs do, whose
windows are adjacent. Windows that touch or overlap are dependent, and their interval is
Ibragimov-Mueller groups (``llm_stats``); ``EvalResult.sampling`` records the design and the window starts.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llm_common import UserError
from llm_config import EvalConfig
from llm_model import auto_batch_size, eval_mode, free_memory_bytes, input_device, use_cache
from llm_stats import estimate, interval_words, perplexity_interval, quantile_interval

log = logging.getLogger("llm.eval")


@dataclass
class EvalResult:
    perplexity: float            # exp(nll); inf when it overflows, nan when logits were nan
    nll: float                   # mean negative log-likelihood per scored token, nats
    bits_per_byte: float         # total nll / ln 2 / UTF-8 bytes of the scored tokens
    tokens_scored: int
    bytes_scored: int
    windows: int
    seq_len: int
    stride: int
    kl: Optional[float] = None   # mean KL(reference || model) per scored token, nats
    top1_agreement: Optional[float] = None  # fraction of scored positions with equal argmax
    generations: dict = field(default_factory=dict)  # prompt -> greedy answer
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    batch_size: int = 1          # windows per forward pass actually used
    # Per window, in window order: summed NLL of its scored tokens (nats) and how many it scores;
    # sum(window_nll) / sum(window_tokens) == nll. They make the interval and the paired tests.
    window_nll: list = field(default_factory=list)
    window_tokens: list = field(default_factory=list)
    perplexity_ci95: list = field(default_factory=lambda: [math.nan, math.nan])
    interval_method: str = ""
    vs_parent: Optional[dict] = None  # llm_stats.paired_perplexity against the parent, set by the eval step
    # Against ``reference`` (--kl): per window, the summed KL (nats) and the count of positions whose
    # argmax agrees; the KL's 95% interval and the agreement's, over windows (``llm_stats.estimate``);
    # the per-token KL's distribution, as llama.cpp's perplexity tool reports it.
    window_kl: list = field(default_factory=list)
    window_agree: list = field(default_factory=list)
    kl_ci95: Optional[list] = None
    top1_ci95: Optional[list] = None
    kl_percentiles: Optional[dict] = None  # {"median", "p90", "p99", "max"} of KL per scored token, nats
    kl_percentiles_ci95: Optional[dict] = None  # {"median", "p90"}: Woodruff intervals over windows
    window_starts: list = field(default_factory=list)  # token offset of each scored window, in order
    # Against the root of the variant tree (the base), where it is not the parent: the same keys as
    # ``_Agreement.result`` (kl, kl_ci95, kl_percentiles, top1_agreement, top1_ci95, window_kl, window_agree)
    # and "base", its name. Where the parent is the base, the parent's numbers, not measured twice.
    vs_base: Optional[dict] = None
    sampling: dict = field(default_factory=dict)  # the design: how the windows were chosen (``sampling_plan``)


def safe_exp(x: float) -> float:
    """exp that returns inf instead of raising OverflowError, and keeps nan."""
    if math.isnan(x):
        return float("nan")
    return math.exp(x) if x < 709.0 else float("inf")


def window_plan(n_tokens: int, seq_len: int, stride: Optional[int] = None) -> list[tuple[int, int]]:
    """List of (start, first_scored) per window.

    Window k covers ids[start : start + seq_len]; positions ``first_scored .. seq_len-1``
    of it are scored (position p is predicted from positions < p). Every scored
    token is scored exactly once.
    """
    stride = seq_len if stride is None else stride
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise UserError(f"--stride must be between 1 and --seq-len ({seq_len}), got {stride}")
    if n_tokens < seq_len:
        raise UserError(f"evaluation text has {n_tokens} tokens, shorter than one window of {seq_len}")
    plan = []
    for k, start in enumerate(range(0, n_tokens - seq_len + 1, stride)):
        plan.append((start, 1 if k == 0 else max(1, seq_len - stride)))
    return plan


def _supports_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _window_logits(model, batch: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits for the last ``keep`` positions of each window: [B, keep, vocab]."""
    if _supports_logits_to_keep(model):
        return model(input_ids=batch, use_cache=False, logits_to_keep=keep).logits
    return model(input_ids=batch, use_cache=False).logits[:, -keep:]


def _generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> dict:
    """Greedy answers, one prompt at a time (no padding effects), chat template if any."""
    out = {}
    dev = input_device(model)
    with use_cache(model, True), torch.inference_mode():
        for prompt in prompts:
            if getattr(tokenizer, "chat_template", None):
                enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                    add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
            else:
                enc = tokenizer(prompt, return_tensors="pt")
            enc = {k: v.to(dev) for k, v in enc.items()}
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            out[prompt] = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return out


def interval_method(n_windows: int, dependent: bool = False, strata: Optional[Sequence] = None) -> str:
    """How ``perplexity_ci95`` was made (``llm_stats.perplexity_interval``'s rule)."""
    return interval_words(n_windows, dependent, strata=strata)


def spread_strata(n: int) -> list[int]:
    """The stratum of each of ``n`` spread windows, in text order: n // 2 strata of two windows,
    the last of three when n is odd ([0] for one window)."""
    h = max(1, n // 2)
    return [min(i // 2, h - 1) for i in range(n)]


def spread_indices(total: int, n: int, seed: int) -> list[int]:
    """``n`` of ``total`` units spread across them, a stratified random sample: the units cut into
    consecutive strata of near-equal size in proportion to the units each gets (``spread_strata``:
    two, the last three when n is odd), and in each stratum that many drawn without replacement
    by ``np.random.default_rng(seed)``; sorted. All of them, in order, when n >= total.

    Two a stratum, not one (a systematic sample, every k-th unit from a random start): a systematic
    sample has no unbiased variance estimator, and on WikiText-2 its iid interval over-covers
    (bench/coverage.py); two a stratum give the design its own, unbiased one (Cochran 1977, 5A.12)."""
    if n >= total:
        return list(range(total))
    counts = np.bincount(spread_strata(n))
    edges = np.rint(np.concatenate([[0], np.cumsum(counts)]) * total / n).astype(int)
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        out += sorted(int(i) for i in rng.choice(np.arange(a, b), size=int(c), replace=False))
    return out


def sampling_plan(n_tokens: int, config: EvalConfig) -> tuple[list, dict]:
    """(window plan, design) of an evaluation of ``n_tokens`` ids with a resolved ``config``.

    The plan is [(start, first_scored)] as ``window_plan`` gives it; the design is {"design":
    "spread" | "first" | "all" (spread over fewer than 2 windows of the text per scored one is
    first), "windows": scored, "windows_in_text": the whole text's plan, "spacing": windows of the
    whole plan per scored one, "offset": the first scored window, "seed", "strata" (spread: each
    scored window's stratum, ``spread_strata``; else None), "window_starts", "dependent" (first and
    all: two scored windows touch or overlap), "words"}. ``first`` plans over the first
    ``eval_tokens`` ids; ``spread`` takes as many windows as that from the whole text's plan
    (``spread_indices``)."""
    stride = config.seq_len if config.stride is None else config.stride
    full = window_plan(n_tokens, config.seq_len, stride)
    budget = (len(window_plan(min(n_tokens, config.eval_tokens), config.seq_len, stride))
              if config.eval_tokens and config.eval_tokens >= config.seq_len else len(full))
    if config.eval_tokens and config.eval_tokens < config.seq_len:
        window_plan(config.eval_tokens, config.seq_len, stride)  # raises: the budget is under one window
    design = "all" if budget >= len(full) else getattr(config, "sampling", "first")
    if design == "spread" and len(full) // budget < 2:  # one window in every 1: a block either way, so the first
        design = "first"
    if design == "first":
        plan = full[:budget]
        idx = list(range(budget))
    else:
        idx = spread_indices(len(full), budget, config.seed)
        plan = [full[i] for i in idx]
    starts = [s for s, _ in plan]
    # A stratified sample's interval comes from its design, whatever two windows of a stratum touch.
    dependent = design != "spread" and len(starts) > 1 and min(b - a for a, b in zip(starts, starts[1:])) \
        <= config.seq_len
    strata = spread_strata(len(plan)) if design == "spread" else None
    spacing = len(full) // max(len(plan), 1)
    scored = sum(config.seq_len - f for _, f in plan)
    where = {"all": f"every window of the text ({len(full)})",
             "first": f"the first {len(plan)} of the text's {len(full)} windows",
             "spread": f"{len(plan)} of the text's {len(full)} windows, drawn at random "
                       + (f"two in each of {len(plan) // 2} equal stretches of it (stratified, " if len(plan) > 3
                          else "(") + f"seed {config.seed})"}[design]
    words = (f"{scored} tokens in {where}, windows of {config.seq_len} tokens"
             + (f", stride {stride}" if stride != config.seq_len else "")
             + ("; adjacent windows, treated as dependent" if dependent else ""))
    return plan, {"design": design, "windows": len(plan), "windows_in_text": len(full), "spacing": spacing,
                  "offset": idx[0] if idx else 0, "seed": config.seed, "strata": strata, "window_starts": starts,
                  "dependent": dependent, "tokens_scored": scored, "words": words}


def token_set(n_tokens: int, config: EvalConfig) -> str:
    """Words for the tokens an evaluation with (resolved) ``config`` scores, so every reported
    perplexity names its token set and its sampling design."""
    return sampling_plan(n_tokens, config)[1]["words"]


def _batches(plan: list, batch_size: int) -> list:
    return [plan[i:i + batch_size] for i in range(0, len(plan), batch_size)]


def _prepare(input_ids: torch.Tensor, config: EvalConfig, model=None):
    """(ids, window plan, stride, batch size, design) after validating the config (resolved already)."""
    if input_ids.dim() != 1:
        raise ValueError("input_ids must be 1-D [n_tokens]")
    if config.eval_tokens and config.eval_tokens < 2:  # 0: every token
        raise UserError(f"--eval-tokens must be at least 2, got {config.eval_tokens}")
    stride = config.seq_len if config.stride is None else config.stride
    plan, design = sampling_plan(input_ids.numel(), config)
    batch = config.batch_size
    if batch is None:
        batch = auto_batch_size(model, config.seq_len, len(plan)) if model is not None else 1
    return input_ids, plan, stride, batch, design


def _scored_batches(model, input_ids: torch.Tensor, plan: list, batch_size: int, seq_len: int):
    """For each batch of windows: (windows [B, seq_len] on CPU, logits [B, T, V] in the model's
    dtype, targets [B, T], mask [B, T]) where T = seq_len - first scored position of the batch;
    the mask marks the positions this window scores (window 0 scores more than the others).
    Logits are computed only for the last T positions, where they predict scored tokens."""
    dev = input_device(model)
    for chunk in _batches(plan, batch_size):
        windows = torch.stack([input_ids[s:s + seq_len] for s, _ in chunk])
        first = min(f for _, f in chunk)  # logits at p-1 predict token p, for p in [first, seq_len)
        logits = _window_logits(model, windows.to(dev, non_blocking=True), seq_len - first + 1)[:, :-1]
        targets = windows[:, first:].to(logits.device, non_blocking=True)
        pos = torch.arange(first, seq_len, device=logits.device)
        fs = torch.tensor([f for _, f in chunk]).to(logits.device, non_blocking=True)
        yield windows, logits, targets, pos[None, :] >= fs[:, None]


def reference_logprobs(model, input_ids: torch.Tensor, config: EvalConfig = EvalConfig(),
                       return_nll: bool = False):
    """The model's float32 log-probabilities at the scored positions, one tensor
    [B, T, vocab] per evaluation batch: pass the list as ``reference`` to compare many
    perturbed versions of one model against it without a second copy of the model.
    Memory: 4 bytes x vocab per evaluated token. With ``return_nll`` also the mean NLL
    (nats/token) of the same pass, so the clean model needs no second evaluation."""
    config = config.for_model(model)  # budgets by device, windows clamped to the context
    input_ids, plan, _, batch, _ = _prepare(input_ids, config, model)
    out = []
    nll_sum, n = torch.zeros((), dtype=torch.float64), 0
    # Kept on the accelerator when they take under a quarter of its free memory (a sweep then
    # never copies them back over PCIe), else on the host.
    dev = input_device(model)
    need = sum(config.seq_len - f for _, f in plan) * model.get_output_embeddings().weight.shape[0] * 4
    store = dev if dev.type == "cuda" and need < 0.25 * free_memory_bytes(dev) else torch.device("cpu")
    with torch.inference_mode():
        for _, logits, targets, mask in _scored_batches(model, input_ids, plan, batch, config.seq_len):
            logp = F.log_softmax(logits.float(), dim=-1)
            if return_nll:
                tok_nll = -logp.gather(-1, targets[..., None])[..., 0]
                nll_sum += torch.where(mask, tok_nll, 0).double().sum().cpu()
                n += int(mask.sum())
            out.append(logp.to(store))
    return (out, float(nll_sum) / n) if return_nll else out


class _Agreement:
    """KL(reference || model) and top-1 agreement against one reference, accumulated on the device
    batch by batch (one host sync at the end): per-window sums, and each scored token's KL for the
    percentiles. ``reference`` is a model or the list ``reference_logprobs`` returned."""

    def __init__(self, reference, n_windows: int, dev: torch.device):
        self.reference, self.is_model = reference, not isinstance(reference, list)
        self.ref_dev = input_device(reference) if self.is_model else None
        self.window_kl = torch.zeros(n_windows, dtype=torch.float64, device=dev)
        self.window_agree = torch.zeros(n_windows, dtype=torch.float64, device=dev)
        self.token_kl: list = []  # each batch's per-token KL at its scored positions (float32)
        self.dev = dev

    def add(self, b_idx: int, first: int, windows, logp, targets, mask) -> None:
        if self.is_model:
            ref_logits = _window_logits(self.reference, windows.to(self.ref_dev), targets.shape[1] + 1)[:, :-1]
            ref_logp = F.log_softmax(ref_logits.float().to(logp.device), dim=-1)
        else:
            ref_logp = self.reference[b_idx].to(logp.device, non_blocking=True)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        n = kl.shape[0]
        self.window_kl[first:first + n] = torch.where(mask, kl, 0).double().sum(1).to(self.dev)
        same = (ref_logp.argmax(-1) == logp.argmax(-1)) & mask
        self.window_agree[first:first + n] = same.double().sum(1).to(self.dev)
        self.token_kl.append(kl[mask].float().to(self.dev))

    def result(self, window_tokens: list, design: dict, seed: int) -> dict:
        """{"kl", "kl_ci95", "kl_percentiles", "top1_agreement", "top1_ci95", "window_kl", "window_agree"}:
        means per scored token, intervals over windows (``llm_stats.estimate``, the design's method)."""
        window_kl, window_agree = self.window_kl.tolist(), self.window_agree.tolist()
        token_kl = torch.cat(self.token_kl).cpu().numpy().astype(np.float64) if self.token_kl else np.zeros(0)
        n = sum(window_tokens)
        ci = [estimate(w, window_tokens, dependent=design["dependent"], strata=design["strata"], seed=seed,
                       units="windows")["ci95"] for w in (window_kl, window_agree)]
        q = np.quantile(token_kl, [0.5, 0.9, 0.99]) if token_kl.size else [math.nan] * 3
        # Woodruff intervals over windows (the design's method) for the median and p90. The p99 and the max
        # get none: over 20-32 windows Woodruff's p99 interval covered 0.88-0.90 of the time on heavy-tailed
        # windows (tests/test_agreement.py), and an extreme has no interval worth the name.
        qci = {k: quantile_interval(token_kl, window_tokens, p, dependent=design["dependent"], strata=design["strata"],
                                    seed=seed) for k, p in (("median", 0.5), ("p90", 0.9))}
        return {"kl": sum(window_kl) / n, "kl_ci95": ci[0],
                "kl_percentiles": {"median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
                                   "max": float(token_kl.max()) if token_kl.size else math.nan},
                "kl_percentiles_ci95": qci,
                "top1_agreement": sum(window_agree) / n, "top1_ci95": ci[1],
                "window_kl": window_kl, "window_agree": window_agree}


def evaluate_model(model, tokenizer, input_ids: torch.Tensor, config: EvalConfig = EvalConfig(),
                   reference=None, base_reference=None) -> EvalResult:
    """Perplexity, bits per byte and (against ``reference``) KL and top-1 agreement.

    Args:
        model: a causal LM (any device placement, ``device_map="auto"`` included).
        tokenizer: its tokenizer, used for byte counts and generation.
        input_ids: 1-D LongTensor [n_tokens] of the tokenized evaluation text.
        reference: optional model with the same vocabulary, compared window by window
            (no logits are stored beyond one batch), or the list returned by
            ``reference_logprobs`` for the same ids and config: the parent, whose KL and
            agreement fill ``kl``, ``kl_ci95``, ``kl_percentiles``, ``top1_agreement``, ...
        base_reference: optional second reference of the same kind, measured in the same pass:
            the root of the variant tree; its numbers go to ``vs_base`` (same keys).
    Both models are scored in eval mode (no dropout) and left in the mode the caller had.
    """
    refs = [r for r in (reference, base_reference) if isinstance(r, torch.nn.Module)]
    with contextlib.ExitStack() as stack:
        for m in (model, *refs):
            stack.enter_context(eval_mode(m))
        return _evaluate_model(model, tokenizer, input_ids, config, reference, base_reference)


def _evaluate_model(model, tokenizer, input_ids: torch.Tensor, config: EvalConfig, reference,
                    base_reference=None) -> EvalResult:
    config = config.for_model(model)  # budgets by device, windows clamped to the context
    input_ids, plan, stride, batch_size, design = _prepare(input_ids, config, model)
    seq_len = config.seq_len
    dev = input_device(model)

    # Sums stay on the device and are read back once at the end: no host sync per batch.
    out_dev = model.get_output_embeddings().weight.device if model.get_output_embeddings() is not None else dev
    nll_sum = torch.zeros((), dtype=torch.float64, device=out_dev)
    window_nll = torch.zeros(len(plan), dtype=torch.float64, device=out_dev)
    agreements = {k: _Agreement(r, len(plan), out_dev) for k, r in (("parent", reference), ("base", base_reference))
                  if r is not None}
    n_scored = sum(seq_len - f for _, f in plan)
    n_bytes = sum(len(tokenizer.decode(input_ids[s + f:s + seq_len]).encode("utf-8")) for s, f in plan)
    t0 = time.perf_counter()
    n_batches = -(-len(plan) // batch_size)
    batches = _scored_batches(model, input_ids, plan, batch_size, seq_len)
    bar = tqdm(batches, total=n_batches, desc="eval windows", unit="batch",
               disable=not config.progress or n_batches < 2)
    with torch.inference_mode():
        for b_idx, (windows, logits, targets, mask) in enumerate(bar):
            # Flattened [B*T, V] input: the transposed [B, V, T] layout is ~10x slower on CPU.
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                  reduction="none").view_as(targets)
            scored = torch.where(mask, nll, 0).double()
            nll_sum += scored.sum().to(out_dev)
            per_window = scored.sum(1).to(out_dev)
            first = b_idx * batch_size  # batches are consecutive slices of the plan
            window_nll[first:first + per_window.shape[0]] = per_window
            if agreements:
                logp = F.log_softmax(logits.float(), dim=-1)
                for a in agreements.values():
                    a.add(b_idx, first, windows, logp, targets, mask)
                del logp
            del logits, nll
        # The one host sync: the scalars and the per-window sums come back together.
        nll_sum, window_nll = float(nll_sum), window_nll.tolist()
        window_tokens = [seq_len - f for _, f in plan]
        agreed = {k: a.result(window_tokens, design, config.seed) for k, a in agreements.items()}
    seconds = time.perf_counter() - t0
    mean_nll = float(nll_sum) / n_scored
    result = EvalResult(
        perplexity=safe_exp(mean_nll), nll=mean_nll,
        bits_per_byte=float(nll_sum) / math.log(2) / max(n_bytes, 1),
        tokens_scored=n_scored, bytes_scored=n_bytes, windows=len(plan), seq_len=seq_len, stride=stride,
        seconds=seconds, tokens_per_s=len(plan) * seq_len / seconds if seconds > 0 else 0.0, batch_size=batch_size,
        window_nll=window_nll, window_tokens=window_tokens,
        perplexity_ci95=list(perplexity_interval(window_nll, window_tokens, seed=config.seed,
                                                 dependent=design["dependent"], strata=design["strata"])),
        interval_method=interval_method(len(plan), design["dependent"], design["strata"]),
        window_starts=design["window_starts"], sampling={k: v for k, v in design.items() if k != "window_starts"},
    )
    if "parent" in agreed:
        for k, v in agreed["parent"].items():
            setattr(result, k, v)
    if "base" in agreed:
        result.vs_base = agreed["base"]
    if config.max_new_tokens > 0 and config.prompts:
        result.generations = _generate(model, tokenizer, config.prompts, config.max_new_tokens)
    # Sweeps run hundreds of silent evaluations (progress=False): keep those at DEBUG.
    log.log(logging.INFO if config.progress else logging.DEBUG, "perplexity %.4f (nll %.4f nats, %.4f bits/byte) over %d tokens in %d windows, %.1f tok/s",
             result.perplexity, mean_nll, result.bits_per_byte, n_scored, len(plan), result.tokens_per_s)
    return result
