"""Orchestrator: load or fine-tune a causal LM, then prune, perturb, evaluate, attack, analyse.

    python llm_main_v4.py                       # every step on the embedded SmolLM2-135M
    python llm_main_v4.py --steps eval --dataset wiki.test.raw --seq-len 2048

Only this module parses argv. Each step lives in its own module, takes the model,
tokenizer and tensors, and returns a dataclass; this file wires them together and
writes ``results.json``, checkpoints, plots and ``report.md`` into ``--output-dir``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import llm_common as C
from llm_report import _fmt, make_plots, write_report

log = logging.getLogger("llm.main")

ALL_STEPS = ("finetune", "prune", "noise", "eval", "adversarial", "analysis")


def available_steps() -> list[str]:
    """Steps whose module exists in this checkout, in pipeline order."""
    return [s for s in ALL_STEPS if s in STEP_FUNCS]


# --------------------------------------------------------------------------- argv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm_main_v4.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--steps", default=None,
                   help=f"comma list from {','.join(ALL_STEPS)}; default: every step available")
    g.add_argument("--output-dir", default="data", help="results, checkpoints, plots and report")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-level", default="INFO")
    g.add_argument("--budget", default="auto", choices=("auto", "cpu", "gpu"),
                   help="default budgets of every step: the small CPU set or the GPU set (auto: by device)")
    g.add_argument("--report-only", action="store_true",
                   help="rebuild plots, report.md and report.html from <output-dir>/results.json, without a model")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="hub id, save_pretrained directory or .gguf file; default: embedded SmolLM2-135M-Instruct")
    g.add_argument("--device", default="auto", help="auto|cpu|cuda")
    g.add_argument("--dtype", default="auto", help="auto|float32|bfloat16|float16 (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--device-map", default=None, help="'auto' shards the model over all GPUs (accelerate)")
    g.add_argument("--max-memory", default=None,
                   help="per-device memory cap with --device-map, e.g. '0=20GiB,1=20GiB,cpu=64GiB'")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    g.add_argument("--cache-dir", default=None, help="where dequantized GGUF models are cached (default data/cache)")
    g = p.add_argument_group("data and evaluation")
    g.add_argument("--dataset", default="wikitext2", help="evaluation text: wikitext2, embedded, or a file/folder")
    g.add_argument("--train-dataset", default="wikitext2", help="calibration / fine-tuning text, same choices")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 2048 GPU, 1024 CPU)")
    g.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: seq-len, disjoint)")
    g.add_argument("--eval-tokens", type=int, default=None,
                   help="evaluate the first N tokens (default: all on GPU, 8192 on CPU); 0 means all")
    g.add_argument("--batch-size", type=int, default=None,
                   help="evaluation windows per forward pass (default: from free memory on GPU, 1 on CPU)")
    g.add_argument("--kl", action="store_true", help="also report KL and top-1 agreement against the unmodified model")
    g.add_argument("--prompt", action="append", default=None,
                   help=f"sample prompt (repeatable); default: {C.SAMPLE_PROMPT!r}")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g = p.add_argument_group("fine-tuning (step finetune)")
    g.add_argument("--finetune", default="auto",
                   help="full|lora|none|auto (auto: full below 1.5B parameters, else LoRA)")
    g.add_argument("--ft-steps", type=int, default=None, help="optimizer steps (default 16 CPU, 500 GPU)")
    g.add_argument("--ft-batch-size", type=int, default=None, help="windows per step (default 4 CPU, 8 GPU)")
    g.add_argument("--ft-seq-len", type=int, default=None, help="tokens per window (default 128 CPU, 1024 GPU)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-5 full, 2e-4 LoRA)")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--max-shard-size", default="2GB", help="safetensors shard size of the saved model")
    g = p.add_argument_group("pruning (step prune)")
    g.add_argument("--prune-method", default="wanda", help="magnitude|wanda|sparsegpt|taylor")
    g.add_argument("--sparsity", type=float, default=0.5, help="fraction removed, in [0, 1)")
    g.add_argument("--sparsity-pattern", default="unstructured", help="unstructured, or N:M such as 2:4, 4:8")
    g.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 8 CPU, 128 GPU)")
    g.add_argument("--calib-seq-len", type=int, default=None, help="tokens per window (default 512 CPU, 2048 GPU)")
    g.add_argument("--protect-super-weights", default=None,
                   help="'auto' (detect super weights first) or a comma list of module:row:col, "
                        "e.g. model.layers.2.mlp.down_proj:12:340; kept out of the pruning mask and the noise")
    g = p.add_argument_group("weight noise (step noise)")
    g.add_argument("--noise-mode", default="absolute", help="absolute|relative|multiplicative|bitflip")
    g.add_argument("--epsilon", type=float, default=0.05, help="noise scale (bit-error rate for bitflip)")
    g.add_argument("--noise-group", default="all",
                   help="all|linears|layer:N|module:NAME|embeddings|norms")
    g.add_argument("--sweep-mode", default="relative", help="noise mode of the eps sweep")
    g.add_argument("--sweep-eps", default="0.02,0.05,0.1,0.2,0.5", help="comma list of eps for the sweep")
    g.add_argument("--sweep-seeds", type=int, default=3, help="seeds per eps")
    g.add_argument("--sweep-tokens", type=int, default=None,
                   help="evaluation tokens per sweep point (default 512 CPU, 16384 GPU)")
    g.add_argument("--protect-fraction", type=float, default=0.005,
                   help="top fraction of weights by Fisher saliency kept clean in the protected sweep")
    g.add_argument("--noise-map", default="auto", help="on|off|auto: layer x module sensitivity heatmap; costs "
                                                      "layers x 7 evaluations (auto: on with a GPU, off on CPU)")
    g = p.add_argument_group("adversarial attacks (step adversarial)")
    g.add_argument("--attack-eps", default="0.02,0.05,0.1",
                   help="comma list of eps, relative to the mean embedding-row norm")
    g.add_argument("--attack-norm", default="linf", help="linf|l2 (l2: per token)")
    g.add_argument("--attack-steps", type=int, default=None, help="PGD steps (default 5 CPU, 20 GPU)")
    g.add_argument("--attack-windows", type=int, default=None, help="text windows attacked (default 3 CPU, 32 GPU)")
    g.add_argument("--attack-target", default=" Star Wars", help="target string of the targeted attacks and GCG")
    g.add_argument("--gcg-steps", type=int, default=None, help="GCG iterations (default 10 CPU, 100 GPU)")
    g.add_argument("--defence-steps", type=int, default=None,
                   help="adversarial fine-tuning steps (default 4 CPU, 50 GPU)")
    g = p.add_argument_group("analysis (step analysis)")
    g.add_argument("--hessian-probes", type=int, default=None, help="max Hutchinson probes (default 6 CPU, 50 GPU)")
    g.add_argument("--hessian-tol", type=float, default=1e-2, help="relative tolerance that stops Hutchinson")
    g.add_argument("--power-iters", type=int, default=None, help="power iterations (default 4 CPU, 20 GPU)")
    g.add_argument("--analysis-windows", type=int, default=None, help="windows in the Hessian loss (1 CPU, 4 GPU)")
    g.add_argument("--analysis-seq-len", type=int, default=None, help="tokens per window (128 CPU, 512 GPU)")
    g.add_argument("--per-block", default="auto", help="on|off|auto: Hessian one block at a time (auto: > 3B params)")
    g.add_argument("--quant-bits", default="4,3", help="comma list of RTN bit widths")
    g.add_argument("--quant-group", type=int, default=128, help="RTN group size (input columns)")
    g.add_argument("--super-weight-prompt", default="Apple Inc. is a worldwide tech company.")
    g.add_argument("--saliency", default="fisher", help="fisher|hutchinson: the H_ii of OBD saliency 0.5 H_ii w^2")
    return p


def _parse_max_memory(text: Optional[str]) -> Optional[dict]:
    if not text:
        return None
    out = {}
    for item in text.split(","):
        key, _, val = item.partition("=")
        if not val:
            raise C.UserError(f"--max-memory item {item!r} is not DEVICE=SIZE")
        out[int(key) if key.strip().isdigit() else key.strip()] = val.strip()
    return out


def _parse_protect(text: Optional[str]) -> tuple:
    if not text:
        return ()
    if text == "auto":
        return "auto"
    out = []
    for item in text.split(","):
        parts = item.strip().rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise C.UserError(f"--protect-super-weights item {item!r} is not module:row:col")
        out.append((parts[0], int(parts[1]), int(parts[2])))
    return tuple(out)


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate flags and fill device-dependent defaults. Raises UserError on bad input."""
    device = C.resolve_device(args.device)
    C.resolve_dtype(args.dtype, device)
    on_gpu = args.budget == "gpu" or (args.budget == "auto" and device.type == "cuda")
    args.gpu_budget = on_gpu
    steps = args.steps.split(",") if args.steps else available_steps()
    steps = [s.strip() for s in steps if s.strip()]
    for s in steps:
        if s not in ALL_STEPS:
            raise C.UserError(f"--steps: unknown step {s!r}; choose from {','.join(ALL_STEPS)}")
        if s not in STEP_FUNCS:
            raise C.UserError(f"--steps: step {s!r} is not implemented in this version")
    if not steps:
        raise C.UserError("--steps is empty")
    args.steps = [s for s in ALL_STEPS if s in steps]  # pipeline order, whatever the flag's order
    if args.seq_len is None:
        args.seq_len = 2048 if on_gpu else 1024
    if args.eval_tokens is None:
        args.eval_tokens = None if on_gpu else 8192
    elif args.eval_tokens == 0:
        args.eval_tokens = None
    elif args.eval_tokens < 0:
        raise C.UserError(f"--eval-tokens must be >= 0, got {args.eval_tokens}")
    if args.seq_len < 2:
        raise C.UserError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.stride is not None and not 1 <= args.stride <= args.seq_len:
        raise C.UserError(f"--stride must be between 1 and --seq-len ({args.seq_len}), got {args.stride}")
    if args.batch_size is not None and args.batch_size < 1:
        raise C.UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 0:
        raise C.UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    args.max_memory = _parse_max_memory(args.max_memory)
    args.ft_steps = args.ft_steps if args.ft_steps is not None else (500 if on_gpu else 16)
    args.ft_batch_size = args.ft_batch_size if args.ft_batch_size is not None else (8 if on_gpu else 4)
    args.ft_seq_len = args.ft_seq_len if args.ft_seq_len is not None else (1024 if on_gpu else 128)
    if args.finetune not in ("auto", "full", "lora", "none"):
        raise C.UserError(f"--finetune must be auto, full, lora or none, not {args.finetune!r}")
    if args.lr is not None and args.lr <= 0:
        raise C.UserError(f"--lr must be > 0, got {args.lr}")
    for flag in ("ft_steps", "ft_batch_size", "lora_r"):
        if getattr(args, flag) < 1:
            raise C.UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    args.calib_samples = args.calib_samples if args.calib_samples is not None else (128 if on_gpu else 8)
    args.calib_seq_len = args.calib_seq_len if args.calib_seq_len is not None else (2048 if on_gpu else 512)
    if args.calib_samples < 1 or args.calib_seq_len < 2:
        raise C.UserError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
    from llm_prune_model import PruneConfig, validate as validate_prune

    args.protect = _parse_protect(args.protect_super_weights)
    validate_prune(PruneConfig(method=args.prune_method, sparsity=args.sparsity, pattern=args.sparsity_pattern))
    from llm_robustness_test import NoiseConfig, validate as validate_noise

    validate_noise(NoiseConfig(mode=args.noise_mode, epsilon=args.epsilon, group=args.noise_group))
    try:
        args.sweep_eps = [float(x) for x in args.sweep_eps.split(",") if x.strip()]
    except ValueError:
        raise C.UserError(f"--sweep-eps must be a comma list of numbers, got {args.sweep_eps!r}")
    for e in args.sweep_eps:
        validate_noise(NoiseConfig(mode=args.sweep_mode, epsilon=e))
    if args.sweep_seeds < 1:
        raise C.UserError(f"--sweep-seeds must be >= 1, got {args.sweep_seeds}")
    args.sweep_tokens = args.sweep_tokens if args.sweep_tokens is not None else (16384 if on_gpu else 512)
    if args.sweep_tokens < 2:
        raise C.UserError(f"--sweep-tokens must be >= 2, got {args.sweep_tokens}")
    if not 0 <= args.protect_fraction < 1:
        raise C.UserError(f"--protect-fraction must be in [0, 1), got {args.protect_fraction}")
    if args.noise_map not in ("on", "off", "auto"):
        raise C.UserError(f"--noise-map must be on, off or auto, not {args.noise_map!r}")
    args.hessian_probes = args.hessian_probes if args.hessian_probes is not None else (50 if on_gpu else 6)
    args.power_iters = args.power_iters if args.power_iters is not None else (20 if on_gpu else 4)
    args.analysis_windows = args.analysis_windows if args.analysis_windows is not None else (4 if on_gpu else 1)
    args.analysis_seq_len = args.analysis_seq_len if args.analysis_seq_len is not None else (512 if on_gpu else 128)
    for flag in ("hessian_probes", "power_iters", "analysis_windows", "quant_group"):
        if getattr(args, flag) < 1:
            raise C.UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.analysis_seq_len < 2 or not args.hessian_tol >= 0:
        raise C.UserError("--analysis-seq-len must be >= 2 and --hessian-tol >= 0")
    if args.saliency not in ("fisher", "hutchinson"):
        raise C.UserError(f"--saliency must be fisher or hutchinson, not {args.saliency!r}")
    if args.per_block not in ("on", "off", "auto"):
        raise C.UserError(f"--per-block must be on, off or auto, not {args.per_block!r}")
    try:
        args.quant_bits = tuple(int(b) for b in args.quant_bits.split(","))
    except ValueError:
        raise C.UserError(f"--quant-bits must be a comma list of integers, got {args.quant_bits!r}")
    if not all(2 <= b <= 8 for b in args.quant_bits):
        raise C.UserError(f"--quant-bits must lie in 2..8, got {args.quant_bits}")
    try:
        args.attack_eps = tuple(float(x) for x in args.attack_eps.split(",") if x.strip())
    except ValueError:
        raise C.UserError(f"--attack-eps must be a comma list of numbers, got {args.attack_eps!r}")
    if not args.attack_eps or not all(0 <= e < float("inf") for e in args.attack_eps):
        raise C.UserError(f"--attack-eps values must be finite and >= 0, got {args.attack_eps}")
    if args.attack_norm not in ("linf", "l2"):
        raise C.UserError(f"--attack-norm must be linf or l2, not {args.attack_norm!r}")
    for flag, cpu, gpu in (("attack_steps", 5, 20), ("attack_windows", 3, 32), ("gcg_steps", 10, 100),
                           ("defence_steps", 4, 50)):
        if getattr(args, flag) is None:
            setattr(args, flag, gpu if on_gpu else cpu)
        if getattr(args, flag) < 1:
            raise C.UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.ft_seq_len < 2:
        raise C.UserError(f"--ft-seq-len must be >= 2, got {args.ft_seq_len}")
    args.prompt = args.prompt or [C.SAMPLE_PROMPT]
    for spec in (args.dataset, args.train_dataset):
        if spec not in ("wikitext2", "embedded") and not Path(spec).expanduser().exists():
            raise C.UserError(f"corpus not found: {spec!r} is neither 'wikitext2', 'embedded' nor an existing path")
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise C.UserError(f"--output-dir {out} is not writable: {e.strerror or e}")
    return args


