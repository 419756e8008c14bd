"""Every step's config: its fields, defaults, CPU/GPU budgets, checks and help.

    from llm_prune_model import PruneConfig, prune_model     # re-exported by each step module
    cfg = PruneConfig(sparsity=0.6)       # budget fields stay None until the model's device fills them

Why the configs live here and not in their step modules: ``llm_main_v4.py`` generates its
command line from these dataclasses (``llm_cli``), and ``--report-only`` must parse that command
line without importing a single step module (they pull in the science and its imports). The
field machinery (``knob``, ``budget``, ``StepConfig``) is in ``llm_knobs``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import typing
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import llm_tasks as T
from llm_common import UserError
from llm_knobs import (SUPER_WEIGHT_PROMPT, StepConfig, budget, exact, knob, parse_floats, parse_ints,
                       parse_max_memory, parse_names, parse_nm, parse_protect, parse_trackers, parse_variant_patterns,
                       progress_knob, seed_knob, super_weight_prompt_knob, variants_knob)
from llm_config_measure import AdversarialConfig, AnalysisConfig, EvalConfig, SafetyConfig
from llm_model import SAMPLE_PROMPT

# The noise step comes after every other step that makes variants: its sweep measures each of them.
ALL_STEPS = ("finetune", "prune", "quantize", "noise", "eval", "zeroshot", "safety", "export", "adversarial",
             "analysis")
# The zero-shot suite of the Wanda paper (and OWL's), lm-evaluation-harness names; SparseGPT's and
# the Super Weight paper's are in their presets (llm_presets).
ZEROSHOT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def parse_steps(text: str) -> tuple:
    steps = [s.strip() for s in text.split(",")]
    if not any(steps):
        raise ValueError("a non-empty comma list of steps")
    for s in steps:
        if s not in ALL_STEPS:
            raise ValueError(f"a comma list from {','.join(ALL_STEPS)} (unknown step {s!r})")
    if len(set(steps)) != len(steps):
        raise ValueError("a comma list without repeated steps")
    return tuple(s for s in ALL_STEPS if s in steps)  # pipeline order, whatever the flag's order


# --------------------------------------------------------------------------- the configs


@dataclass
class RunConfig(StepConfig):
    """What the whole run shares: model, data, device, output and seed."""

    step: ClassVar[str] = "run"
    steps: tuple = knob((), f"comma list from {','.join(ALL_STEPS)}", parse=parse_steps, shown="every step")
    config: Optional[str] = knob(None, "YAML file of settings with the flags' or the fields' names (the "
                                       "config.yaml a run writes reruns it); flags given override it",
                                 results=False, shown="none")
    log_to: tuple = knob((), "experiment trackers, through accelerate: none, or a comma list from "
                             "tensorboard, wandb (offline without network), mlflow; the fine-tune's curves "
                             "and every step's numbers (perplexities, zero-shot accuracies, timings) go to "
                             "each", flag="--log-to", parse=parse_trackers, results=False, shown="none")
    preset: Optional[str] = knob(None, "a paper's published protocol in one flag (PRESETS in llm_presets): "
                                       "the model as loaded, the paper's calibration, windows, seed and "
                                       "zero-shot tasks; --config and flags override it, and the report "
                                       "lists every field overridden",
                                 choices=("wanda", "sparsegpt", "superweight"), results=False, shown="none")
    preset_overrides: tuple = knob((), "the preset's fields that the config file or flags changed (set by "
                                       "the command line)", cli=False, results=False)
    # compare=False: two configs of the same values are equal however they were spelled (flags or a file)
    flags_given: tuple = dataclasses.field(default=(), compare=False, metadata=knob(
        (), "the flags the command line or --config file gave, whatever their value (set by the command line; a "
            "flag given at its default that has no effect is named too)", cli=False, results=False).metadata)
    output_dir: str = knob("data", "results, checkpoints, plots and report", results=False)
    seed: int = knob(0, "seed of every step (recorded in results.json)", bounds="[0,4294967295]")
    log_level: str = knob("INFO", "logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                          results=False)
    budget: str = knob("auto", "default budgets of every step: the CPU or the GPU value of every budget "
                               "field (auto: by device)", choices=("auto", "cpu", "gpu"))
    smoke: bool = knob(False, "try a protocol small before running it big: every step's budgets cut to the "
                              "least that runs it (2 windows of 32 tokens, 256 tokens scored, 8 questions per "
                              "task, first 2 values of each eps list), presets and config files included; the "
                              "report says it is a smoke run")
    report_only: bool = knob(False, "rebuild plots and report from <output-dir>/results.json, "
                                    "without a model", results=False)
    dry_run: bool = knob(False, "load the model, print the plan (steps, variants, units of each measure, "
                                "estimated time per step and in total) and stop before the first step",
                         results=False)
    compare: tuple = knob((), "compare finished runs: one table and one plot across their results.json, "
                              "written into --output-dir (no model is loaded)",
                          many="+", results=False, shown="none")
    model: Optional[str] = knob(None, "hub id, save_pretrained directory or .gguf file",
                                shown="the embedded SmolLM2-135M-Instruct, GGUF Q4_1")
    device: str = knob("auto", "auto|cpu|cuda|cuda:N")
    dtype: str = knob("auto", "weights dtype (auto: bf16 on CUDA, fp32 on CPU)",
                      choices=("auto", "float32", "bfloat16", "float16"))
    device_map: Optional[str] = knob(None, "'auto' shards the model over all GPUs (accelerate)",
                                     choices=("auto", "balanced", "balanced_low_0", "sequential"),
                                     shown="the whole model on --device")
    max_memory: Optional[dict] = knob(None, "per-device cap with --device-map, e.g. "
                                            "'0=20GiB,1=20GiB,cpu=64GiB'",
                                      parse=parse_max_memory, shown="no cap")
    trust_remote_code: bool = knob(False, "allow model code from the hub, and zero-shot task YAMLs that run "
                                          "Python (off by default)")
    cache_dir: Optional[str] = knob(None, "where dequantized GGUF models are cached", results=False,
                                    shown="data/cache")
    dataset: Optional[str] = knob(None, "evaluation text: wikitext2, c4, ptb (the pruning papers' "
                                        "loaders), embedded, or a file/folder; a corpus named explicitly "
                                        "never falls back",
                                  shown="wikitext2, or the embedded corpus when offline and not cached")
    train_dataset: Optional[str] = knob(None, "calibration / fine-tuning text, same choices",
                                        shown="c4 on GPU, as the pruning papers calibrate, else wikitext2 "
                                              "(its train split), whatever --dataset is")
    data_dir: Optional[str] = knob(None, "folder that holds the named corpora locally, as their publishers ship "
                                         "them: wikitext-2-raw/wiki.{test,train}.raw, c4/c4-train.00000-of-01024"
                                         ".json.gz, c4/c4-validation.00000-of-00008.json.gz, ptb/ptb.{test,"
                                         "train}.txt; read before the hub", shown="$LLM_DATA_DIR")
    no_fallback: bool = knob(False, "never replace an unavailable wikitext2 by the embedded corpus")
    save_variants: bool = knob(False, "store full copies of the pruned and noisy weights (default: a 1-bit "
                                      "mask for pruning that only zeroes weights, and the noise recipe, "
                                      "regenerated bit for bit)", results=False)
    allow_overlap: bool = knob(False, "run even when the calibration / fine-tuning text shares "
                                      "paragraphs with the evaluation text (refused by default: it "
                                      "inflates every score)", results=False)

    multiple_testing: str = knob("holm", "correction over every paired test of the run (each variant against its "
                                         "parent on every measure, and the contrasts): holm (family-wise "
                                         "error), bh (Benjamini-Hochberg false discovery rate) or none; a † "
                                         "marks an adjusted-significant difference",
                                 choices=("holm", "bh", "none"))
    contrast: tuple = knob((), "test two variants against each other, paired over the same windows, questions, "
                               "samples, seeds and probes: A,B (names or patterns such as pruned[*]; repeat "
                               "the flag for more); the points of a grid that share a parent are contrasted "
                               "pairwise without it", many=True, shown="grid siblings")

    def check(self) -> None:
        for spec in self.contrast:
            try:
                parts = parse_variant_patterns(spec)
            except ValueError:
                parts = ()
            if len(parts) != 2 or "all" in parts or "live" in parts:
                raise UserError(f"--contrast must be two variant names or patterns, A,B, got {spec!r}")
        d = self.data_dir or os.environ.get("LLM_DATA_DIR")
        if d and not os.path.isdir(os.path.expanduser(d)):
            raise UserError(f"--data-dir {d}: no such folder" + (" (from LLM_DATA_DIR)" if not self.data_dir else ""))


@dataclass
class FinetuneConfig(StepConfig):
    step: ClassVar[str] = "finetune"
    prefix: ClassVar[str] = "ft-"
    mode: str = knob("auto", "full|lora|none (auto: full below 1.5B parameters, else LoRA)",
                     flag="--finetune", choices=("auto", "full", "lora", "none"))
    steps: Optional[int] = budget(8, 500, "optimizer steps", bounds="[1,10000000]")
    batch_size: Optional[int] = budget(4, 8, "windows per step", bounds="[1,65536]")
    seq_len: Optional[int] = budget(128, 1024, "tokens per window", bounds="[2,1000000]", context=True)
    lr: Optional[float] = knob(None, "peak learning rate (auto: 5e-5 full, 2e-4 LoRA)", flag="--lr",
                               bounds="(0,1]")
    warmup_steps: int = knob(2, "linear warm-up steps, then cosine decay to 10%", bounds="[0,10000000]")
    weight_decay: float = knob(0.0, "AdamW weight decay", bounds="[0,10]")
    grad_clip: float = knob(1.0, "gradient-norm clip (0: none)", bounds="[0,1000000]")
    holdout_fraction: float = knob(0.1, "tail of the training text held out for the before/after loss",
                                   bounds="(0,1)")
    holdout_windows: int = knob(8, "held-out windows evaluated before and after", bounds="[1,1000000]")
    save_every: int = knob(0, "resume checkpoint every N steps (0: by time only)", bounds="[0,10000000]",
                           results=False)
    save_every_s: float = knob(300.0, "... and at most this often in seconds (0: never by time)",
                               bounds="[0,10000000]", results=False)
    log_every: int = knob(25, "steps between host syncs for the loss log", bounds="[1,10000000]",
                          results=False)
    log_to: tuple = knob((), "experiment trackers, through accelerate: none, or a comma list from "
                             "tensorboard, wandb (offline without network), mlflow; the fine-tune's curves "
                             "and every step's numbers (perplexities, zero-shot accuracies, timings) go to "
                             "each", flag="--log-to", parse=parse_trackers, results=False, shown="none")
    lora_r: int = knob(16, "LoRA rank", flag="--lora-r", bounds="[1,65536]")
    lora_alpha: int = knob(32, "LoRA alpha", flag="--lora-alpha", bounds="[1,65536]")
    lora_merge: str = knob("fp32", "how a bf16/fp16 model takes its LoRA update: fp32 merges exactly and "
                                   "holds the fine-tuned model in float32; native merges into the model's "
                                   "dtype (rounds most of a small update away)",
                           flag="--lora-merge", choices=("fp32", "native"))
    gradient_checkpointing: Optional[bool] = knob(None, "recompute activations (auto: only when "
                                                        "they would not fit)", results=False)
    compile: bool = knob(False, "torch.compile the model for the training loop")
    max_shard_size: str = knob("2GB", "safetensors shard size of the saved model", flag="--max-shard-size",
                               results=False)
    seed: int = seed_knob()
    output_dir: str = knob("data/finetuned", "the finished model", cli=False, results=False)
    base_model: str = knob("", "label recorded in the manifest", cli=False, results=False)
    data: str = knob("", "description of the training text, for the manifest", cli=False, results=False)
    identity: str = knob("", "what else a reused fine-tune must match: the base model's identity and the "
                             "training text's hash (set by the pipeline)", cli=False, results=False)

    def check(self) -> None:
        _check_shard_size(self.max_shard_size)


def _check_shard_size(size: str) -> None:
    if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", size.strip()) or \
            float(re.match(r"[\d.]+", size.strip()).group()) <= 0:
        raise UserError(f"--max-shard-size must be a positive size such as 2GB or 500MB, not {size!r}")


PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "taylor")


@dataclass
class PruneConfig(StepConfig):
    step: ClassVar[str] = "prune"
    prefix: ClassVar[str] = "prune-"
    method: str = knob("wanda", "pruning score; a comma list makes a grid of pruned variants (with "
                                "--sparsity and --sparsity-pattern)", choices=PRUNE_METHODS, grid=True)
    sparsity: float = knob(0.5, "fraction of weights removed, in [0, 1); N:M patterns fix it at 1 - N/M",
                           flag="--sparsity", bounds="[0,1)", grid=True)
    pattern: str = knob("unstructured", "unstructured, or N:M: keep N of every M consecutive input weights "
                                        "of a row (2:4, 4:8)", flag="--sparsity-pattern", grid=True)
    source: str = knob("auto", "which model is pruned: auto (the fine-tuned model when this run has one, "
                               "else the model as loaded), base (the model as loaded, as the pruning "
                               "papers), fine-tuned",
                       flag="--prune-from", choices=("auto", "base", "fine-tuned"))
    blocksize: int = knob(128, "SparseGPT column block", flag="--sparsegpt-blocksize", bounds="[1,65536]")
    percdamp: float = knob(0.01, "SparseGPT dampening, fraction of mean diag(H)", flag="--sparsegpt-percdamp",
                           bounds="[0,10]")
    taylor_score: str = knob("taylor", "score of --prune-method taylor: |g w| (taylor) or 0.5 F w^2 (fisher)",
                             flag="--taylor-score", choices=("taylor", "fisher"))
    protect: typing.Union[str, tuple] = knob(
        (), "'auto' (detect super weights first) or module:row:col,...; kept out of the pruning mask and the "
            "noise", flag="--protect-super-weights", parse=parse_protect)
    calib_samples: Optional[int] = budget(8, 128, "calibration windows", flag="--calib-samples",
                                          bounds="[1,1000000]", shown="8 CPU (quantize: 32), 128 GPU")
    calib_seq_len: Optional[int] = budget(512, 2048, "tokens per calibration window", flag="--calib-seq-len",
                                        bounds="[2,1000000]", context=True)
    super_weight_prompt: str = super_weight_prompt_knob()
    allocation: str = knob("uniform", "per-layer sparsity: uniform, owl (Yin et al. 2024: layers with more "
                                      "activation outliers keep more), or ours, hessian / fisher (more "
                                      "curvature per weight keeps more); non-uniform ones stay within target "
                                      "+- 2 x --owl-lambda and prune exactly the target overall",
                           flag="--sparsity-allocation", choices=("uniform", "owl", "hessian", "fisher"))
    owl_m: float = knob(5.0, "OWL's M: a Wanda score above M x its layer's mean is an outlier (5 in the OWL "
                             "paper's LLaMA runs; its code's argparse default is 3)",
                        flag="--owl-m", bounds="(0,1000]")
    owl_lambda: float = knob(0.08, "OWL's lambda: layer sparsities span 2 lambda around the target (all "
                                   "non-uniform allocations)", flag="--owl-lambda", bounds="[0,0.5]")
    allocation_windows: Optional[int] = budget(2, 8, "calibration windows of the hessian / fisher allocation",
                                             bounds="[1,1000000]")
    allocation_probes: int = knob(8, "Hutchinson probes of the hessian allocation", bounds="[1,100000]")
    # Williams & Aletras (ACL 2024): the calibration draw alone moves results; several draws measure it.
    calib_seed: Optional[int] = knob(None, "seed of the calibration draw; a comma list builds each pruned "
                                           "and quantized variant once per draw, named ...,seed=K, and the "
                                           "report gives mean +- std over draws", flag="--calib-seeds",
                                     shown="--seed", bounds="[0,4294967295]", grid=True)
    seed_named: bool = knob(False, "the variant name carries the calibration seed (a point of several draws)",
                            cli=False, results=False)
    seed: int = seed_knob()
    progress: bool = progress_knob()

    def point_key(self) -> tuple:
        """An N:M pattern fixes the sparsity: (wanda, 0.5, 2:4) and (wanda, 0.7, 2:4) are one point."""
        return (self.method, self.pattern, self.sparsity if parse_nm(self.pattern) is None else None,
                self.calib_seed)

    def grid_points(self) -> list:
        """As ``StepConfig.grid_points``; with several calibration seeds each point's name carries its own."""
        named = isinstance(self.calib_seed, tuple) and len(self.calib_seed) > 1
        return [dataclasses.replace(p, seed_named=named) for p in super().grid_points()]

    def variant_name(self, grid: bool) -> str:
        """``pruned``, or in a grid ``pruned[wanda,0.6,unstructured]`` (an N:M point:
        ``pruned[wanda,2:4]``)."""
        if not grid:
            return "pruned"
        draw = f",seed={self.calib_seed}" if self.seed_named else ""
        return f"pruned[{self.method},{self.pattern}{draw}]" if parse_nm(self.pattern) else \
            f"pruned[{self.method},{exact(self.sparsity)},{self.pattern}{draw}]"

    @property
    def nm(self) -> Optional[tuple[int, int]]:
        """The pattern parsed: None for unstructured, else (n kept, m)."""
        return parse_nm(self.pattern)

    def check(self) -> None:
        parse_nm(self.pattern)
        if self.allocation != "uniform" and self.pattern != "unstructured":
            raise UserError(f"--sparsity-allocation {self.allocation} needs --sparsity-pattern unstructured: "
                            f"{self.pattern} fixes every layer at the same sparsity")


