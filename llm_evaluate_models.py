"""Step 4: perplexity and related metrics for every model variant.

    results = evaluate_variants(model, tokenizer, ids, {"base": None, "pruned": "pruned.safetensors"},
                                EvalConfig(seq_len=2048))

The metrics (window protocol, bits/byte, KL, greedy answers) live in the shared module
``llm_perplexity``, which other steps use as well; ``evaluate_model`` and ``EvalConfig`` are
re-exported here so that a notebook finds them under this step's name.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Mapping, Optional, Union

import torch

import llm_common as C
from llm_perplexity import EvalConfig, EvalResult, evaluate_model, reference_logprobs, safe_exp, window_plan

__all__ = ["EvalConfig", "EvalResult", "evaluate_model", "evaluate_variants", "reference_logprobs", "safe_exp",
           "window_plan"]

log = logging.getLogger("llm.eval")

Variant = Optional[Union[str, os.PathLike, Mapping[str, torch.Tensor]]]


def evaluate_variants(model, tokenizer, input_ids: torch.Tensor, variants: Mapping[str, Variant],
                      config: EvalConfig = EvalConfig(), kl: bool = False) -> dict[str, EvalResult]:
    """Evaluate every variant of ``model`` on ``input_ids`` ([n_tokens]).

    A variant is None (the model as it is), or a tensors-only checkpoint path or a name ->
    tensor dict whose weights are swapped in for its evaluation and restored bit for bit
    afterwards. With ``kl`` every swapped variant is also compared (KL, top-1 agreement)
    with the model as it is, kept as one spare copy.
    """
    reference = copy.deepcopy(model) if kl and any(v is not None for v in variants.values()) else None
    out = {}
    for name, weights in variants.items():
        log.info("evaluating variant %r", name)
        if weights is None:
            out[name] = evaluate_model(model, tokenizer, input_ids, config)
            continue
        tensors = weights if isinstance(weights, Mapping) else C.load_tensors(weights)
        with C.swapped_weights(model, tensors):
            out[name] = evaluate_model(model, tokenizer, input_ids, config, reference=reference)
    return out