# --------------------------------------------------------------------------- run state


@dataclasses.dataclass
class Run:
    """Everything the steps share: flags, model, tokenizer, corpora and results."""

    args: argparse.Namespace
    out: Path
    model: torch.nn.Module = None
    tokenizer: object = None
    model_label: str = ""
    results: dict = dataclasses.field(default_factory=dict)
    variants: dict = dataclasses.field(default_factory=dict)  # name -> checkpoint path (None: live model)
    _corpora: dict = dataclasses.field(default_factory=dict)
    _ids: dict = dataclasses.field(default_factory=dict)

    def corpus(self, which: str) -> C.Corpus:
        """'eval' or 'train' corpus, loaded once; any fallback is recorded in results."""
        if which not in self._corpora:
            spec = self.args.dataset if which == "eval" else self.args.train_dataset
            corpus = C.load_corpus(spec, "test" if which == "eval" else "train")
            self._corpora[which] = corpus
            self.results.setdefault("dataset", {})[which] = corpus.describe()
        return self._corpora[which]

    def ids(self, which: str) -> torch.Tensor:
        """Token ids [n_tokens] of the 'eval' or 'train' corpus."""
        if which not in self._ids:
            self._ids[which] = C.tokenize_corpus(self.tokenizer, self.corpus(which))
        return self._ids[which]

    def save(self) -> None:
        if C.dist_rank_world()[0] == 0:  # under accelerate launch only rank 0 writes
            C.write_json(self.out / "results.json", self.results)


