"""Paper presets (``--preset wanda|sparsegpt|superweight``): a paper's published protocol as
config field values, with every way this tool's run differs from the paper's code.

    cfg = PipelineConfig(); PRESETS["wanda"].fields   # {"prune": {"method": "wanda", ...}, ...}

The command line applies a preset before a config file and flags (``llm_cli``); the report
opens with "Protocol: as <paper>, except: <every field you overrode>" and lists ``differs``.
``tests/test_presets.py`` checks each field against values transcribed from the paper's code.
"""
from __future__ import annotations

from dataclasses import dataclass

from llm_config import SUPER_WEIGHT_PROMPT, ZEROSHOT_TASKS


@dataclass(frozen=True)
class Preset:
    """A paper's published protocol as field values, and where we differ from its code."""

    paper: str
    code: str
    fields: dict      # config section -> {field: value}
    differs: tuple    # where this preset is not the paper's code, always stated with its numbers


# The pruning papers calibrate on 128 windows of 2048 tokens from the C4 train shard
# en/c4-train.00000-of-01024, seed 0 (get_c4 in both codes), and score WikiText-2 test, raw,
# joined by "\n\n", in disjoint windows of 2048 tokens (LLaMA-1's context).
_PRUNING_PAPERS = {"run": {"train_dataset": "c4", "dataset": "wikitext2", "seed": 0},
                   "finetune": {"mode": "none"},
                   "prune": {"sparsity": 0.5, "pattern": "unstructured", "calib_samples": 128,
                             "calib_seq_len": 2048, "seed": 0, "allocation": "uniform"},
                   "eval": {"seq_len": 2048, "stride": None, "eval_tokens": 0},
                   "zeroshot": {"enabled": True, "limit": 0, "num_fewshot": 0}}
_C4_EVAL = ("C4 validation perplexity (first 256 windows) is a second run with --dataset c4: the eval step "
            "scores one text per run")
PRESETS: dict[str, Preset] = {
    "wanda": Preset(
        "Sun et al. 2023, A Simple and Effective Pruning Approach for LLMs (Wanda)", "locuslab/wanda",
        {**_PRUNING_PAPERS,
         "run": {**_PRUNING_PAPERS["run"], "steps": ("finetune", "prune", "eval", "zeroshot")},
         "prune": {**_PRUNING_PAPERS["prune"], "method": "wanda"},
         "zeroshot": {**_PRUNING_PAPERS["zeroshot"], "tasks": ZEROSHOT_TASKS}},
        (_C4_EVAL, "Wanda's code sets the window to the model's max_position_embeddings (4096 for Llama-2, "
                   "for calibration and evaluation); this preset uses 2048, as its LLaMA-1 tables: add "
                   "--seq-len 4096 --calib-seq-len 4096 for Llama-2 as its code runs it")),
    "sparsegpt": Preset(
        "Frantar & Alistarh 2023, SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
        "IST-DASLab/sparsegpt",
        {**_PRUNING_PAPERS,
         "run": {**_PRUNING_PAPERS["run"], "steps": ("finetune", "prune", "eval", "zeroshot")},
         "prune": {**_PRUNING_PAPERS["prune"], "method": "sparsegpt", "blocksize": 128, "percdamp": 0.01},
         "zeroshot": {**_PRUNING_PAPERS["zeroshot"],
                      "tasks": ("lambada_openai", "piqa", "arc_easy", "arc_challenge")}},
        (_C4_EVAL, "the paper's zero-shot set also has StoryCloze, whose data is not public (lm-eval needs a "
                   "manual download); it is left out")),
    "superweight": Preset(
        "Yu et al. 2024, The Super Weight in Large Language Models", "mengxiayu/LLMSuperWeight",
        {"run": {"dataset": "wikitext2", "seed": 0,
                 "steps": ("finetune", "quantize", "eval", "zeroshot", "analysis")},
         "finetune": {"mode": "none"},
         "quantize": {"method": "rtn", "wbits": 4, "group": 512, "zero_point": "float", "protect": "auto",
                      "bit_allocation": "uniform", "super_weight_prompt": SUPER_WEIGHT_PROMPT},
         "analysis": {"super_weight_prompt": SUPER_WEIGHT_PROMPT},
         "eval": {"seq_len": 2048, "stride": None, "eval_tokens": 0},
         "zeroshot": {"enabled": True, "limit": 0, "num_fewshot": 0,
                      "tasks": ("winogrande", "arc_challenge", "arc_easy", "piqa", "sciq", "hellaswag",
                                "lambada_openai")}},
        ("the paper's perplexity is lm-eval's wikitext task (word perplexity over whole documents); ours is "
         "token perplexity in disjoint 2048-token windows",
         "its min-max RTN sweeps block sizes 64 to 2048 over 1-D row-major blocks of the flattened weight, "
         "clips outliers by z-score first and offsets by the unrounded minimum; this preset takes one point, "
         "groups of 512 input columns (the same blocks where a row's width is a multiple of 512; SmolLM2's 576 "
         "ends in a narrower group), the unrounded minimum (--quant-zero-point float), no z-score clipping, "
         "with the super weights kept in full precision (their 'restore' variant)")),
}
