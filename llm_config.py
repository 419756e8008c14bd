"""Every step's config in one place: defaults, CPU/GPU budgets, validation, help and flags.

    from llm_prune_model import PruneConfig, prune_model     # re-exported by each step module
    cfg = PruneConfig(sparsity=0.6)       # None fields are budgets, filled by the model's device

Why the configs live here and not in their step modules: ``llm_main_v4.py`` generates its
command line from these dataclasses, and ``--report-only`` must parse that command line
without importing a single step module (they pull in the science and its imports).

Conventions:
- A field whose default is ``None`` and that has a row in ``BUDGETS`` is a *budget*:
  ``config.resolved(gpu)`` fills it with the CPU or the GPU value. Each step function
  resolves its config from the model's device first, so a notebook call and the pipeline
  use the same numbers; results record the resolved config.
- Every field is a flag (``knob(flag=...)``; default ``--<prefix><name>``) unless ``cli=False``.
  Fields of different steps that share a flag (``--seed``, ``--batch-size``, ...) get one
  flag and must share a default.
- ``results=False`` marks fields that cannot change a number (progress bars, log cadence,
  where to write). Every other field is part of the step's resume fingerprint.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import stat
import typing
from dataclasses import dataclass, field, fields
from typing import ClassVar, Optional

import yaml

import llm_io as IO
import llm_model as LM
from llm_common import UserError
from llm_model import SAMPLE_PROMPT

log = logging.getLogger("llm.config")

ALL_STEPS = ("finetune", "prune", "noise", "quantize", "eval", "zeroshot", "export", "adversarial", "analysis")
# The zero-shot suite of the Wanda, SparseGPT and Super Weight papers (lm-evaluation-harness names).
ZEROSHOT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
SUPER_WEIGHT_PROMPT = "Apple Inc. is a worldwide tech company."

# --------------------------------------------------------------------------- budgets

# (CPU, GPU) value of every budget field, by "<step>.<field>". CPU: 2 cores and the 135M
# embedded model, a whole run in about five minutes. GPU: the papers' protocols (128 x 2048
# calibration, full WikiText-2, 20-step PGD, 100-step GCG) for a 7B model on one card.
BUDGETS: dict[str, tuple] = {
    "finetune.steps": (16, 500), "finetune.batch_size": (4, 8), "finetune.seq_len": (128, 1024),
    "prune.calib_samples": (8, 128), "prune.calib_seq_len": (512, 2048), "prune.allocation_windows": (2, 8),
    "noise.sweep_tokens": (512, 16384), "noise.sweep_seq_len": (512, 2048),
    "quantize.calib_samples": (8, 128), "quantize.calib_seq_len": (512, 2048), "quantize.sensitivity_windows": (2, 8),
    "noise.fisher_windows": (4, 32), "noise.fisher_seq_len": (256, 2048),
    "noise.map": (False, True), "noise.map_tokens": (128, 16384),
    "eval.seq_len": (1024, 2048), "eval.eval_tokens": (8192, 0),
    "adversarial.pgd_steps": (5, 20), "adversarial.n_windows": (3, 32), "adversarial.prompt_len": (32, 128),
    "adversarial.continuation_len": (16, 32), "adversarial.targeted_steps": (10, 40),
    "adversarial.gcg_steps": (10, 100), "adversarial.gcg_batch": (16, 128), "adversarial.gcg_topk": (32, 256),
    "adversarial.gcg_suffix_len": (6, 20), "adversarial.defence_steps": (4, 50),
    "adversarial.defence": ("free", "free"),
    "zeroshot.enabled": (False, True), "zeroshot.limit": (100, 0),
    "analysis.calib_windows": (1, 4), "analysis.calib_seq_len": (128, 512), "analysis.fisher_windows": (8, 32),
    "analysis.max_probes": (6, 50), "analysis.power_iters": (4, 20),
    "analysis.eval_tokens": (512, 16384), "analysis.eval_seq_len": (512, 2048),
}

# Numbers above these are refused: they would only hang or overflow (a 10^20-step PGD).
_INT_MAX = 10 ** 9


@functools.lru_cache(maxsize=None)
def hints_of(cls: type) -> dict:
    """A config class's resolved field types, computed once (validation runs on every evaluation)."""
    return typing.get_type_hints(cls)


def knob(default, help: str, *, flag: Optional[str] = None, choices=None, bounds: Optional[str] = None,
         cli: bool = True, results: bool = True, parse=None, many: bool = False, context: bool = False,
         shown: Optional[str] = None):
    """A config field with its help, flag and check. ``bounds`` is ">=1", ">0" or an interval such
    as "[0,1)"; ``parse`` turns the flag's text into the value; ``many`` makes a repeatable flag;
    ``context`` marks a window length, clamped to the model's context length; ``shown`` is the
    default as --help words it, where the value alone would not say it."""
    meta = dict(help=help, flag=flag, choices=choices, bounds=bounds, cli=cli, results=results, parse=parse,
                many=many, context=context, shown=shown)
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable default")
    return field(default=default, metadata=meta)


def _check_bounds(value, bounds: str) -> bool:
    if bounds.startswith(">="):
        return value >= float(bounds[2:])
    if bounds.startswith(">"):
        return value > float(bounds[1:])
    m = re.fullmatch(r"([\[(])([^,]+),([^\])]+)([\])])", bounds)
    lo, hi = float(m.group(2)), float(m.group(3))
    return (value >= lo if m.group(1) == "[" else value > lo) and (value <= hi if m.group(4) == "]" else value < hi)