NOISE_MODES = ("absolute", "relative", "multiplicative", "bitflip")


@dataclass
class NoiseConfig(StepConfig):
    step: ClassVar[str] = "noise"
    prefix: ClassVar[str] = "noise-"
    mode: str = knob("absolute", "noise of the noisy variant", choices=NOISE_MODES)
    epsilon: float = knob(0.05, "noise scale (bit-error rate for bitflip) of the noisy variant; a comma list "
                                "makes one noisy variant per value",
                          flag="--epsilon", bounds="[0,100]", grid=True)
    group: str = knob("all", "all|linears|layer:N|module:NAME|embeddings|norms")
    seed: int = seed_knob()
    bitflip_format: str = knob("bfloat16", "16-bit view of fp32 weights for bit flips",
                               choices=("bfloat16", "float16"))
    sweep_mode: str = knob("relative", "noise mode of the eps sweep", flag="--sweep-mode",
                           choices=NOISE_MODES)
    sweep_group: str = knob("linears", "parameter group of the sweep", flag="--sweep-group")
    # CPU: four points; relative noise of 0.02 moves the embedded model's perplexity by well under 1%.
    sweep_eps: Optional[tuple] = budget((0.05, 0.1, 0.2, 0.5), (0.02, 0.05, 0.1, 0.2, 0.5), "eps of the sweep",
                                        flag="--sweep-eps", parse=parse_floats, bounds="[0,100]")
    sweep_seeds: int = knob(3, "seeds per eps", flag="--sweep-seeds", bounds="[1,10000]")
    sweep_tokens: Optional[int] = budget(256, 16384, "evaluation tokens per sweep point",
                                         flag="--sweep-tokens", bounds="[2,1000000000]")
    sweep_seq_len: Optional[int] = budget(256, 2048, "tokens per sweep window (at most --sweep-tokens)",
                                        flag="--sweep-seq-len", bounds="[2,1000000]", context=True)
    protect_fraction: float = knob(0.005, "top fraction of weights by Fisher saliency kept clean in the "
                                          "protected sweep (0: no protected sweep)",
                                   flag="--protect-fraction", bounds="[0,1)")
    protect_score: str = knob("noise", "ranking of the protected weights: the expected loss increase under "
                                       "the sweep's noise, F sigma^2 (noise), or OBD's w^2 F (obd)",
                              flag="--protect-score", choices=("noise", "obd"))
    fisher_windows: Optional[int] = budget(2, 32, "calibration windows of that Fisher saliency",
                                         flag="--noise-fisher-windows", bounds="[1,1000000]")
    fisher_seq_len: Optional[int] = budget(256, 2048, "tokens per Fisher window",
                                           flag="--noise-fisher-seq-len", bounds="[2,1000000]", context=True)
    protect: typing.Union[str, tuple] = knob((), "see --protect-super-weights",
                                             flag="--protect-super-weights", parse=parse_protect)
    super_weight_prompt: str = super_weight_prompt_knob()
    map: Optional[bool] = budget(False, True, "layer x module sensitivity map (costs layers x 7 evaluations)",
                               flag="--noise-map")
    map_eps: float = knob(0.1, "relative noise of each map cell", flag="--map-eps", bounds="[0,100]")
    map_tokens: Optional[int] = budget(128, 16384, "evaluation tokens per map cell", flag="--map-tokens",
                                     bounds="[2,1000000000]")
    batch_size: Optional[int] = knob(None, "evaluation windows per forward pass (auto: from free memory "
                                           "on GPU, 1 on CPU)", flag="--batch-size", bounds="[1,65536]")
    variants: tuple = variants_knob()
    progress: bool = progress_knob()

    def variant_name(self, grid: bool) -> str:
        """``noisy``, or in a grid ``noisy[absolute,0.05]``."""
        return f"noisy[{self.mode},{exact(self.epsilon)}]" if grid else "noisy"

    def check(self) -> None:
        sweep = self.sweep_eps or ()  # a budget: None until resolved
        for e in (self.epsilon, *sweep) if self.mode == "bitflip" else ():
            if e > 1:
                raise UserError(f"a bit-error rate is at most 1, got {e}")
        if self.sweep_mode == "bitflip" and any(e > 1 for e in sweep):
            raise UserError(f"a bit-error rate is at most 1, got --sweep-eps {self.sweep_eps}")


