"""Orchestrator: load or fine-tune a causal LM, then prune, perturb, evaluate, export, attack, analyse.

    python llm_main_v4.py                       # every step on the embedded SmolLM2-135M
    python llm_main_v4.py --steps eval --dataset wiki.test.raw --seq-len 2048
    run_pipeline(PipelineConfig(prune=PruneConfig(sparsity=0.6)))   # from Python; configs: llm_config

Only this module parses argv, with flags generated from the configs in ``llm_config``. Each
step's science lives in its module (``STEPS`` names them); the adapters here pass the model,
tokenizer and token tensors in and record the result. Variants (base, fine-tuned, pruned,
noisy) are checkpoints, 1-bit masks or noise recipes applied in place to the one live model.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import logging
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

import llm_common as C
import llm_compress as LC
import llm_data as D
import llm_io as IO
import llm_model as LM
import llm_variants as V
from llm_config import ALL_STEPS, OneLineParser, PipelineConfig, add_arguments, fingerprint, from_args
from llm_report import compare_runs, fmt, make_plots, read_results, rebuild_report, write_report

log = logging.getLogger("llm.main")
RECIPE = ("mode", "epsilon", "group", "seed", "bitflip_format")  # what regenerates the noisy variant


@dataclass
class Run:
    """What the steps share: the config, model, tokenizer, corpora, variants and results."""

    cfg: PipelineConfig
    out: Path
    model: torch.nn.Module = None
    tokenizer: object = None
    label: str = ""
    live: str = "base"  # the variant the live model is
    results: dict = field(default_factory=dict)
    variants: dict = field(default_factory=lambda: {"base": None})  # name -> None (the live model) or weights
    parents: dict = field(default_factory=dict)   # name -> the variant it was derived from
    texts: dict = field(default_factory=dict)    # "eval" / "train" -> Corpus, read before the model

    def ids(self, which: str) -> torch.Tensor:
        """Token ids [n_tokens] of the 'eval' or 'train' text (tokenized once, cached on the corpus)."""
        return D.tokenize_corpus(self.tokenizer, self.texts[which])

    def save(self) -> None:
        if C.dist_rank_world()[0] == 0:  # under accelerate launch only rank 0 writes
            IO.write_json(self.out / "results.json", self.results)


# --------------------------------------------------------------------------- step adapters


def _base_weights(run: Run):
    """The unmodified weights, read back for the base row once the live model is fine-tuned: the
    folder they were loaded from, else a copy in checkpoints/."""
    base = LM.weights_dir(run.model)
    if base is None:
        base = run.out / "checkpoints" / "base.safetensors"
        IO.save_tensors(base, V.named_tensors(run.model), metadata={"variant": "base"})
    return base


def _finetune(run: Run, mod, cfg) -> None:
    cfg = replace(cfg, output_dir=str(run.out / "finetuned"), base_model=run.label, data=run.texts["train"].source,
                  identity=fingerprint(run.results["model_identity"], run.texts["train"].sha256))
    base = _base_weights(run) if cfg.mode != "none" else None
    run.model, res = mod.load_or_train_model(run.model, run.tokenizer, run.texts["train"], cfg)
    if res.mode != "none":
        run.variants, run.parents, run.live = {"base": base, "fine-tuned": None}, {"fine-tuned": "base"}, "fine-tuned"
        if not (res.loaded_existing and run.results.get("finetune")):  # keep the record of the training run
            run.results["finetune"] = {k: v for k, v in asdict(res).items() if k != "manifest"}


def _prune(run: Run, mod, cfg) -> None:
    names = [n + ".weight" for n in LM.decoder_linears(run.model)]
    with V.restored_on_exit(run.model, names):  # the live model stays unpruned for later steps
        train = run.texts["train"]  # the step draws its windows: C4 document by document
        res = mod.prune_model(run.model, run.tokenizer, train, cfg.for_model(run.model))
        # Only SparseGPT changes the weights it keeps; the others' variant is exactly a 1-bit mask.
        rec = V.store_variant(run.out, "pruned", run.model, res.pruned_names,
                              mask=res.method != "sparsegpt" and not run.cfg.run.save_variants)
    d = {k: v for k, v in asdict(res).items() if k != "pruned_names"}
    d["calibration"].update(source=train.source, per_document=train.docs is not None)
    run.results["prune"] = {**d, **rec, "parent": run.live}
    _attach(run, "prune")


def _noise(run: Run, mod, cfg) -> None:
    with V.restored_on_exit(run.model, list(mod.select_params(run.model, cfg.group))):
        res = mod.apply_robustness_test(run.model, run.tokenizer, cfg, run.ids("eval"), run.texts["train"])
        # The noisy variant is regenerated bit for bit from (mode, eps, group, seed): no copy needed.
        rec = V.store_variant(run.out, "noisy", run.model, res.variant.tensors, mask=False) if \
            run.cfg.run.save_variants else {"checkpoint": None, "recipe": {k: getattr(cfg, k) for k in RECIPE}}
    IO.fault_point("during:noise")
    d = asdict(res)
    d["variant"]["n_tensors"] = len(d["variant"].pop("tensors"))
    run.results["noise"] = {**d, **rec, "parent": run.live}
    _attach(run, "noise")


def _quantize(run: Run, mod, cfg) -> None:
    if cfg.method == "none":  # no quantized variant
        run.results["quantize"] = {"status": "off", "parent": run.live}
        run.variants.pop("quantized", None)
        return
    names = [n + ".weight" for n in LM.decoder_linears(run.model)]
    with V.restored_on_exit(run.model, names):  # the live model stays unquantized for later steps
        res = mod.quantize_model(run.model, run.tokenizer, run.texts["train"], cfg)
        rec = V.store_variant(run.out, "quantized", run.model, list(res.quantized), mask=False) if \
            run.cfg.run.save_variants else LC.save_codes(run.out, "quantized", res.quantized)
    d = {f.name: getattr(res, f.name) for f in dataclasses.fields(res) if f.name != "quantized"}
    run.results["quantize"] = {**IO.to_strict_json(d), **rec, "status": "ran", "parent": run.live}
    _attach(run, "quantize")


def _eval(run: Run, mod, cfg) -> None:
    res = mod.evaluate_variants(run.model, run.tokenizer, run.ids("eval"), run.variants, cfg, run.parents)
    run.results.update(perplexity=res.perplexity, evaluation={n: asdict(r) for n, r in res.variants.items()},
                       protocol={**res.protocol, "config": res.config}, variants=res.parents)


def _zeroshot(run: Run, mod, cfg) -> None:
    run.results["zeroshot"] = asdict(mod.evaluate_zeroshot(run.model, run.tokenizer, run.variants, cfg, run.parents))


def _exported(run: Run) -> bool:
    """Whether every file the recorded export lists is still on disk."""
    rec = run.results.get("export") or {}
    return all((run.out / "export" / name / f).is_file() for name, v in (rec.get("variants") or {}).items()
               for f in (v.get("files") or ()))


def _export(run: Run, mod, cfg) -> None:
    facts = mod.variant_facts(run.results, {n: run.parents.get(n) for n in run.variants})
    q = run.results.get("quantize") or {}
    codes = {"quantized": (run.out / q["checkpoint"], q["bits"])} if q.get("format") == "codes" else {}
    run.results["export"] = asdict(mod.export_variants(run.model, run.tokenizer, run.variants, run.out / "export",
                                                       replace(cfg, command=run.results["manifest"]["command"]), facts,
                                                       codes))


def _adversarial(run: Run, mod, cfg) -> None:
    run.results["adversarial"] = asdict(mod.test_adversarial_robustness(run.model, run.tokenizer, run.ids("eval"), cfg))


def _analysis(run: Run, mod, cfg) -> None:
    noise_map = (run.results.get("noise") or {}).get("map")  # compared with the Hessian per cell
    run.results["analysis"] = asdict(mod.run_integrated_analysis(run.model, run.tokenizer, run.texts["train"],
                                                                 run.ids("eval"), cfg, noise_map))


@dataclass(frozen=True)
class Step:
    module: str                   # imported when the step runs: --report-only loads no step module
    adapter: Callable             # (run, module, resolved config) -> None
    sections: tuple               # results.json keys it writes, restored when it is skipped
    corpora: tuple                # texts it reads: their hashes enter its fingerprint
    variant: Optional[str] = None  # the checkpointed variant it makes
    outputs: Optional[Callable] = None  # (run) -> whether the files it wrote are still there; else it reruns


# The registry: one row per step, in pipeline order. Configs: llm_config.STEP_CONFIGS; plots: llm_report.
STEPS = {
    "finetune": Step("llm_finetune", _finetune, ("finetune",), ("train",)),
    "prune": Step("llm_prune_model", _prune, ("prune",), ("train",), "pruned"),
    "noise": Step("llm_robustness_test", _noise, ("noise",), ("eval", "train"), "noisy"),
    "quantize": Step("llm_quantize_model", _quantize, ("quantize",), ("train",), "quantized"),
    "eval": Step("llm_evaluate_models", _eval, ("perplexity", "evaluation", "protocol", "variants"), ("eval",)),
    "zeroshot": Step("llm_zeroshot", _zeroshot, ("zeroshot",), ()),
    "export": Step("llm_export", _export, ("export",), (), outputs=_exported),
    "adversarial": Step("llm_adversarial_test", _adversarial, ("adversarial",), ("eval",)),
    "analysis": Step("llm_integrated_analysis", _analysis, ("analysis",), ("train", "eval")),
}


# --------------------------------------------------------------------------- pipeline


def _check_before_loading(cfg: PipelineConfig, out: Path) -> dict:
    """Every check that needs no model: bad input fails in one line before minutes of loading.
    Returns the resolved configs of the steps to run, the texts they read, and their description."""
    rc = cfg.run
    rc.validate()
    device = LM.resolve_device(rc.device)
    LM.resolve_dtype(rc.dtype, device)
    gpu = rc.budget == "gpu" or (rc.budget == "auto" and device.type == "cuda")
    configs = {s: getattr(cfg, s).resolved(gpu) for s in (rc.steps or ALL_STEPS)}
    if "zeroshot" in configs:  # task YAMLs that run code need the same consent as model code
        configs["zeroshot"] = replace(configs["zeroshot"], trust_remote_code=rc.trust_remote_code)
    for c in configs.values():
        c.validate()
    IO.ensure_writable_dir(out, "--output-dir")
    texts, described = D.load_texts(rc.dataset, rc.train_dataset, {c for s in configs for c in STEPS[s].corpora},
                                    rc.no_fallback, rc.allow_overlap, default_train="c4" if gpu else "wikitext2")
    ev = texts.get("eval")
    if "eval" in configs and ev is not None and ev.eval_windows and cfg.eval.eval_tokens is None:
        # The protocol's cut (C4: the papers score the first 256 windows), unless --eval-tokens says otherwise.
        configs["eval"] = replace(configs["eval"], eval_tokens=ev.eval_windows * configs["eval"].seq_len)
    return configs, texts, described


def _command(cfg: PipelineConfig, argv: Optional[list]) -> str:
    """The command line as a shell would take it back (shlex: spaces and ``;`` stay inside their
    argument). Called from Python (a notebook: sys.argv is the kernel's), the config instead."""
    if argv is not None:
        return shlex.join(["python", "llm_main_v4.py", *map(str, argv)])
    changed = {name: {k: v for k, v in asdict(part).items() if v != asdict(type(part)()).get(k)}
               for name, part in vars(cfg).items()}
    return "run_pipeline(PipelineConfig(...)) called from Python, not from the command line; config changed " \
           "from the defaults: " + json.dumps(IO.to_strict_json({k: v for k, v in changed.items() if v}), sort_keys=True)


def _start(cfg: PipelineConfig, out: Path, argv: Optional[list], texts: dict, described: dict) -> Run:
    """Seed, load the model, and open the results with the run's provenance."""
    rc = cfg.run
    C.init_distributed_from_env()  # no-op unless started by accelerate launch / torchrun
    IO.clean_stale_temps(out)
    C.make_deterministic(rc.seed)
    device = LM.resolve_device(rc.device)
    run = Run(cfg=cfg, out=out, texts=texts)
    t0 = time.perf_counter()
    run.model, run.tokenizer, run.label = LM.load_model(LM.LoadConfig(
        model=rc.model, device=rc.device, dtype=rc.dtype, device_map=rc.device_map, max_memory=rc.max_memory,
        trust_remote_code=rc.trust_remote_code, cache_dir=rc.cache_dir))
    dtype = str(LM.resolve_dtype(rc.dtype, device))
    run.results.update(seed=rc.seed, argv=argv, steps=list(rc.steps or ALL_STEPS), device=str(device), dtype=dtype,
                       versions=C.library_versions(), python=platform.python_version(), steps_done={},
                       model=run.label, parameters=sum(p.numel() for p in run.model.parameters()),
                       model_identity=LM.model_identity(run.model, run.label), dataset=described)
    run.results["manifest"] = {"command": _command(cfg, argv), "git_commit": C.git_commit(),
        "versions": run.results["versions"], "device": str(device), "dtype": dtype, "seeds": {"seed": rc.seed},
        "steps": {"load": {"wall_s": time.perf_counter() - t0, "peak_memory_mb": LM.peak_memory_mb(device)}},
        "bookkeeping_s": 0.0}
    return run


def _fingerprint(run: Run, step: str, config, previous: str) -> str:
    """The step's whole config, the hashes of the texts it reads, the model's identity and
    the previous step's fingerprint (so a change reruns this step and every later one)."""
    texts = {c: run.texts[c].sha256 for c in STEPS[step].corpora}
    common = {k: run.results[k] for k in ("device", "dtype", "model_identity")}
    return fingerprint(step, previous, config.fingerprint_dict(), texts, common, run.cfg.run.device_map)


def _restore(run: Run, step: str, previous: dict) -> bool:
    """Reuse a skipped step's recorded sections and its variant, if that can still be had; a
    step whose files are gone (a removed export) reruns."""
    for key in STEPS[step].sections:
        if key in previous:
            run.results[key] = previous[key]
    if STEPS[step].outputs is not None and not STEPS[step].outputs(run):
        log.info("step %s: its files are gone, running it again", step)
        return False
    return step != "finetune" and (STEPS[step].variant is None or _attach(run, step))  # finetune reloads its model


def _carry_over(run: Run, configs: dict, previous: dict) -> list:
    """Keep what earlier runs into this directory recorded for the steps this run does not run
    (``--steps zeroshot`` into a finished run keeps its perplexities, pruning and exports), and
    re-attach their variants, so later steps still see them. Only results of this very model,
    device and dtype are kept; others are set aside as a file, never dropped silently."""
    done = previous.get("steps_done") or {}
    others = [s for s in ALL_STEPS if s not in configs and s in done]
    if not others:
        return []
    same = {k: IO.to_strict_json(previous.get(k)) for k in ("model_identity", "device", "dtype")} == \
        {k: IO.to_strict_json(run.results.get(k)) for k in ("model_identity", "device", "dtype")}
    if not same:
        aside = run.out / f"results.json.other-model-{int(time.time())}"
        IO.write_json(aside, previous)
        log.warning("the results of steps %s in %s were made from another model, device or dtype; not kept in "
                    "results.json (saved as %s)", ", ".join(others), run.out, aside.name)
        return []
    for step in others:
        for key in STEPS[step].sections:
            if key in previous:
                run.results[key] = previous[key]
        run.results["steps_done"][step] = done[step]
        if step == "finetune":
            _carry_finetune(run)
        elif STEPS[step].variant and isinstance(run.results.get(step), dict):
            parent = run.results[step].get("parent", run.live)
            if parent != run.live or not _attach(run, step):  # a mask or recipe applies to its parent only
                run.variants.pop(STEPS[step].variant, None)
                log.warning("the %s variant of the earlier run cannot be had (its file is gone or its parent "
                            "%s is not live); later steps leave it out", STEPS[step].variant, parent)
    log.info("kept the recorded results of steps %s (not run this time)", ", ".join(others))
    return others


def _carry_finetune(run: Run) -> None:
    """The earlier run's fine-tuned model becomes the live model again, as when its step is
    skipped, so that the variants derived from it (pruned, noisy) are what they were."""
    ft, path = run.results.get("finetune") or {}, run.out / "finetuned"
    if not isinstance(ft, dict) or ft.get("mode") in (None, "none"):
        return
    if not (path / "config.json").is_file():
        log.warning("the earlier fine-tuned model %s is gone; later steps see the base model only", path)
        return
    base = _base_weights(run)
    tensors, state = IO.load_tensors(path), V.named_tensors(run.model)
    with torch.no_grad():
        for name, t in tensors.items():
            if name in state:
                state[name].copy_(t)
    run.variants, run.parents, run.live = {"base": base, "fine-tuned": None}, {"fine-tuned": "base"}, "fine-tuned"


def _attach(run: Run, step: str) -> bool:
    """Point the step's variant at its record (noise recipe, 1-bit mask or tensors); False if gone."""
    rec, name, mod = run.results[step], STEPS[step].variant, importlib.import_module(STEPS[step].module)
    if rec.get("status") == "off":  # the step ran and made no variant (--quant-method none)
        return True
    run.parents[name] = rec.get("parent", run.live)
    recipe = lambda r: functools.partial(mod.noisy_weights, cfg=mod.NoiseConfig(**r))  # noqa: E731
    codes = lambda p: functools.partial(LC.coded_weights, path=p)  # noqa: E731
    run.variants[name] = V.variant_weights(run.out, rec, recipe, codes)
    return run.variants[name] is not None


def run_pipeline(cfg: PipelineConfig, argv: Optional[list] = None) -> dict:
    """Run the configured steps in order, resuming from ``<output_dir>/results.json``: a step
    whose fingerprint matches the saved one is skipped and its recorded results kept. A second
    run on the same output directory is refused while this one holds its lock."""
    out = Path(cfg.run.output_dir)
    with IO.private_umask():
        configs, texts, described = _check_before_loading(cfg, out)
        with IO.output_lock(out):
            return _run(cfg, argv, out, configs, texts, described)


def _run(cfg: PipelineConfig, argv: Optional[list], out: Path, configs: dict, texts: dict, described: dict) -> dict:
    previous = read_results(out)
    done_before = previous.get("steps_done", {})
    run = _start(cfg, out, None if argv is None else list(argv), texts, described)
    if "noise" in configs:  # a bad --noise-group fails now, not after hours of fine-tuning and pruning
        importlib.import_module(STEPS["noise"].module).select_params(run.model, configs["noise"].group)
    if configs.get("export") and configs["export"].quant_format != "dequantized" and cfg.run.save_variants:
        raise C.UserError("--export-quant-format compressed-tensors needs the quantized variant's codes; "
                          "--save-variants stores it dense: drop one of the two")
    if "prune" in configs:  # an N:M pattern the model's widths cannot take fails now, before calibration
        importlib.import_module(STEPS["prune"].module).check_pattern_fits(run.model, configs["prune"].pattern)
    run.results["manifest"]["carried_over"] = _carry_over(run, configs, previous)
    manifest, device = run.results["manifest"], LM.input_device(run.model)
    prev_fp, chain_intact = "load", True
    for step, config in configs.items():
        tb = time.perf_counter()
        fp = _fingerprint(run, step, config, prev_fp)
        same = chain_intact and done_before.get(step) == fp
        skip = same and _restore(run, step, previous)
        chain_intact = same
        manifest["bookkeeping_s"] += time.perf_counter() - tb
        t = time.perf_counter()
        if skip:
            log.info("step %s: unchanged since the last run, skipped", step)
        else:
            log.info("step %s", step)
            LM.reset_peak_memory(device)
            C.seed_everything(cfg.run.seed)  # each step starts from the same RNG state, resumed or not
            STEPS[step].adapter(run, importlib.import_module(STEPS[step].module), config)
        tb = time.perf_counter()
        manifest["steps"][step] = {"wall_s": tb - t, "peak_memory_mb": LM.peak_memory_mb(device), "skipped": skip}
        run.results["steps_done"][step], prev_fp = fp, fp
        run.save()
        manifest["bookkeeping_s"] += time.perf_counter() - tb
    t = time.perf_counter()
    run.results["plots"] = make_plots(IO.to_strict_json(run.results), out)
    manifest["plots_s"] = time.perf_counter() - t
    run.save()
    if C.dist_rank_world()[0] == 0:
        md, html_path = write_report(IO.to_strict_json(run.results), out)
        log.info("wrote %s, %s and %s", out / "results.json", md, html_path)
    return run.results


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(OneLineParser(prog="llm_main_v4.py", description=__doc__.splitlines()[0]))


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point. Returns 0 on success, 2 on bad input (one error line, no traceback)."""
    try:
        cfg = from_args(build_parser().parse_args(argv))
        C.setup_logging(cfg.run.log_level)
        with IO.sigint_as_interrupt():  # --report-only and --compare: results.json files alone, no model
            out = Path(cfg.run.output_dir)
            with IO.private_umask():
                results = (rebuild_report(out) if cfg.run.report_only else compare_runs(cfg.run.compare, out)
                           if cfg.run.compare else run_pipeline(cfg, sys.argv[1:] if argv is None else argv))
    except C.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # temporaries are gone (atomic writes clean up); finished steps are kept
        print("error: interrupted; run the same command again to resume from the finished steps", file=sys.stderr)
        return 130
    for name, ppl in results.get("perplexity", {}).items():
        print(f"{name}: perplexity {fmt(ppl)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