class StepConfig:
    """Mixin of every step config: budget resolution, validation, fingerprints, JSON round trip."""

    step: ClassVar[str] = ""
    prefix: ClassVar[str] = ""  # default flag prefix of this config's fields

    def resolved(self, gpu: bool):
        """A copy whose unset budgets take the CPU (``gpu=False``) or GPU value."""
        fill = {f.name: BUDGETS[f"{self.step}.{f.name}"][int(gpu)] for f in fields(self)
                if getattr(self, f.name) is None and f"{self.step}.{f.name}" in BUDGETS}
        return dataclasses.replace(self, **fill)

    def for_model(self, model):
        """Resolved for the model's device, window lengths clamped to its context (with a
        warning; results record the clamped value), and validated: what every step runs with."""
        cfg = self.resolved(LM.is_cuda_model(model))
        ctx = LM.context_length(model)
        clamp = {f.name: ctx for f in fields(cfg) if f.metadata.get("context") and ctx
                 and isinstance(getattr(cfg, f.name), int) and getattr(cfg, f.name) > ctx}
        for name in clamp:
            log.warning("%s: %s=%d exceeds the model's context of %d positions; using %d",
                        flag_of(type(cfg), next(f for f in fields(cfg) if f.name == name)), name,
                        getattr(cfg, name), ctx, ctx)
        cfg = dataclasses.replace(cfg, **clamp)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise UserError naming the flag of the first field out of range."""
        hints = hints_of(type(self))
        for f in fields(self):
            v, m, name = getattr(self, f.name), f.metadata, flag_of(type(self), f)
            items = v if isinstance(v, tuple) and m.get("bounds") else (v,)
            for x in items:
                if isinstance(x, bool) or x is None:
                    continue
                if isinstance(x, (int, float)):
                    if isinstance(x, float) and not math.isfinite(x):
                        raise UserError(f"{name} must be a finite number, got {x}")
                    if abs(x) > _INT_MAX and hints[f.name] in (int, Optional[int]):
                        raise UserError(f"{name} must be at most {_INT_MAX}, got {x}")
                    if m.get("bounds") and not _check_bounds(x, m["bounds"]):
                        raise UserError(f"{name} must be {m['bounds']}, got {x}")
            if m.get("choices") and v is not None and v not in m["choices"]:
                raise UserError(f"{name} must be one of {', '.join(map(str, m['choices']))}, not {v!r}")
            # A blank text means nothing wherever the default is not blank (prompts, targets, names).
            texts = [v] if isinstance(v, str) else [x for x in v if isinstance(x, str)] if isinstance(v, tuple) else []
            if f.default != "" and any(not t.strip() for t in texts):
                raise UserError(f"{name} must not be empty")
        self.check()

    def check(self) -> None:
        """Rules across fields; subclasses override."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """Inverse of ``to_dict`` after a JSON round trip (lists back to tuples; unknown keys ignored)."""
        hints = hints_of(cls)
        kw = {}
        for f in fields(cls):
            if f.name in d:
                v = d[f.name]
                if isinstance(v, list) and "tuple" in str(hints[f.name]):
                    v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
                kw[f.name] = v
        return cls(**kw)

    def fingerprint_dict(self) -> dict:
        """The fields that can change a number (``results=True``), for the resume fingerprint."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("results", True)}