@dataclass
class QuantizeConfig(StepConfig):
    """The ``quantized`` variant: RTN or GPTQ, uniform or sensitivity-guided mixed precision; tuples on
    the grid fields make a grid of quantized variants, ``quantized[gptq,3,g128]``."""

    step: ClassVar[str] = "quantize"
    prefix: ClassVar[str] = "quant-"
    method: str = knob("none", "none (no quantized variant), rtn or gptq; comma lists on the [,...] flags make a grid of "
                                "quantized variants, quantized[gptq,3,g128]", choices=("none", "rtn", "gptq"),
                       grid=True)
    wbits: int = knob(4, "bits per weight (the uniform choice)", flag="--wbits", bounds="[2,8]", grid=True)
    group: int = knob(128, "group size, input columns per scale and zero", flag="--quant-group",
                      bounds="[1,1000000]", grid=True)
    source: tuple = knob(("live",), "which models are quantized: live (the model the run holds) and/or variant "
                                    "names and patterns (pruned[*]); a pruned one keeps its zeros exactly zero, "
                                    "named pruned[...]+quantized[...]", flag="--quantize-from",
                         parse=parse_variant_patterns)
    zero_point: str = knob("integer", "integer: GPTQ's grid, 0 on it, rounded zero code; float: GGUF Q4_1 / "
                           "HQQ style: unrounded minimum, 0 need not be on the grid",
                           choices=("integer", "float"))
    scale_dtype: str = knob("float32", "dtype of each group's scale: float32 (GPTQ's reference), or float16, as "
                                       "AutoGPTQ and compressed-tensors store it (the export then writes 16 bits "
                                       "per scale)", flag="--quant-scale-dtype", choices=("float32", "float16"))
    symmetric: bool = knob(False, "symmetric grid: scale 2 max|w| / (2^bits - 1), zero the fixed code 2^(bits-1) "
                                  "(GPTQ's sym=True; vLLM's uint4b8 / uint8b128 Marlin types, which need no zero "
                                  "point); alone on, or off,on for a grid axis (names get 'sym')",
                           flag="--quant-symmetric", grid=True)
    act_order: bool = knob(False, "GPTQ: quantize columns by decreasing H_jj (act order)", flag="--act-order")
    percdamp: float = knob(0.01, "GPTQ dampening, fraction of mean diag(H)", flag="--gptq-percdamp",
                           bounds="[0,10]")
    blocksize: int = knob(128, "GPTQ column block", flag="--gptq-blocksize", bounds="[1,65536]")
    protect: typing.Union[str, tuple] = knob((), "see --protect-super-weights (kept in full precision)",
                                             flag="--protect-super-weights", parse=parse_protect)
    keep_fraction: float = knob(0.0, "top fraction of weights by OBD saliency 0.5 F w^2 also kept "
                                     "in full precision", bounds="[0,1)")
    bit_allocation: str = knob("uniform", "bits per linear: uniform (--wbits), or from {2,3,4,8} by Hessian "
                                          "/ Fisher sensitivity under --avg-bits (HAWQ-style, greedy)",
                               flag="--bit-allocation", choices=("uniform", "hessian", "fisher"), grid=True)
    avg_bits: Optional[float] = knob(None, "average code bits per weight of the mixed precision",
                                     flag="--avg-bits", bounds="[2,8]", shown="--wbits", grid=True)
    sensitivity_windows: Optional[int] = budget(2, 8, "calibration windows of the sensitivities and saliency",
                                              bounds="[1,1000000]")
    sensitivity_probes: int = knob(8, "Hutchinson probes of --bit-allocation hessian", bounds="[1,100000]")
    error_windows: Optional[int] = budget(2, 8, "windows of the output-error diagnostic (each linear's "
                                                "||(W-Q)X|| / ||WX||), calibration and held out: two forward "
                                                "passes of them, most of an RTN step's time (0: off)",
                                          bounds="[0,1000000]")
    calib_samples: Optional[int] = budget(32, 128, "calibration windows (GPTQ needs more than pruning)",
                                          flag="--calib-samples", bounds="[1,1000000]")
    calib_seq_len: Optional[int] = budget(512, 2048, "tokens per calibration window", flag="--calib-seq-len",
                                        bounds="[2,1000000]", context=True)
    calib_seed: Optional[int] = knob(None, "seed of the calibration draw; a comma list makes one quantized "
                                           "variant per draw, quantized[seed=K]", flag="--calib-seeds",
                                     shown="--seed", bounds="[0,4294967295]", grid=True)
    named: tuple = knob((), "what a grid point's name carries (settings, seed)", cli=False, results=False)
    super_weight_prompt: str = super_weight_prompt_knob()
    seed: int = seed_knob()
    progress: bool = progress_knob()
    _gptq = (lambda c: c.method == "gptq", "only --quant-method gptq reads it")
    applies: ClassVar[dict] = {"act_order": _gptq, "percdamp": _gptq, "blocksize": _gptq, "scale_dtype": (
                               lambda c: c.zero_point == "integer", "a float zero point's scale is fp16 already"),
                               "zero_point": (
                               lambda c: c.method != "none", "only --quant-method rtn or gptq reads it"),
                               "source": (lambda c: c.method != "none",
                                          "--quant-method none makes no quantized variant"),
                               "symmetric": (
                               lambda c: c.method != "none", "only --quant-method rtn or gptq reads it"),
                               "avg_bits": (lambda c: c.bit_allocation != "uniform",
                                            "only --bit-allocation hessian or fisher reads it"),
                               "sensitivity_probes": (lambda c: c.bit_allocation == "hessian",
                                                      "only --bit-allocation hessian reads it")}

    @property
    def budget_bits(self) -> Optional[float]:
        """The mixed precision's average code bits (--avg-bits, else --wbits); None when uniform."""
        return None if self.bit_allocation == "uniform" else float(
            self.wbits if self.avg_bits is None else self.avg_bits)

    def point_key(self) -> tuple:
        """Uniform points ignore --avg-bits, mixed ones --wbits (beyond being the budget)."""
        return (self.method, self.bit_allocation, self.budget_bits or self.wbits, self.group, self.symmetric,
                self.calib_seed)

    def grid_points(self) -> list:
        """As ``StepConfig.grid_points``; each point's name carries what varies (``named``)."""
        axes = {k: v for k, v in self.grid_axes().items() if len(v) > 1}
        if "method" in axes and "none" in axes["method"]:
            raise UserError("--quant-method none makes no variant: leave it out of a grid")
        named = ("settings",) * any(k != "calib_seed" for k in axes) + ("seed",) * ("calib_seed" in axes)
        return [dataclasses.replace(p, named=named) for p in super().grid_points()]

    def variant_name(self, grid: bool = True) -> str:
        """``quantized``; in a grid ``quantized[gptq,3,g128]`` (mixed precision:
        ``quantized[gptq,hessian3.5,g128]``), a calibration draw's ``quantized[seed=K]``."""
        if not grid or not self.named:
            return "quantized"
        bits = str(self.wbits) if self.budget_bits is None else f"{self.bit_allocation}{exact(self.budget_bits)}"
        sym = ["sym"] * (self.symmetric is True)
        parts = [self.method, bits, f"g{self.group}", *sym] * ("settings" in self.named)
        return f"quantized[{','.join(parts + [f'seed={self.calib_seed}'] * ('seed' in self.named))}]"

    def check(self) -> None:
        if self.zero_point == "float" and self.symmetric is True:
            raise UserError("--quant-symmetric needs --quant-zero-point integer (its zero is the fixed code "
                            "2^(bits-1)); a float zero point is an unrounded minimum")
        if self.zero_point == "float" and any(p == "all" or p[:1] in "*?" or p.startswith("pruned")
                                              for p in self.source):
            raise UserError("--quant-zero-point float has no exact 0 on its grid, so it cannot keep a pruned "
                            "model's zeros: quantize pruned variants with --quant-zero-point integer")