# --------------------------------------------------------------------------- steps


def step_eval(run: Run) -> None:
    """Evaluate every variant produced so far (the loaded model first)."""
    from llm_evaluate_models import EvalConfig, evaluate_variants

    a = run.args
    cfg = EvalConfig(seq_len=a.seq_len, stride=a.stride, eval_tokens=a.eval_tokens, batch_size=a.batch_size,
                     prompts=a.prompt, max_new_tokens=a.max_new_tokens)
    ids = run.ids("eval")
    run.results["protocol"] = {"seq_len": a.seq_len, "stride": a.stride or a.seq_len,
                               "eval_tokens": a.eval_tokens, "tokens_available": int(ids.numel())}
    for name, res in evaluate_variants(run.model, run.tokenizer, ids, run.variants, cfg, kl=a.kl).items():
        run.results.setdefault("perplexity", {})[name] = res.perplexity
        run.results.setdefault("evaluation", {})[name] = dataclasses.asdict(res)


def step_finetune(run: Run) -> None:
    """Load the finished fine-tune in <output-dir>/finetuned, or train and save it."""
    from llm_finetune import FinetuneConfig, load_or_train_model

    a = run.args
    mode = a.finetune
    if mode == "auto":
        mode = "full" if run.results["parameters"] < 1.5e9 else "lora"
    cfg = FinetuneConfig(output_dir=str(run.out / "finetuned"), mode=mode, steps=a.ft_steps,
                         batch_size=a.ft_batch_size, seq_len=a.ft_seq_len,
                         lr=a.lr or (2e-4 if mode == "lora" else 5e-5), lora_r=a.lora_r,
                         max_shard_size=a.max_shard_size, seed=a.seed, base_model=run.model_label,
                         data=run.corpus("train").source)
    run.model, res = load_or_train_model(run.model, run.tokenizer, run.ids("train"), cfg)
    if mode != "none":
        run.variants = {"fine-tuned": None}
        if not (res.loaded_existing and run.results.get("finetune")):  # keep the record of the training run
            run.results["finetune"] = {k: v for k, v in dataclasses.asdict(res).items() if k != "manifest"}