def fingerprint(*parts) -> str:
    """Stable 16-hex hash of JSON-able parts."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- parsers of flag text


def _parse_list(text: str, kind: type, what: str) -> tuple:
    try:
        out = tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"a comma list of {what}")
    if not out:
        raise ValueError(f"a non-empty comma list of {what}")
    return out


def parse_floats(text: str) -> tuple:
    return _parse_list(text, float, "numbers")


def parse_ints(text: str) -> tuple:
    return _parse_list(text, int, "integers")


def parse_protect(text: str):
    """'auto', or 'module:row:col,...' -> ((module, row, col), ...)."""
    if text == "auto":
        return "auto"
    out = []
    for item in text.split(","):
        parts = item.strip().rsplit(":", 2)
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2].isdigit():
            raise ValueError(f"'auto' or a comma list of module:row:col (item {item!r} is not module:row:col)")
        out.append((parts[0], int(parts[1]), int(parts[2])))
    return tuple(out)


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


def parse_max_memory(text: str) -> dict:
    out = {}
    for item in text.split(","):
        key, _, val = item.partition("=")
        if not val.strip() or not key.strip():
            raise ValueError(f"DEVICE=SIZE items such as '0=20GiB,cpu=64GiB' (item {item!r} is not DEVICE=SIZE)")
        out[int(key) if key.strip().isdigit() else key.strip()] = val.strip()
    return out


# --------------------------------------------------------------------------- the configs


@dataclass
class RunConfig(StepConfig):
    """What the whole run shares: model, data, device, output and seed."""

    step: ClassVar[str] = "run"
    steps: tuple = knob((), f"comma list from {','.join(ALL_STEPS)}", parse=parse_steps, shown="every step")
    output_dir: str = knob("data", "results, checkpoints, plots and report", results=False)
    seed: int = knob(0, "seed of every step (recorded in results.json)", bounds="[0,4294967295]")
    log_level: str = knob("INFO", "logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), results=False)
    budget: str = knob("auto", "default budgets of every step: the CPU or GPU column of BUDGETS (auto: by device)",
                       choices=("auto", "cpu", "gpu"))
    report_only: bool = knob(False, "rebuild plots and report from <output-dir>/results.json, without a model",
                             results=False)
    compare: tuple = knob((), "compare finished runs: one table and one plot across their results.json, written "
                              "into --output-dir (no model is loaded)", many="+", results=False, shown="none")
    model: Optional[str] = knob(None, "hub id, save_pretrained directory or .gguf file",
                                shown="the embedded SmolLM2-135M-Instruct, GGUF Q4_1")
    device: str = knob("auto", "auto|cpu|cuda|cuda:N")
    dtype: str = knob("auto", "weights dtype (auto: bf16 on CUDA, fp32 on CPU)",
                      choices=("auto", "float32", "bfloat16", "float16"))
    device_map: Optional[str] = knob(None, "'auto' shards the model over all GPUs (accelerate)",
                                     choices=("auto", "balanced", "balanced_low_0", "sequential"),
                                     shown="the whole model on --device")
    max_memory: Optional[dict] = knob(None, "per-device cap with --device-map, e.g. '0=20GiB,1=20GiB,cpu=64GiB'",
                                      parse=parse_max_memory, shown="no cap")
    trust_remote_code: bool = knob(False, "allow model code from the hub (off by default)")
    cache_dir: Optional[str] = knob(None, "where dequantized GGUF models are cached", results=False,
                                    shown="data/cache")
    dataset: Optional[str] = knob(None, "evaluation text: wikitext2, c4, ptb (the pruning papers' loaders), "
                                        "embedded, or a file/folder; a corpus named explicitly never falls back",
                                  shown="wikitext2, or the embedded corpus when offline and not cached")
    train_dataset: Optional[str] = knob(None, "calibration / fine-tuning text, same choices",
                                        shown="as --dataset")
    no_fallback: bool = knob(False, "never replace an unavailable wikitext2 by the embedded corpus")
    save_variants: bool = knob(False, "store full copies of the pruned and noisy weights (default: a 1-bit mask "
                                      "for pruning that only zeroes weights, and the noise recipe, regenerated bit "
                                      "for bit)", results=False)
    allow_overlap: bool = knob(False, "run even when the calibration / fine-tuning text shares paragraphs with "
                                      "the evaluation text (refused by default: it inflates every score)",
                               results=False)


@dataclass
class FinetuneConfig(StepConfig):
    step: ClassVar[str] = "finetune"
    prefix: ClassVar[str] = "ft-"
    mode: str = knob("auto", "full|lora|none (auto: full below 1.5B parameters, else LoRA)", flag="--finetune",
                     choices=("auto", "full", "lora", "none"))
    steps: Optional[int] = knob(None, "optimizer steps", bounds="[1,10000000]")
    batch_size: Optional[int] = knob(None, "windows per step", bounds="[1,65536]")
    seq_len: Optional[int] = knob(None, "tokens per window", bounds="[2,1000000]", context=True)
    lr: Optional[float] = knob(None, "peak learning rate (auto: 5e-5 full, 2e-4 LoRA)", flag="--lr", bounds="(0,1]")
    warmup_steps: int = knob(2, "linear warm-up steps, then cosine decay to 10%", bounds="[0,10000000]")
    weight_decay: float = knob(0.0, "AdamW weight decay", bounds="[0,10]")
    grad_clip: float = knob(1.0, "gradient-norm clip (0: none)", bounds="[0,1000000]")
    holdout_fraction: float = knob(0.1, "tail of the training text held out for the before/after loss",
                                   bounds="(0,1)")
    holdout_windows: int = knob(8, "held-out windows evaluated before and after", bounds="[1,1000000]")
    save_every: int = knob(0, "resume checkpoint every N steps (0: by time only)", bounds="[0,10000000]", results=False)
    save_every_s: float = knob(300.0, "... and at most this often in seconds (0: never by time)", bounds="[0,10000000]",
                               results=False)
    log_every: int = knob(25, "steps between host syncs for the loss log", bounds="[1,10000000]", results=False)
    log_to: str = knob("none", "also write the training curves (loss and learning rate per step) as TensorBoard "
                               "events into <output-dir>/tensorboard", flag="--log-to", choices=("none", "tensorboard"),
                       results=False)
    lora_r: int = knob(16, "LoRA rank", flag="--lora-r", bounds="[1,65536]")
    lora_alpha: int = knob(32, "LoRA alpha", flag="--lora-alpha", bounds="[1,65536]")
    lora_merge: str = knob("fp32", "how a bf16/fp16 model takes its LoRA update: fp32 merges exactly and holds the "
                                   "fine-tuned model in float32; native merges into the model's dtype (rounds most "
                                   "of a small update away)", flag="--lora-merge", choices=("fp32", "native"))
    gradient_checkpointing: Optional[bool] = knob(None, "recompute activations (auto: only when they would not fit)",
                                                  results=False)
    compile: bool = knob(False, "torch.compile the model for the training loop")
    max_shard_size: str = knob("2GB", "safetensors shard size of the saved model", flag="--max-shard-size",
                               results=False)
    quant_format: str = knob("dequantized", "the quantized variant's export: dequantized weights (plain "
                                            "safetensors), or compressed-tensors (naive-quantized: integer codes, "
                                            "scales and zero points, which transformers and vLLM read; needs the "
                                            "compressed-tensors package)", flag="--export-quant-format",
                             choices=("dequantized", "compressed-tensors"))
    seed: int = knob(0, "seed", flag="--seed", bounds="[0,4294967295]")
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


def _check_pattern(pattern: str) -> None:
    if pattern == "unstructured":
        return
    m = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not m:
        raise UserError(f"--sparsity-pattern must be 'unstructured' or N:M like 2:4, got {pattern!r}")
    if not 0 < int(m.group(1)) < int(m.group(2)) <= 1024:
        raise UserError(f"--sparsity-pattern {pattern}: need 0 < N < M <= 1024")


@dataclass
class PruneConfig(StepConfig):
    step: ClassVar[str] = "prune"
    prefix: ClassVar[str] = "prune-"
    method: str = knob("wanda", "pruning score", choices=PRUNE_METHODS)
    sparsity: float = knob(0.5, "fraction of weights removed, in [0, 1); N:M patterns fix it at 1 - N/M",
                           flag="--sparsity", bounds="[0,1)")
    pattern: str = knob("unstructured", "unstructured, or N:M: keep N of every M consecutive input weights of "
                                        "a row (2:4, 4:8)", flag="--sparsity-pattern")
    blocksize: int = knob(128, "SparseGPT column block", flag="--sparsegpt-blocksize", bounds="[1,65536]")
    percdamp: float = knob(0.01, "SparseGPT dampening, fraction of mean diag(H)", flag="--sparsegpt-percdamp",
                           bounds="[0,10]")
    taylor_score: str = knob("taylor", "score of --prune-method taylor: |g w| (taylor) or 0.5 F w^2 (fisher)",
                             flag="--taylor-score", choices=("taylor", "fisher"))
    protect: typing.Union[str, tuple] = knob(
        (), "'auto' (detect super weights first) or module:row:col,...; kept out of the pruning mask and the "
            "noise", flag="--protect-super-weights", parse=parse_protect)
    calib_samples: Optional[int] = knob(None, "calibration windows", flag="--calib-samples", bounds="[1,1000000]")
    calib_seq_len: Optional[int] = knob(None, "tokens per calibration window", flag="--calib-seq-len",
                                        bounds="[2,1000000]", context=True)
    super_weight_prompt: str = knob(SUPER_WEIGHT_PROMPT, "prompt of the super-weight detector",
                                    flag="--super-weight-prompt")
    allocation: str = knob("uniform", "per-layer sparsity: uniform, owl (Yin et al. 2024: layers with more "
                                      "activation outliers keep more), or ours, hessian / fisher (more curvature per "
                                      "weight keeps more); non-uniform ones stay within target +- 2 x --owl-lambda and "
                                      "prune exactly the target overall", flag="--sparsity-allocation",
                           choices=("uniform", "owl", "hessian", "fisher"))
    owl_m: float = knob(5.0, "OWL's M: a Wanda score above M x its layer's mean is an outlier (5 in the OWL "
                             "paper's LLaMA runs; its code's argparse default is 3)", flag="--owl-m", bounds="(0,1000]")
    owl_lambda: float = knob(0.08, "OWL's lambda: layer sparsities span 2 lambda around the target (all "
                                   "non-uniform allocations)", flag="--owl-lambda", bounds="[0,0.5]")
    allocation_windows: Optional[int] = knob(None, "calibration windows of the hessian / fisher allocation",
                                             bounds="[1,1000000]")
    allocation_probes: int = knob(8, "Hutchinson probes of the hessian allocation", bounds="[1,100000]")
    seed: int = knob(0, "seed", flag="--seed", bounds="[0,4294967295]")
    progress: bool = knob(True, "progress bars", cli=False, results=False)

    def check(self) -> None:
        _check_pattern(self.pattern)
        if self.allocation != "uniform" and self.pattern != "unstructured":
            raise UserError(f"--sparsity-allocation {self.allocation} needs --sparsity-pattern unstructured: "
                            f"{self.pattern} fixes every layer at the same sparsity")


NOISE_MODES = ("absolute", "relative", "multiplicative", "bitflip")


@dataclass
class NoiseConfig(StepConfig):
    step: ClassVar[str] = "noise"
    prefix: ClassVar[str] = "noise-"
    mode: str = knob("absolute", "noise of the noisy variant", choices=NOISE_MODES)
    epsilon: float = knob(0.05, "noise scale (bit-error rate for bitflip)", flag="--epsilon", bounds="[0,100]")
    group: str = knob("all", "all|linears|layer:N|module:NAME|embeddings|norms")
    seed: int = knob(0, "seed", flag="--seed", bounds="[0,4294967295]")
    bitflip_format: str = knob("bfloat16", "16-bit view of fp32 weights for bit flips",
                               choices=("bfloat16", "float16"))
    sweep_mode: str = knob("relative", "noise mode of the eps sweep", flag="--sweep-mode", choices=NOISE_MODES)
    sweep_group: str = knob("linears", "parameter group of the sweep", flag="--sweep-group")
    sweep_eps: tuple = knob((0.02, 0.05, 0.1, 0.2, 0.5), "eps of the sweep", flag="--sweep-eps",
                            parse=parse_floats, bounds="[0,100]")
    sweep_seeds: int = knob(3, "seeds per eps", flag="--sweep-seeds", bounds="[1,10000]")
    sweep_tokens: Optional[int] = knob(None, "evaluation tokens per sweep point", flag="--sweep-tokens",
                                       bounds="[2,1000000000]")
    sweep_seq_len: Optional[int] = knob(None, "tokens per sweep window (at most --sweep-tokens)",
                                        flag="--sweep-seq-len", bounds="[2,1000000]", context=True)
    protect_fraction: float = knob(0.005, "top fraction of weights by Fisher saliency kept clean in the "
                                          "protected sweep (0: no protected sweep)", flag="--protect-fraction",
                                   bounds="[0,1)")
    protect_score: str = knob("noise", "ranking of the protected weights: the expected loss increase under "
                                       "the sweep's noise, F sigma^2 (noise), or OBD's w^2 F (obd)",
                              flag="--protect-score", choices=("noise", "obd"))
    fisher_windows: Optional[int] = knob(None, "calibration windows of that Fisher saliency",
                                         flag="--noise-fisher-windows", bounds="[1,1000000]")
    fisher_seq_len: Optional[int] = knob(None, "tokens per Fisher window", flag="--noise-fisher-seq-len",
                                         bounds="[2,1000000]", context=True)
    protect: typing.Union[str, tuple] = knob((), "see --protect-super-weights", flag="--protect-super-weights",
                                             parse=parse_protect)
    super_weight_prompt: str = knob(SUPER_WEIGHT_PROMPT, "prompt of the super-weight detector",
                                    flag="--super-weight-prompt")
    map: Optional[bool] = knob(None, "layer x module sensitivity map (costs layers x 7 evaluations)",
                               flag="--noise-map")
    map_eps: float = knob(0.1, "relative noise of each map cell", flag="--map-eps", bounds="[0,100]")
    map_tokens: Optional[int] = knob(None, "evaluation tokens per map cell", flag="--map-tokens",
                                     bounds="[2,1000000000]")
    batch_size: Optional[int] = knob(None, "evaluation windows per forward pass (auto: from free memory "
                                           "on GPU, 1 on CPU)", flag="--batch-size", bounds="[1,65536]")
    progress: bool = knob(True, "progress bars", cli=False, results=False)

    def check(self) -> None:
        for e in (self.epsilon, *self.sweep_eps) if self.mode == "bitflip" else ():
            if e > 1:
                raise UserError(f"a bit-error rate is at most 1, got {e}")
        if self.sweep_mode == "bitflip" and any(e > 1 for e in self.sweep_eps):
            raise UserError(f"a bit-error rate is at most 1, got --sweep-eps {self.sweep_eps}")


@dataclass
class QuantizeConfig(StepConfig):
    """The ``quantized`` variant: RTN or GPTQ, uniform or sensitivity-guided mixed precision."""

    step: ClassVar[str] = "quantize"
    prefix: ClassVar[str] = "quant-"
    method: str = knob("none", "none (no quantized variant), rtn or gptq", choices=("none", "rtn", "gptq"))
    wbits: int = knob(4, "bits per weight (the uniform choice)", flag="--wbits", bounds="[2,8]")
    group: int = knob(128, "RTN group size (input columns)", flag="--quant-group", bounds="[1,1000000]")
    act_order: bool = knob(False, "GPTQ: quantize columns by decreasing H_jj (act order)", flag="--act-order")
    percdamp: float = knob(0.01, "GPTQ dampening, fraction of mean diag(H)", flag="--gptq-percdamp", bounds="[0,10]")
    blocksize: int = knob(128, "GPTQ column block", flag="--gptq-blocksize", bounds="[1,65536]")
    protect: typing.Union[str, tuple] = knob((), "see --protect-super-weights (kept in full precision)",
                                             flag="--protect-super-weights", parse=parse_protect)
    keep_fraction: float = knob(0.0, "top fraction of weights by OBD saliency 0.5 F w^2 also kept in full precision",
                                bounds="[0,1)")
    bit_allocation: str = knob("uniform", "bits per linear: uniform (--wbits), or from {2,3,4,8} by Hessian / Fisher "
                                          "sensitivity under --avg-bits (HAWQ-style, greedy)",
                               flag="--bit-allocation", choices=("uniform", "hessian", "fisher"))
    avg_bits: Optional[float] = knob(None, "average code bits per weight of the mixed precision", flag="--avg-bits",
                                     bounds="[2,8]", shown="--wbits")
    sensitivity_windows: Optional[int] = knob(None, "calibration windows of the sensitivities and saliency",
                                              bounds="[1,1000000]")
    sensitivity_probes: int = knob(8, "Hutchinson probes of --bit-allocation hessian", bounds="[1,100000]")
    calib_samples: Optional[int] = knob(None, "calibration windows", flag="--calib-samples", bounds="[1,1000000]")
    calib_seq_len: Optional[int] = knob(None, "tokens per calibration window", flag="--calib-seq-len",
                                        bounds="[2,1000000]", context=True)
    super_weight_prompt: str = knob(SUPER_WEIGHT_PROMPT, "prompt of the super-weight detector",
                                    flag="--super-weight-prompt")
    seed: int = knob(0, "seed", flag="--seed", bounds="[0,4294967295]")
    progress: bool = knob(True, "progress bars", cli=False, results=False)


@dataclass
class EvalConfig(StepConfig):
    step: ClassVar[str] = "eval"
    seq_len: Optional[int] = knob(None, "tokens per window", flag="--seq-len", bounds="[2,1000000]", context=True)
    stride: Optional[int] = knob(None, "sliding-window stride (auto: --seq-len, disjoint windows)",
                                 flag="--stride", bounds="[1,1000000]")
    eval_tokens: Optional[int] = knob(None, "evaluate the first N tokens; 0 means all", flag="--eval-tokens",
                                      bounds="[0,1000000000]")
    batch_size: Optional[int] = knob(None, "evaluation windows per forward pass (auto: from free memory "
                                           "on GPU, 1 on CPU)", flag="--batch-size", bounds="[1,65536]")
    prompts: tuple = knob((SAMPLE_PROMPT,), "sample prompt (repeat the flag for several)", flag="--prompt",
                          many=True)
    max_new_tokens: int = knob(48, "greedy answer length per prompt (0: none)", flag="--max-new-tokens",
                               bounds="[0,4096]")
    kl: bool = knob(False, "also report KL and top-1 agreement of each variant against its parent", flag="--kl")
    progress: bool = knob(True, "progress bars", cli=False, results=False)

    def check(self) -> None:
        if self.stride is not None and self.seq_len is not None and self.stride > self.seq_len:
            raise UserError(f"--stride must be between 1 and --seq-len ({self.seq_len}), got {self.stride}")


def parse_names(text: str) -> tuple:
    return _parse_list(text, str, "names")


@dataclass
class ZeroShotConfig(StepConfig):
    """Zero-shot accuracy of every variant through lm-evaluation-harness (``lm_eval``)."""

    step: ClassVar[str] = "zeroshot"
    enabled: Optional[bool] = knob(None, "zero-shot accuracy of every variant through lm-evaluation-harness "
                                         "(auto: on GPU, or when --tasks is given)", flag="--zeroshot")
    tasks: tuple = knob(ZEROSHOT_TASKS, "lm-eval task names or task YAML paths", flag="--tasks",
                        parse=parse_names)
    include_path: Optional[str] = knob(None, "folder of extra lm-eval task YAMLs (local tasks)",
                                       flag="--tasks-include", shown="none")
    limit: Optional[int] = knob(None, "examples per task, the first N (0: all; a CPU budget, not the papers' "
                                      "protocol)", flag="--tasks-limit", bounds="[0,1000000000]")
    num_fewshot: int = knob(0, "in-context examples per question (0: zero-shot, as the papers)",
                            flag="--num-fewshot", bounds="[0,1000]")
    batch_size: Optional[int] = knob(None, "evaluation windows per forward pass (auto: from free memory "
                                           "on GPU, 1 on CPU)", flag="--batch-size", bounds="[1,65536]")
    progress: bool = knob(True, "progress bars", cli=False, results=False)
    trust_remote_code: bool = knob(False, "allow local task YAMLs that run Python (!function); set by the "
                                          "pipeline from --trust-remote-code", cli=False, results=False)

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
        files, _ = local_task_files(self.tasks, self.include_path)
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
        _, code = local_task_files(self.tasks, self.include_path)
        if code and not self.trust_remote_code:
            raise UserError(f"zero-shot task {code[0]} runs Python code of its own (!function), which lm-eval would "
                            "import and run; pass --trust-remote-code if you trust it")


_YAML_SUFFIXES = (".yaml", ".yml")


def _lm_eval_tasks_dir() -> Optional[str]:
    """lm-eval's own installed task folder (its tasks' code ships with the library), found
    without importing lm_eval (seconds)."""
    spec = importlib.util.find_spec("lm_eval")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return os.path.realpath(os.path.join(locations[0], "tasks")) if locations else None


def _regular(path: str, what: str) -> bool:
    """Whether ``path`` is a regular file (links followed). A task YAML that is not (a FIFO would
    hang lm-eval, a dangling link fails inside it) is refused; other entries are skipped."""
    try:
        ok = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        ok = False
    if not ok and path.endswith(_YAML_SUFFIXES):
        raise UserError(f"{what}: {path} is not a regular file (a dangling link, a FIFO or a device); remove it")
    if not ok:
        log.warning("%s: skipping %s, which is not a regular file", what, path)
    return ok


class _TaskYamlLoader(yaml.SafeLoader):
    """lm-eval's task YAML, read as data: a tag such as ``!function utils.process_docs`` becomes
    the text "!function utils.process_docs" (nothing is imported)."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, tag, node: f"!{tag} {loader.construct_scalar(node)}"
                                      if isinstance(node, yaml.ScalarNode) else f"!{tag}")