@dataclass
class ZeroShotConfig(StepConfig):
    """Zero-shot accuracy of every variant through lm-evaluation-harness (``lm_eval``)."""

    step: ClassVar[str] = "zeroshot"
    enabled: Optional[bool] = budget(False, True, "zero-shot accuracy of every variant through "
                                                  "lm-evaluation-harness (auto: on GPU, or when "
                                                  "--tasks is given)", flag="--zeroshot")
    tasks: tuple = knob(ZEROSHOT_TASKS, "lm-eval task names or task YAML paths", flag="--tasks",
                        parse=parse_names)
    include_path: Optional[str] = knob(None, "folder of extra lm-eval task YAMLs (local tasks)",
                                       flag="--tasks-include", shown="none")
    limit: Optional[int] = budget(100, 0, "examples per task, the first N (0: all; a CPU budget, not the "
                                          "papers' protocol)", flag="--tasks-limit", bounds="[0,1000000000]")
    num_fewshot: int = knob(0, "in-context examples per question (0: zero-shot, as the papers)",
                            flag="--num-fewshot", bounds="[0,1000]")
    apply_chat_template: bool = knob(False, "prompts in the tokenizer's chat template (lm-eval's "
                                            "apply_chat_template)")
    fewshot_as_multiturn: Optional[bool] = knob(None, "few-shot examples as chat turns (auto: with "
                                                      "--apply-chat-template)")
    batch_size: Optional[int] = knob(None, "evaluation windows per forward pass (auto: from free memory "
                                           "on GPU, 1 on CPU)", flag="--batch-size", bounds="[1,65536]")
    progress: bool = progress_knob()
    trust_remote_code: bool = knob(False, "allow local task YAMLs that run Python (!function)",
                                   flag="--trust-remote-code", results=False)
    applies: ClassVar[dict] = {"fewshot_as_multiturn": (lambda c: c.apply_chat_template,
                                                        "only --apply-chat-template reads it")}

    def resolved(self, gpu: bool):
        cfg = super().resolved(gpu)  # enabled: its budget, off on CPU and on on GPU
        if self.enabled is None and self.tasks != ZEROSHOT_TASKS:  # naming tasks asks for them, on CPU too
            cfg = dataclasses.replace(cfg, enabled=True)
        return cfg

    def fingerprint_dict(self) -> dict:
        """Also the contents of every local file the tasks read (the task folder, a task named by its
        YAML path, the data files and the YAMLs they name, wherever they lie): an edited task YAML
        or data file reruns the step."""
        d = super().fingerprint_dict()
        files, _ = T.local_task_files(self.tasks, self.include_path)
        if files:
            h = hashlib.sha256()
            for path in files:
                h.update(os.path.abspath(path).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(hashlib.file_digest(f, "sha256").digest())
            d["task_files_sha256"] = h.hexdigest()
        return d

    def check(self) -> None:
        if self.include_path and not os.path.isdir(os.path.expanduser(self.include_path)):
            raise UserError(f"--tasks-include: {self.include_path!r} is not a folder of task YAMLs")
        if self.fewshot_as_multiturn and not self.apply_chat_template:  # as lm-eval's own CLI refuses it
            raise UserError("--fewshot-as-multiturn on needs --apply-chat-template: few-shot examples become chat "
                            "turns only inside a chat template (it would be recorded as off)")
        _, code = T.local_task_files(self.tasks, self.include_path)
        if code and not self.trust_remote_code:
            raise UserError(f"zero-shot task {code[0]} runs Python code of its own (!function), which "
                            "lm-eval would import and run; pass --trust-remote-code if you trust it")


@dataclass
class ExportConfig(StepConfig):
    """Every variant as a loadable ``save_pretrained`` directory with a model card."""

    step: ClassVar[str] = "export"
    enabled: bool = knob(False, "write every variant as a save_pretrained directory (safetensors) with a "
                                "model card, into <output-dir>/export/<variant>", flag="--export")
    two_of_four: bool = knob(False, "on CUDA, also convert the 2:4-pruned linears to PyTorch's "
                                    "semi-structured sparse format and measure forward tokens/s against "
                                    "dense (implies --export)", flag="--export-2of4")
    speed_batches: tuple = knob((1, 16), "batch sizes of the 2:4 speed measurement", flag="--speed-batches",
                                parse=parse_ints, bounds="[1,65536]")
    speed_seq_len: int = knob(128, "tokens per sequence of the 2:4 speed measurement", flag="--speed-seq-len",
                              bounds="[1,1000000]", context=True)
    max_shard_size: str = knob("2GB", "safetensors shard size of the saved model", flag="--max-shard-size",
                               results=False)
    quant_format: str = knob("dequantized", "the quantized variant's export: dequantized weights (plain "
                                            "safetensors), or compressed-tensors (pack-quantized: int codes "
                                            "packed in int32, scales, zero points, as vLLM serves it; 2:4 "
                                            "variants marked 2:4; needs the compressed-tensors package)",
                             flag="--export-quant-format", choices=("dequantized", "compressed-tensors"))
    dtype: str = knob("auto", "dtype of every tensor an export does not quantize (embeddings, norms, LM head): "
                              "auto is bfloat16 for a compressed-tensors export (as vLLM serves it) and the "
                              "model's own dtype otherwise", flag="--export-dtype",
                      choices=("auto", "bfloat16", "float16", "float32"))
    reader_check: Optional[bool] = knob(None, "load each export with its readers (compressed-tensors: the tool's "
                                              "loader, transformers' dequantize and plain paths; dequantized: "
                                              "from_pretrained), in float32 and bfloat16, and write each one's logit "
                                              "difference from the in-run variant into the card (auto: on up to 3B "
                                              "parameters)", flag="--export-reader-check")
    command: str = knob("", "command line written into the model cards (set by the pipeline)", cli=False,
                        results=False)
    applies: ClassVar[dict] = {"quant_format": (lambda c: c.enabled or c.two_of_four, "only --export reads it"),
                               "dtype": (lambda c: c.enabled or c.two_of_four, "only --export reads it"),
                               "reader_check": (lambda c: c.enabled or c.two_of_four, "only --export reads it")}

    def check(self) -> None:
        _check_shard_size(self.max_shard_size)


STEP_CONFIGS: dict[str, type] = {"finetune": FinetuneConfig, "prune": PruneConfig, "quantize": QuantizeConfig,
                                 "noise": NoiseConfig, "eval": EvalConfig, "zeroshot": ZeroShotConfig, "safety": SafetyConfig,
                                 "export": ExportConfig, "adversarial": AdversarialConfig,
                                 "analysis": AnalysisConfig}


@dataclass
class PipelineConfig:
    """The whole run:
    ``run_pipeline(PipelineConfig(run=RunConfig(model=...), prune=PruneConfig(sparsity=0.6)))``."""

    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