def protected_coords(run: Run) -> tuple:
    """--protect-super-weights as (module, row, col) tuples; 'auto' runs the data-free detector once."""
    if run.args.protect != "auto":
        return run.args.protect
    if "super_weights" not in run.results:
        from llm_integrated_analysis import detect_super_weights

        found, _ = detect_super_weights(run.model, run.tokenizer, run.args.super_weight_prompt)
        run.results["super_weights"] = [sw.__dict__ for sw in found]
    return tuple((sw["module"], sw["row"], sw["col"]) for sw in run.results["super_weights"])


def step_prune(run: Run) -> None:
    """Prune a copy of the current weights, save them as a tensors-only checkpoint, restore."""
    from llm_prune_model import PruneConfig, prune_model, pruned_tensors

    a = run.args
    cfg = PruneConfig(method=a.prune_method, sparsity=a.sparsity, pattern=a.sparsity_pattern,
                      protect=protected_coords(run))
    windows = C.sample_windows(run.ids("train"), a.calib_samples, a.calib_seq_len, seed=a.seed)
    names = [n + ".weight" for n in C.decoder_linears(run.model)]
    with C.restored_on_exit(run.model, names):  # the live model stays unpruned for later steps
        res = prune_model(run.model, run.tokenizer, windows, cfg)
        path = run.out / "checkpoints" / "pruned.safetensors"
        C.save_tensors(path, pruned_tensors(run.model, res), metadata={"method": a.prune_method})
    run.variants["pruned"] = path
    d = dataclasses.asdict(res)
    d.pop("pruned_names")
    d["checkpoint"] = str(path.relative_to(run.out))
    d["calibration"] = {"windows": a.calib_samples, "seq_len": a.calib_seq_len, "source": run.corpus("train").source}
    run.results["prune"] = d