def local_task_files(tasks: tuple, include_path: Optional[str]) -> tuple[list, list]:
    """(every local file the zero-shot tasks read, sorted: the YAMLs in ``include_path`` and those
    named by path, with every file or folder a YAML names (data files, included YAMLs, the Python
    module of a ``!function``); the YAMLs among them that run Python code). lm-eval's own task
    folder is left out: its files come with the library and its version is recorded."""
    own = _lm_eval_tasks_dir()
    files, code, queue = set(), [], []
    folder = os.path.expanduser(include_path or "")
    if folder and os.path.isdir(folder):
        for root, dirs, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                if _regular(path, "--tasks-include"):
                    files.add(path)
                    queue += [path] if name.endswith(_YAML_SUFFIXES) else []
    for t in tasks:
        path = os.path.expanduser(t)
        if (t.endswith(_YAML_SUFFIXES) or os.sep in t) and os.path.lexists(path) and _regular(path, "--tasks"):
            files.add(path)
            queue.append(path)
    seen = set()
    while queue:
        path = queue.pop()
        real = os.path.realpath(path)
        if real in seen or (own and real.startswith(own + os.sep)):
            continue
        seen.add(real)
        with open(path, "rb") as f:
            text = f.read(IO.MAX_JSON_BYTES).decode("utf-8", "replace")
        if re.search(r"!function\b", text):
            code.append(path)
        try:
            doc = yaml.load(text, Loader=_TaskYamlLoader)
        except yaml.YAMLError:
            continue  # lm-eval reports it when it loads the task
        for value in _strings(doc):
            if value.startswith("!function "):  # module.function, the module beside the YAML
                value = value.split(" ", 1)[1].rsplit(".", 1)[0].replace(".", os.sep) + ".py"
            ref = os.path.join(os.path.dirname(path), os.path.expanduser(value))
            if len(value) > 4096 or "\n" in value or value.strip() in ("", ".", "..") or not os.path.lexists(ref):
                continue
            refs = [os.path.join(r, n) for r, _, ns in os.walk(ref) for n in ns] if os.path.isdir(ref) else [ref]
            for r in refs:
                if r not in files and _regular(r, f"zero-shot task {path}"):
                    files.add(r)
                    queue += [r] if r.endswith(_YAML_SUFFIXES) else []
    return sorted(files), sorted(code)


