"""The eval step: perplexity and related metrics for every model variant.

    res = evaluate_variants(model, tokenizer, ids, {"base": None, "pruned": "pruned.safetensors"},
                            EvalConfig(seq_len=2048), parents={"pruned": "base"})
    res.perplexity   # {"base": ..., "pruned": ...}

The metrics (window protocol, bits/byte, KL, greedy answers) live in the shared module
``llm_perplexity``, which other steps use as well; ``evaluate_model`` and ``EvalConfig`` are
re-exported here so that a notebook finds them under this step's name.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Mapping, Optional, Union

import torch

import llm_common as C
import llm_variants as V
from llm_config import EvalConfig
from llm_run import Run
from llm_perplexity import EvalResult, evaluate_model, reference_logprobs, safe_exp, sampling_plan, window_plan
from llm_stats import paired_perplexity

__all__ = ["EvalConfig", "EvalResult", "EvaluationResult", "evaluate_model", "evaluate_variants", "reference_logprobs", "safe_exp",
           "window_plan"]

log = logging.getLogger("llm.eval")

# None (the model as it is), a checkpoint file or save_pretrained directory, a name -> tensor dict,
# or a callable model -> context manager that changes the model in place and restores it on exit
# (a regenerated noise recipe, a pruning mask).
Variant = Optional[Union[str, os.PathLike, Mapping[str, torch.Tensor], Callable]]


@dataclass
class EvaluationResult:
    variants: dict                 # name -> EvalResult
    parents: dict                  # name -> the variant it was derived from (None for the root)
    protocol: dict                 # windows, stride, tokens evaluated and available
    config: dict = field(default_factory=dict)  # the resolved EvalConfig

    @property
    def perplexity(self) -> dict:
        return {n: r.perplexity for n, r in self.variants.items()}


def evaluate_variants(model, tokenizer, input_ids: torch.Tensor, variants: Mapping[str, Variant],
                      config: EvalConfig = EvalConfig(), parents: Optional[Mapping[str, Optional[str]]] = None
                      ) -> EvaluationResult:
    """Evaluate every variant of ``model`` on ``input_ids`` ([n_tokens]).

    A variant is None (the model as it is), or a name -> tensor dict, a tensors-only
    checkpoint file or a save_pretrained directory whose weights are swapped in for its
    evaluation and restored bit for bit afterwards, or a callable ``model -> context manager``
    that changes the model in place for the evaluation and restores it. ``parents`` names the variant each was
    derived from. With ``config.kl`` every variant whose parent was evaluated too gets KL (mean,
    per-token percentiles, interval over windows) and top-1 agreement against that parent (one
    spare copy of the model, with the parent applied to it), and the same against the base, the
    root of its chain of parents, in ``vs_base`` (a second spare copy, only where a parent is not
    the base). Under ``accelerate launch`` or
    torchrun the ranks take disjoint variants and every rank gets all the results.
    """
    config = config.for_model(model)
    if config.eval_tokens and config.eval_tokens > input_ids.numel():  # a documented clamp, recorded below
        log.info("--eval-tokens %d exceeds the %d tokens of the text: evaluating all of them",
                 config.eval_tokens, input_ids.numel())
    parents = dict(parents or {})
    kl_for = {n for n in variants if config.kl and parents.get(n) in variants and parents[n] != n}
    # Against the base too (llama.cpp's KL and llm-compressor's requests compare with the base model): the
    # root of each variant's chain, where it is not already the parent.
    root = {n: root_of(n, parents) for n in variants}
    base_for = {n for n in kl_for if root[n] in variants and root[n] not in (n, parents[n])}
    base = next((root[n] for n in variants if n in base_for), None)  # separate trees (rare): the first one's
    base_for = {n for n in base_for if root[n] == base}
    # One spare copy of the model serves as every parent: each variant's parent is applied to it (in
    # place, restored after) while the variant itself is applied to the model. A second copy holds the
    # base for the whole loop, only when some variant's parent is not the base.
    reference = copy.deepcopy(model) if kl_for else None
    base_copy = copy.deepcopy(model) if base_for else None
    mine = []  # under accelerate launch / torchrun each rank evaluates every world_size-th variant
    with contextlib.ExitStack() as stack:
        if base_copy is not None:
            stack.enter_context(V.applied_variant(base_copy, variants[base]))
        for i, (name, weights) in C.shard_jobs(list(variants.items())):
            log.info("evaluating variant %r", name)
            ref = (V.applied_variant(reference, variants[parents[name]]) if name in kl_for
                   else contextlib.nullcontext())
            with V.applied_variant(model, weights), ref:
                r = evaluate_model(model, tokenizer, input_ids, config,
                                   reference=reference if name in kl_for else None,
                                   base_reference=base_copy if name in base_for else None)
            if r.vs_base is not None:
                r.vs_base["base"] = root[name]
            elif name in kl_for and root[name] == parents[name]:  # the parent is the base: its numbers
                r.vs_base = {"base": parents[name], "kl": r.kl, "kl_ci95": r.kl_ci95, "kl_percentiles": r.kl_percentiles,
                             "kl_percentiles_ci95": r.kl_percentiles_ci95, "top1_agreement": r.top1_agreement,
                             "top1_ci95": r.top1_ci95, "same_as_parent": True}
            mine.append((i, (name, r)))
    out = dict(C.gather_jobs(mine))
    add_vs_parent(out, parents)
    plan, design = sampling_plan(int(input_ids.numel()), config)
    # The scored windows' ids, in order, with their starts: two runs with equal hashes scored the very
    # same windows, so --compare can pair them window by window.
    scored = torch.cat([input_ids[s:s + config.seq_len] for s, _ in plan]).to(torch.int64).cpu().numpy()
    ids_sha = hashlib.sha256(scored.tobytes() + repr([s for s, _ in plan]).encode()).hexdigest()
    protocol = {"seq_len": config.seq_len, "stride": config.stride or config.seq_len,
                "eval_tokens": config.eval_tokens or None, "tokens_available": int(input_ids.numel()),
                "tokens_used": min(config.eval_tokens or input_ids.numel(), int(input_ids.numel())),
                "ids_sha256": ids_sha, "sampling": design}
    return EvaluationResult(out, {n: parents.get(n) for n in variants}, protocol, asdict(config))


def root_of(name: str, parents: Mapping[str, Optional[str]]) -> str:
    """The top of ``name``'s chain of parents (the base), stopping at a cycle or a missing link."""
    seen = {name}
    while parents.get(name) is not None and parents[name] not in seen:
        name = parents[name]
        seen.add(name)
    return name