def step_noise(run: Run) -> None:
    """The noisy variant (saved, tensors only), the eps sweep with and without protection
    of the most salient weights, and the layer x module sensitivity map."""
    import llm_robustness_test as R
    from llm_perplexity import EvalConfig
    from llm_sensitivity import protect_top_fraction, saliency_scores

    a = run.args
    model = run.model
    cfg = R.NoiseConfig(mode=a.noise_mode, epsilon=a.epsilon, group=a.noise_group, seed=a.seed)
    params = R.select_params(model, cfg.group)
    with C.restored_on_exit(model, list(params)):
        res = R.apply_robustness_test(model, run.tokenizer, cfg)
        path = run.out / "checkpoints" / "noisy.safetensors"
        C.save_tensors(path, {n: params[n].detach() for n in res.tensors}, metadata={"mode": a.noise_mode})
    run.variants["noisy"] = path
    C.fault_point("during:noise")
    out = {"variant": {k: v for k, v in dataclasses.asdict(res).items() if k != "tensors"},
           "checkpoint": str(path.relative_to(run.out))}
    out["variant"]["n_tensors"] = len(res.tensors)

    # Protection for the targeted sweep: top Fisher saliency plus any given super weights.
    seq = min(a.seq_len, a.sweep_tokens)
    ecfg = EvalConfig(seq_len=seq, eval_tokens=a.sweep_tokens, batch_size=a.batch_size)
    lin = C.decoder_linears(model)
    protect = None
    coords = [(m + ".weight", r, c) for m, r, c in protected_coords(run)]
    if a.protect_fraction > 0 or coords:
        on_gpu = a.gpu_budget
        windows = C.sample_windows(run.ids("train"), min(a.calib_samples, 32 if on_gpu else 4),
                                   min(a.calib_seq_len, 2048 if on_gpu else 256), seed=a.seed)
        # Masks in each parameter's own layout (Conv1D stores weights [in, out]).
        scores = {n + ".weight": C.out_in(lin[n], s) for n, s in saliency_scores(model, windows, lin, "fisher").items()}
        protect = protect_top_fraction(scores, a.protect_fraction, coords)
    sweep = R.noise_sweep(model, run.tokenizer, run.ids("eval"), a.sweep_eps, list(range(a.sweep_seeds)),
                          mode=a.sweep_mode, group="linears", eval_config=ecfg, protect=protect)
    out["sweep"] = dataclasses.asdict(sweep)
    out["sweep"]["protect_fraction"] = a.protect_fraction
    run.results["noise"] = out
    if a.noise_map == "on" or (a.noise_map == "auto" and a.gpu_budget):
        # On CPU each of the layers x 7 cells gets 128 tokens: a coarse but complete map.
        map_tokens = a.sweep_tokens if a.gpu_budget else min(a.sweep_tokens, 128)
        map_cfg = EvalConfig(seq_len=min(seq, map_tokens), eval_tokens=map_tokens, batch_size=a.batch_size)
        smap = R.sensitivity_map(model, run.tokenizer, run.ids("eval"), epsilon=0.1, seed=a.seed,
                                 eval_config=map_cfg)
        out["map"] = smap
        out["top_cells"] = R.top_cells(smap, 5)