def _strings(doc) -> list:
    """Every string value in a parsed YAML document, nested ones included."""
    if isinstance(doc, str):
        return [doc]
    if isinstance(doc, dict):
        return [s for v in doc.values() for s in _strings(v)]
    if isinstance(doc, list):
        return [s for v in doc for s in _strings(v)]
    return []


@dataclass
class ExportConfig(StepConfig):
    """Every variant as a loadable ``save_pretrained`` directory with a model card."""

    step: ClassVar[str] = "export"
    enabled: bool = knob(False, "write every variant as a save_pretrained directory (safetensors) with a model "
                                "card, into <output-dir>/export/<variant>", flag="--export")
    two_of_four: bool = knob(False, "on CUDA, also convert the 2:4-pruned linears to PyTorch's semi-structured "
                                    "sparse format and measure forward tokens/s against dense (implies --export)",
                             flag="--export-2of4")
    speed_batches: tuple = knob((1, 16), "batch sizes of the 2:4 speed measurement", flag="--speed-batches",
                                parse=parse_ints, bounds="[1,65536]")
    speed_seq_len: int = knob(128, "tokens per sequence of the 2:4 speed measurement", flag="--speed-seq-len",
                              bounds="[1,1000000]", context=True)
    max_shard_size: str = knob("2GB", "safetensors shard size of the saved model", flag="--max-shard-size",
                               results=False)
    quant_format: str = knob("dequantized", "the quantized variant's export: dequantized weights (plain "
                                            "safetensors), or compressed-tensors (naive-quantized: integer codes, "
                                            "scales and zero points, which transformers and vLLM read; needs the "
                                            "compressed-tensors package)", flag="--export-quant-format",
                             choices=("dequantized", "compressed-tensors"))
    command: str = knob("", "command line written into the model cards (set by the pipeline)", cli=False,
                        results=False)

    def check(self) -> None:
        _check_shard_size(self.max_shard_size)