def add_vs_parent(results: Mapping[str, EvalResult], parents: Mapping[str, Optional[str]]) -> None:
    """Each variant whose parent was evaluated too gets ``vs_parent``: its perplexity against the
    parent's, paired over the same windows (``llm_stats.paired_perplexity``), with the parent's name."""
    for name, r in results.items():
        parent = parents.get(name)
        p = results.get(parent) if parent is not None else None
        if p is None or not r.window_nll or len(p.window_nll) != len(r.window_nll):
            continue
        r.vs_parent = {"parent": parent, **paired_perplexity(p.window_nll, p.window_tokens, r.window_nll,
                                                             r.window_tokens, seed=r.sampling.get("seed", 0),
                                                             dependent=bool(r.sampling.get("dependent")),
                                                             strata=r.sampling.get("strata"))}


def pipeline_step(run: Run, config: EvalConfig) -> None:
    """The pipeline's evaluation: every variant on the evaluation text."""
    res = evaluate_variants(run.model, run.tokenizer, run.ids("eval"), run.variants, config, run.parents)
    run.results.update(perplexity=res.perplexity, evaluation={n: asdict(r) for n, r in res.variants.items()},
                       protocol={**res.protocol, "config": res.config}, variants=res.parents)


def prepare(config: EvalConfig, asked: EvalConfig, run_config, texts: dict) -> EvalConfig:
    """Before loading: the evaluation text's protocol cut (C4: the papers score the first 256
    windows of --seq-len), unless --eval-tokens says otherwise (``asked``: the config as given)."""
    ev = texts.get("eval")
    if ev is not None and ev.eval_windows and asked.eval_tokens is None:
        return replace(config, eval_tokens=ev.eval_windows * config.seq_len)
    return config