def adversarial_config(a: argparse.Namespace):
    """The adversarial step's config from resolved flags (GPU or CPU budget set)."""
    import llm_adversarial_test as ADV

    on_gpu = a.gpu_budget
    return ADV.AdversarialConfig(epsilons=a.attack_eps, norm=a.attack_norm, pgd_steps=a.attack_steps,
                                n_windows=a.attack_windows, prompt_len=128 if on_gpu else 32,
                                continuation_len=32 if on_gpu else 16, sample_prompts=tuple(a.prompt),
                                target=a.attack_target, targeted_steps=2 * a.attack_steps, gcg_steps=a.gcg_steps,
                                gcg_batch=128 if on_gpu else 16, gcg_topk=256 if on_gpu else 32,
                                gcg_suffix_len=20 if on_gpu else 6, defence_steps=a.defence_steps,
                                max_new_tokens=a.max_new_tokens, seed=a.seed)


def step_adversarial(run: Run) -> None:
    """FGSM/PGD eps sweep, targeted success, answers under attack, GCG and defences."""
    import llm_adversarial_test as ADV

    cfg = adversarial_config(run.args)
    run.results["adversarial"] = ADV.test_adversarial_robustness(run.model, run.tokenizer, run.ids("eval"), cfg)


def step_analysis(run: Run) -> None:
    """Hessian traces, Fisher/OBD saliency, super weights, guided quantization, and the
    layer-wise comparison with the noise map."""
    import llm_integrated_analysis as A
    from llm_perplexity import EvalConfig

    a = run.args
    per_block = a.per_block == "on" or (a.per_block == "auto" and run.results["parameters"] > 3e9)
    on_gpu = a.gpu_budget
    ecfg = EvalConfig(seq_len=min(a.seq_len, a.sweep_tokens), eval_tokens=a.sweep_tokens, batch_size=a.batch_size)
    cfg = A.AnalysisConfig(calib_windows=a.analysis_windows, calib_seq_len=a.analysis_seq_len,
                           fisher_windows=min(a.calib_samples, 32 if on_gpu else 8), max_probes=a.hessian_probes,
                           tol=a.hessian_tol, power_iters=a.power_iters, per_block=per_block, saliency=a.saliency,
                           super_weight_prompt=a.super_weight_prompt, quant_bits=a.quant_bits,
                           quant_group=a.quant_group, eval_config=ecfg, seed=a.seed)
    res = A.run_integrated_analysis(run.model, run.tokenizer, run.ids("train"), run.ids("eval"), cfg)
    d = C.to_strict_json(dataclasses.asdict(res))
    # Layer-wise summaries and rank correlations between the sensitivity measures.
    n_layers = max(res.module_layer.values()) + 1
    by_layer = {k: [0.0] * n_layers for k in ("hessian_trace", "fisher_sum")}
    for k in by_layer:
        for n, v in getattr(res, k).items():
            by_layer[k][res.module_layer[n]] += v
    d["layer_totals"] = by_layer
    d["top_layers"] = {k: sorted(range(n_layers), key=lambda i: -v[i])[:5] for k, v in by_layer.items()}
    cells = list(res.modules)
    corr = {"hessian_vs_fisher": A.spearman([res.hessian_trace[n] for n in cells], [res.fisher_sum[n] for n in cells])}
    smap = run.results.get("noise", {}).get("map")
    if smap:
        noise_cell = {(i, m): smap["delta_nll"][i][j] for i in smap["layers"] for j, m in enumerate(smap["modules"])}
        nz = [float(noise_cell.get((res.module_layer[n], res.module_type[n]), float("nan"))) for n in cells]
        corr["hessian_vs_noise"] = A.spearman([res.hessian_trace[n] for n in cells], nz)
        corr["fisher_vs_noise"] = A.spearman([res.fisher_sum[n] for n in cells], nz)
    d["rank_correlation"] = corr
    d["super_weight_layers"] = sorted({sw["layer"] for sw in res.super_weights})
    run.results["analysis"] = d