@dataclass
class AdversarialConfig(StepConfig):
    step: ClassVar[str] = "adversarial"
    prefix: ClassVar[str] = "attack-"
    epsilons: tuple = knob((0.02, 0.05, 0.1), "eps of FGSM/PGD, relative to the mean embedding-row norm",
                           flag="--attack-eps", parse=parse_floats, bounds="[0,1000]")
    norm: str = knob("linf", "l2 is per token", flag="--attack-norm", choices=("linf", "l2"))
    pgd_steps: Optional[int] = knob(None, "PGD steps", flag="--attack-steps", bounds="[1,100000]")
    n_windows: Optional[int] = knob(None, "text windows attacked", flag="--attack-windows", bounds="[1,1000000]")
    prompt_len: Optional[int] = knob(None, "tokens of each attacked prompt", bounds="[1,1000000]")
    continuation_len: Optional[int] = knob(None, "tokens of each scored continuation", bounds="[1,1000000]")
    prompts: tuple = knob((SAMPLE_PROMPT,), "sample prompt (repeat the flag for several)", flag="--prompt",
                          many=True)
    target: str = knob(" Star Wars", "target string of the targeted attacks and GCG", flag="--attack-target")
    targeted_eps: float = knob(0.2, "eps of the targeted PGD", flag="--targeted-eps", bounds="[0,1000]")
    targeted_steps: Optional[int] = knob(None, "steps of the targeted PGD", flag="--targeted-steps",
                                         bounds="[1,100000]")
    gcg_steps: Optional[int] = knob(None, "GCG iterations", flag="--gcg-steps", bounds="[1,100000]")
    gcg_batch: Optional[int] = knob(None, "GCG candidates per step", flag="--gcg-batch", bounds="[1,65536]")
    gcg_topk: Optional[int] = knob(None, "GCG top-k tokens per position", flag="--gcg-topk", bounds="[1,1000000]")
    gcg_suffix_len: Optional[int] = knob(None, "GCG suffix tokens", flag="--gcg-suffix-len", bounds="[1,1000]")
    filter_prompts: int = knob(50, "clean prompts that calibrate the perplexity filter, and as many held out "
                                   "for its false-positive rate", flag="--filter-prompts", bounds="[2,100000]")
    defence: Optional[str] = knob(None, "adversarial-training defence: free (Free-AT, Shafahi et al. 2019: one "
                                        "forward+backward per step gives the weight and the perturbation "
                                        "gradients), pgd (Madry et al. 2018: a full PGD attack per step), none",
                                  flag="--defence", choices=("free", "pgd", "none"))
    defence_steps: Optional[int] = knob(None, "adversarial fine-tuning steps (weight updates)",
                                        flag="--defence-steps", bounds="[1,100000]")
    defence_lr: float = knob(1e-5, "adversarial fine-tuning learning rate", flag="--defence-lr", bounds="(0,1]")
    defence_lora_r: Optional[int] = knob(None, "LoRA rank of the defence (auto: 16 above 1.5B parameters, "
                                               "else all weights; 0: all weights)", flag="--defence-lora-r",
                                         bounds="[0,65536]")
    max_new_tokens: int = knob(48, "greedy answer length per prompt (0: none)", flag="--max-new-tokens",
                               bounds="[0,4096]")
    seed: int = knob(0, "seed", flag="--seed", bounds="[0,4294967295]")
    progress: bool = knob(True, "progress bars", cli=False, results=False)


