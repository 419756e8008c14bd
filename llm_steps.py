"""The step registry: one row per step, in pipeline order, and the hooks each step module exposes.

The orchestrator (``llm_main_v4``), the resume rules (``llm_resume``) and the run's plan
(``llm_estimate``) know the steps only through this table and these hooks:

    pipeline_step(run, config) -> None | "off"   the step on the shared ``llm_run.Run``
    variants_of(run, section)                    a variant step's {name: weights} from its record
    check_model(model, config)                   optional: refuse right after loading
    check_tokenizer(tokenizer, config)           optional: the same, for what the tokenizer lacks
    prepare(config, asked, run_config, texts)    optional: the config once the texts are read
    planned(config, names, live)                 optional: the variant names the step will make
    outputs_present(run)                         optional: False reruns a skipped step
    reattach(run)                                optional: an earlier run's live model back

A step module is imported only when one of its hooks is asked for, so ``--report-only`` loads none.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    module: str                   # imported when the step runs: --report-only loads no step module
    corpora: tuple                # texts it reads: their hashes enter its fingerprint
    variants: bool = False        # whether it makes variants (``variants_of`` gives them back)


# Configs: llm_config.STEP_CONFIGS; the results.json sections each writes: llm_results.STEP_SECTIONS;
# plots: llm_plots. tests/test_layout.py checks that the three name the same steps in the same order.
STEPS = {
    "finetune": Step("llm_finetune", ("train",)),
    "prune": Step("llm_prune_model", ("train",), variants=True),
    "quantize": Step("llm_quantize_model", ("train",), variants=True),
    "noise": Step("llm_robustness_test", ("eval", "train"), variants=True),
    "eval": Step("llm_evaluate_models", ("eval",)),
    "zeroshot": Step("llm_zeroshot", ()),
    "safety": Step("llm_safety", ()),
    "export": Step("llm_export", ()),
    "adversarial": Step("llm_adversarial_test", ("eval",)),
    "analysis": Step("llm_integrated_analysis", ("train", "eval")),
}


def hook(step: str, name: str):
    """Step module ``step``'s function ``name``, or None when it has none (an optional hook).
    Callers look it up through this module (``llm_steps.hook``) so the pass-counting benches can
    wrap every step by replacing this one function. KeyError for an unknown step."""
    return getattr(importlib.import_module(STEPS[step].module), name, None)