STEP_FUNCS: dict[str, Callable[[Run], None]] = {"analysis": step_analysis, "adversarial": step_adversarial, "finetune": step_finetune, "prune": step_prune,
                                                "noise": step_noise, "eval": step_eval}


# --------------------------------------------------------------------------- main


# Flags that change each step's output (besides COMMON_ARGS). A changed value reruns that
# step and, through the fingerprint chain, every step after it.
COMMON_ARGS = ("model", "device", "dtype", "device_map", "dataset", "train_dataset", "seed", "trust_remote_code",
               "gpu_budget")
STEP_ARGS = {
    "finetune": ("finetune", "ft_steps", "ft_batch_size", "ft_seq_len", "lr", "lora_r"),
    "prune": ("prune_method", "sparsity", "sparsity_pattern", "calib_samples", "calib_seq_len",
              "protect_super_weights", "super_weight_prompt"),
    "noise": ("noise_mode", "epsilon", "noise_group", "sweep_mode", "sweep_eps", "sweep_seeds", "sweep_tokens",
              "protect_fraction", "noise_map", "protect_super_weights", "super_weight_prompt", "calib_samples",
              "calib_seq_len", "seq_len", "batch_size"),
    "eval": ("seq_len", "stride", "eval_tokens", "batch_size", "kl", "prompt", "max_new_tokens"),
    "adversarial": ("attack_eps", "attack_norm", "attack_steps", "attack_windows", "attack_target", "gcg_steps",
                    "defence_steps", "prompt", "max_new_tokens"),
    "analysis": ("saliency", "hessian_probes", "hessian_tol", "power_iters", "analysis_windows", "analysis_seq_len", "per_block",
                 "quant_bits", "quant_group", "super_weight_prompt", "sweep_tokens", "seq_len", "batch_size",
                 "calib_samples"),
}
STEP_SECTIONS = {"finetune": ("finetune",), "prune": ("prune",), "noise": ("noise", "super_weights"),
                 "eval": ("perplexity", "evaluation", "protocol"), "adversarial": ("adversarial",),
                 "analysis": ("analysis",)}