@dataclass
class AnalysisConfig(StepConfig):
    step: ClassVar[str] = "analysis"
    prefix: ClassVar[str] = "analysis-"
    calib_windows: Optional[int] = knob(None, "windows in the Hessian loss", flag="--analysis-windows",
                                        bounds="[1,100000]")
    calib_seq_len: Optional[int] = knob(None, "tokens per Hessian window", flag="--analysis-seq-len",
                                        bounds="[2,1000000]", context=True)
    fisher_windows: Optional[int] = knob(None, "windows of the Fisher diagonal", bounds="[1,100000]")
    max_probes: Optional[int] = knob(None, "max Hutchinson probes (stops earlier on --hessian-tol)",
                                     flag="--hessian-probes", bounds="[1,100000]")
    rel_stderr: float = knob(0.1, "Hutchinson probes until every layer's trace has a standard error of at most "
                                  "this fraction of its magnitude (0: PyHessian's --hessian-tol rule)",
                             flag="--hessian-rel-stderr", bounds="[0,10]")
    tol: float = knob(1e-2, "with --hessian-rel-stderr 0: relative change of the total trace that stops "
                            "Hutchinson", flag="--hessian-tol", bounds="[0,10]")
    power_iters: Optional[int] = knob(None, "power iterations for the top eigenvalue", flag="--power-iters",
                                      bounds="[1,100000]")
    per_block: Optional[bool] = knob(None, "Hessian one block at a time (auto: above 3B parameters)",
                                     flag="--per-block")
    saliency: str = knob("fisher", "the H_ii of OBD saliency 0.5 H_ii w^2", flag="--saliency",
                         choices=("fisher", "hutchinson"))
    super_weight_prompt: str = knob(SUPER_WEIGHT_PROMPT, "prompt of the super-weight detector",
                                    flag="--super-weight-prompt")
    max_super_weights: int = knob(4, "super-weight candidates searched", flag="--max-super-weights",
                                  bounds="[1,1000]")
    super_weight_min_ratio: float = knob(1.5, "a candidate is accepted as a super weight when zeroing it alone "
                                              "multiplies perplexity by at least this", flag="--super-weight-min-ratio",
                                         bounds="[1,1000000]")
    quant_bits: tuple = knob((4, 3), "RTN bit widths", flag="--quant-bits", parse=parse_ints, bounds="[2,8]")
    quant_group: int = knob(128, "RTN group size (input columns)", flag="--quant-group", bounds="[1,1000000]")
    quant_top_fraction: float = knob(0.0005, "fraction of weights kept in full precision by the guided "
                                             "quantization", flag="--quant-top-fraction", bounds="[0,1)")
    eval_tokens: Optional[int] = knob(None, "evaluation tokens of ablations and quantization", bounds="[2,1000000000]")
    eval_seq_len: Optional[int] = knob(None, "tokens per evaluation window (at most --analysis-eval-tokens)",
                                       bounds="[2,1000000]", context=True)
    batch_size: Optional[int] = knob(None, "evaluation windows per forward pass (auto: from free memory "
                                           "on GPU, 1 on CPU)", flag="--batch-size", bounds="[1,65536]")
    seed: int = knob(0, "seed", flag="--seed", bounds="[0,4294967295]")
    progress: bool = knob(True, "progress bars", cli=False, results=False)


STEP_CONFIGS: dict[str, type] = {"finetune": FinetuneConfig, "prune": PruneConfig, "noise": NoiseConfig,
                                 "quantize": QuantizeConfig, "eval": EvalConfig, "zeroshot": ZeroShotConfig,
                                 "export": ExportConfig, "adversarial": AdversarialConfig, "analysis": AnalysisConfig}


@dataclass
class PipelineConfig:
    """The whole run: ``run_pipeline(PipelineConfig(run=RunConfig(model=...), prune=PruneConfig(sparsity=0.6)))``."""

    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


# --------------------------------------------------------------------------- command line


def flag_of(cls: type, f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + (cls.prefix + f.name).replace("_", "-")


def _default_text(cls: type, f: dataclasses.Field) -> str:
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    key = f"{cls.step}.{f.name}"
    if key in BUDGETS:
        cpu, gpu = BUDGETS[key]
        show = lambda v: {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v
        return f"{show(cpu)} CPU, {show(gpu)} GPU"
    d = f.default
    if isinstance(d, bool) and hints_of(cls)[f.name] is bool:
        return ""
    if d is None:
        return "auto"
    if isinstance(d, tuple):
        return ",".join(map(str, d)) if d else "none"
    return str(d)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors raise UserError: one line, no usage block (the caller prints it)."""

    def error(self, message: str):
        raise UserError(message)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag per config field (shared flags once), grouped by step, real defaults in the help."""
    owners: dict[str, tuple] = {}
    for cls in (RunConfig, *STEP_CONFIGS.values()):
        group = parser.add_argument_group(cls.step if cls is RunConfig else f"step {cls.step}")
        hints = hints_of(cls)
        for f in fields(cls):
            if not f.metadata.get("cli", True):
                continue
            flag, m = flag_of(cls, f), f.metadata
            if flag in owners:
                if owners[flag] != (f.default, hints[f.name]):
                    raise TypeError(f"{flag}: configs that share it disagree on its default or type")
                continue
            owners[flag] = (f.default, hints[f.name])
            text = _default_text(cls, f)
            helptext = (m["help"] + (f" (default: {text})" if text else "")).replace("%", "%%")
            dest = flag[2:].replace("-", "_")
            if hints[f.name] is bool:
                group.add_argument(flag, dest=dest, action="store_true", default=None, help=helptext)
            elif m.get("many") == "+":  # one flag, several values: --compare A B C
                group.add_argument(flag, dest=dest, nargs="+", default=None, help=helptext)
            elif m.get("many"):
                group.add_argument(flag, dest=dest, action="append", default=None, help=helptext)
            elif hints[f.name] == Optional[bool]:
                group.add_argument(flag, dest=dest, choices=("on", "off", "auto"), default=None, help=helptext)
            else:
                group.add_argument(flag, dest=dest, default=None, choices=m.get("choices"), help=helptext,
                                   metavar=None if m.get("choices") else flag[2:].split("-")[-1].upper())
    return parser


def _convert(cls: type, f: dataclasses.Field, text):
    """Flag text -> field value; UserError naming the flag on bad text."""
    hint, m, flag = hints_of(cls)[f.name], f.metadata, flag_of(cls, f)
    if any(not str(t).strip() for t in (text if m.get("many") else [text])):
        raise UserError(f"{flag} must not be empty")  # an empty value never means anything here
    try:
        if m.get("many"):
            return tuple(text)
        if m.get("parse"):
            return m["parse"](text)
        if hint is bool:
            return bool(text)
        if hint == Optional[bool]:
            return {"on": True, "off": False, "auto": None}[text]
        if hint in (int, Optional[int]):
            return int(text)
        if hint in (float, Optional[float]):
            v = float(text)
            if not math.isfinite(v):
                raise ValueError("a finite number")
            return v
        return text
    except ValueError as e:
        kind = {int: "an integer", Optional[int]: "an integer", float: "a number", Optional[float]: "a number"}
        want = str(e) if m.get("parse") or "finite" in str(e) else kind.get(hint, "valid")
        raise UserError(f"{flag} must be {want}, got {text!r}")


def from_args(ns: argparse.Namespace) -> PipelineConfig:
    """The PipelineConfig of parsed flags: flags given override the dataclass defaults."""
    parts = {}
    for name, cls in {"run": RunConfig, **STEP_CONFIGS}.items():
        kw = {}
        for f in fields(cls):
            if f.metadata.get("cli", True):
                text = getattr(ns, flag_of(cls, f)[2:].replace("-", "_"))
                if text is not None:
                    kw[f.name] = _convert(cls, f, text)
        parts[name] = cls(**kw)
    return PipelineConfig(**parts)