def fingerprint(args: argparse.Namespace, step: str, previous: str) -> str:
    """Hash of what determines a step's output: common flags, its own flags, and the
    fingerprint of the step before it (so a change cascades to every later step)."""
    import hashlib
    import json

    keys = COMMON_ARGS + STEP_ARGS[step]
    blob = json.dumps({"step": step, "prev": previous, **{k: getattr(args, k, None) for k in keys}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=C.REPO_DIR, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _load_previous(out: Path) -> dict:
    path = out / "results.json"
    if not path.is_file():
        return {}
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("ignoring unreadable %s; starting afresh", path)
        return {}


def _restore_variants(run: Run, step: str) -> bool:
    """For a skipped prune/noise step, point the variant at its saved checkpoint."""
    section = {"prune": ("prune", "pruned"), "noise": ("noise", "noisy")}.get(step)
    if section is None:
        return True
    key, variant = section
    ckpt = run.out / run.results[key]["checkpoint"]
    if not ckpt.is_file():
        return False
    run.variants[variant] = ckpt
    return True


def run_pipeline(args: argparse.Namespace) -> dict:
    """Run the steps in order, resuming from ``results.json``: a step whose fingerprint
    matches the saved one is skipped, its recorded outputs are kept."""
    out = Path(args.output_dir)
    C.init_distributed_from_env()  # no-op unless started by accelerate launch / torchrun
    C.clean_stale_temps(out)
    C.seed_everything(args.seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    torch.use_deterministic_algorithms(True, warn_only=True)
    previous = _load_previous(out)
    done_before = previous.get("steps_done", {})
    run = Run(args=args, out=out)
    device = C.resolve_device(args.device)
    argv = sys.argv[1:] if args._argv is None else list(args._argv)
    run.results.update({
        "seed": args.seed, "argv": argv, "steps": args.steps, "device": str(device),
        "dtype": str(C.resolve_dtype(args.dtype, device)), "versions": C.library_versions(),
        "python": platform.python_version(), "steps_done": {},
    })
    manifest = {"command": "python llm_main_v4.py " + " ".join(argv), "git_commit": git_commit(),
                "versions": run.results["versions"], "device": str(device), "dtype": run.results["dtype"],
                "seeds": {"seed": args.seed}, "steps": {}, "bookkeeping_s": 0.0}
    run.results["manifest"] = manifest
    t0 = time.perf_counter()
    load_cfg = C.LoadConfig(model=args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                            max_memory=args.max_memory, trust_remote_code=args.trust_remote_code,
                            cache_dir=args.cache_dir)
    run.model, run.tokenizer, run.model_label = C.load_model(load_cfg)
    run.results["model"] = run.model_label
    run.results["parameters"] = sum(p.numel() for p in run.model.parameters())
    run.variants["base"] = None
    manifest["steps"]["load"] = {"wall_s": time.perf_counter() - t0, "peak_memory_mb": C.peak_memory_mb(device)}
    prev_fp, chain_intact = "load", True
    for step in args.steps:
        tb = time.perf_counter()
        fp = fingerprint(args, step, prev_fp)
        can_skip = chain_intact and done_before.get(step) == fp and step != "finetune"
        if can_skip:
            for key in STEP_SECTIONS[step]:
                if key in previous:
                    run.results[key] = previous[key]
            can_skip = _restore_variants(run, step)
        manifest["bookkeeping_s"] += time.perf_counter() - tb
        t = time.perf_counter()
        if can_skip:
            log.info("step %s: unchanged since the last run, skipped", step)
            if step == "eval":  # corpus descriptions are recorded as a side effect of loading them
                run.results["dataset"] = previous.get("dataset", {})
        else:
            chain_intact = chain_intact and done_before.get(step) == fp
            if step == "finetune" and done_before.get(step) == fp and "finetune" in previous:
                run.results["finetune"] = previous["finetune"]
            log.info("step %s", step)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            STEP_FUNCS[step](run)
        tb = time.perf_counter()
        manifest["steps"][step] = {"wall_s": tb - t, "peak_memory_mb": C.peak_memory_mb(device), "skipped": can_skip}
        run.results["steps_done"][step] = fp
        prev_fp = fp
        run.save()
        manifest["bookkeeping_s"] += time.perf_counter() - tb
    t = time.perf_counter()
    run.results["plots"] = make_plots(C.to_strict_json(run.results), out)
    manifest["plots_s"] = time.perf_counter() - t
    run.save()
    if C.dist_rank_world()[0] == 0:
        md, html_path = write_report(C.to_strict_json(run.results), out)
        log.info("wrote %s, %s and %s", out / "results.json", md, html_path)
    return run.results


def report_only(args: argparse.Namespace) -> dict:
    """Rebuild every plot and the report from ``<output-dir>/results.json``; no model is loaded."""
    out = Path(args.output_dir)
    results = _load_previous(out)
    if not results:
        raise C.UserError(f"--report-only: no readable results.json in {out}")
    results["plots"] = make_plots(results, out)
    C.write_json(out / "results.json", results)
    write_report(results, out)
    return results


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point. Returns 0 on success, 2 on bad input (one error line, no traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = argv
    C.setup_logging(args.log_level)
    try:
        if args.report_only:
            results = report_only(args)
        else:
            args = resolve_args(args)
            results = run_pipeline(args)
    except C.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, ppl in results.get("perplexity", {}).items():
        print(f"{name}: perplexity {_fmt(ppl)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
