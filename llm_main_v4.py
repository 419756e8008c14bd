"""Orchestrator: load or fine-tune a causal LM, then prune, quantize, perturb, evaluate, export, attack, analyse.

    python llm_main_v4.py                       # every step on the embedded SmolLM2-135M
    python llm_main_v4.py --steps eval --dataset wiki.test.raw --seq-len 2048
    run_pipeline(PipelineConfig(prune=PruneConfig(sparsity=0.6)))   # from Python; configs: llm_config

Only this module parses argv, with flags generated from the configs (``llm_cli``). It reads top
to bottom: check (every check that needs no model), load, the plan (``llm_plan``: variants, units
and the estimated time; ``--dry-run`` stops here), the steps (known only through ``llm_steps``'
registry and hooks; skipped, carried over or dropped as stale by ``llm_resume``'s rules), the
robustness matrix, the plots and the report.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import llm_common as C
import llm_data as D
import llm_io as IO
import llm_model as LM
import llm_plan as P
import llm_steps
from llm_cli import OneLineParser, add_arguments, command_line, from_args, warn_ignored
from llm_compare import compare_runs
from llm_config import ALL_STEPS, PipelineConfig
from llm_presets import PRESETS
from llm_matrix import finalize, power_table, robustness_matrix
from llm_plots import make_plots
from llm_report import rebuild_report, summary_table, write_report
from llm_resume import Resume
from llm_resume import inputs as resume_inputs
from llm_run import Run
from llm_steps import STEPS
from llm_tracking import Trackers

log = logging.getLogger("llm.main")


def run_pipeline(cfg: PipelineConfig, argv: Optional[list] = None) -> dict:
    """Run the configured steps in order, resuming from ``<output_dir>/results.json`` by
    ``llm_resume``'s rules: a step whose fingerprint matches the saved one is skipped and its
    recorded results kept. A second run on the same output directory is refused while this one
    holds its lock (under ``accelerate launch`` / torchrun the launch's rank 0 holds it for all
    ranks). With ``--dry-run``: {"plan": ``llm_plan.estimate``}, and nothing written, no lock taken."""
    out = Path(cfg.run.output_dir)
    with IO.private_umask():
        configs, texts, described = _check_before_loading(cfg, out)
        if cfg.run.dry_run:
            return {"plan": IO.to_strict_json(P.estimate(_load(cfg, out, argv, texts, described, configs), configs))}
        with IO.output_lock(out) if C.launch_rank() == 0 else contextlib.nullcontext(), IO.writing_into(out):
            return _run(cfg, argv, out, configs, texts, described)


def _run(cfg: PipelineConfig, argv: Optional[list], out: Path, configs: dict, texts: dict, described: dict) -> dict:
    resume = Resume(out)  # what an earlier run left, read before this one writes anything
    IO.clean_stale_temps(out)
    run = _load(cfg, out, argv, texts, described, configs)
    manifest = run.results["manifest"]
    resume.carry_over(run, configs)  # first: the plan counts the variants that earlier runs made
    manifest["estimate"] = IO.to_strict_json(P.estimate(run, configs))
    for line in P.plan_lines(manifest["estimate"]):
        log.info("%s", line)
    with Trackers(cfg.run.log_to, out, out.resolve().name, IO.to_strict_json(asdict(cfg))) as trackers:
        for step, config in configs.items():
            resume.drop_stale(run, before=step)
            inputs = resume_inputs(run, step)
            _run_step(run, step, config, resume, trackers.open)
            run.results["steps_after"][step] = inputs
            resume.write_config(run)  # after results.json: a failed write leaves both as they were
            if manifest["steps"][step]["skipped"] is not True:  # a skipped step's numbers are logged already
                trackers.step(step, run.results)
    resume.finish(run)
    # The run's one test family (every step's paired tests and the contrasts, adjusted together, in
    # place), then the variant x measure matrix derived from the sections (a rerun of any step redraws both).
    family = finalize(run.results, cfg.run.multiple_testing, cfg.run.contrast)
    for w in family.pop("warnings"):
        log.warning("%s", w)
    matrix = robustness_matrix(IO.to_strict_json(run.results))
    run.results["robustness"] = {**matrix, **IO.to_strict_json(family), "power": power_table(matrix)}
    t = time.perf_counter()
    run.results["plots"] = make_plots(IO.to_strict_json(run.results), out)
    manifest["plots_s"] = time.perf_counter() - t
    manifest["peak_rss_mib"] = LM.peak_rss_mib()  # the whole run's, plots included: what the OS reports
    run.save()
    resume.write_config(run)
    if C.dist_rank_world()[0] == 0:
        md, html_path = write_report(IO.to_strict_json(run.results), out)
        log.info("wrote %s, %s and %s", out / "results.json", md, html_path)
    return run.results


def _run_step(run: Run, step: str, config, resume: Resume, starting=lambda: None) -> None:
    """Run one step, or skip it when ``resume`` finds it unchanged since the last run and its
    results can be had; ``starting()`` is called before a step that runs. Records its wall time,
    memory and fingerprint in results.json, and its actual time beside the estimate."""
    manifest, device = run.results["manifest"], LM.input_device(run.model)
    tb = time.perf_counter()
    fp, skip = resume.unchanged(run, step, config)
    manifest["bookkeeping_s"] += time.perf_counter() - tb
    t = time.perf_counter()
    if skip:
        log.info("step %s: unchanged since the last run, skipped", step)
    else:
        log.info("step %s", step)
        starting()
        LM.reset_peak_memory(device)
        C.seed_everything(run.cfg.run.seed)  # each step starts from the same RNG state, resumed or not
        # "off": the step was switched off and made nothing; it is recorded so, never as run.
        skip = "off" if llm_steps.hook(step, "pipeline_step")(run, config) == "off" else False
    tb = time.perf_counter()
    manifest["steps"][step] = {"wall_s": tb - t, **LM.memory_record(device), "skipped": skip}
    if skip is False:  # a step skipped as unchanged took no time to compare with its estimate
        manifest["estimate"]["steps"][step]["actual_s"] = tb - t
    run.results["steps_done"][step] = fp
    run.save()
    manifest["bookkeeping_s"] += time.perf_counter() - tb


# The folders a run writes into under --output-dir (each refused before loading if it links elsewhere).
OUTPUT_FOLDERS = ("checkpoints", "finetuned", "export", "plots", "tables", "stale", "tensorboard")


def _check_before_loading(cfg: PipelineConfig, out: Path) -> tuple[dict, dict, dict]:
    """Every check that needs no model: bad input fails in one line before minutes of loading.
    Returns the resolved configs of the steps to run, the texts they read, and their description."""
    rc = cfg.run
    rc.validate()
    device = LM.resolve_device(rc.device)
    LM.resolve_dtype(rc.dtype, device)
    gpu = rc.budget == "gpu" or (rc.budget == "auto" and device.type == "cuda")
    configs = {s: getattr(cfg, s).resolved(gpu) for s in (rc.steps or ALL_STEPS)}
    if rc.smoke:  # budgets cut after they are filled: a preset's or a config's values too
        configs = {s: c.smoke() for s, c in configs.items()}
    for c in configs.values():
        c.validate()
    warn_ignored(cfg, configs)
    IO.ensure_writable_dir(out, "--output-dir")
    for sub in OUTPUT_FOLDERS:  # one linked out of the folder: refused now, not after the steps that write it
        IO.check_inside(out / sub / "x", out)
    texts, described = D.load_texts(rc.dataset, rc.train_dataset, {c for s in configs for c in STEPS[s].corpora},
                                    rc.no_fallback, rc.allow_overlap, default_train="c4" if gpu else "wikitext2",
                                    local=rc.data_dir)
    for step, config in configs.items():
        prepare = llm_steps.hook(step, "prepare")
        if prepare:  # ``asked``: the config as given, its budgets not yet filled
            configs[step] = prepare(config, getattr(cfg, step), rc, texts)
            configs[step].validate()
    P.check_variant_patterns(configs, out)
    return configs, texts, described


def _load(cfg: PipelineConfig, out: Path, argv: Optional[list], texts: dict, described: dict, configs: dict) -> Run:
    """Seed, load the model, refuse what it or its tokenizer cannot take (every step's
    ``check_model`` / ``check_tokenizer``), and open the results with the run's provenance."""
    rc = cfg.run
    C.init_distributed_from_env()  # no-op unless started by accelerate launch / torchrun
    C.make_deterministic(rc.seed)
    device = LM.resolve_device(rc.device)
    run = Run(cfg=cfg, out=out, texts=texts)
    t0 = time.perf_counter()
    run.model, run.tokenizer, run.label = LM.load_model(LM.LoadConfig(
        model=rc.model, device=rc.device, dtype=rc.dtype, device_map=rc.device_map, max_memory=rc.max_memory,
        trust_remote_code=rc.trust_remote_code, cache_dir=rc.cache_dir))
    LM.check_vocabulary(run.model, run.tokenizer, run.label)
    dtype = str(LM.resolve_dtype(rc.dtype, device))
    run.results.update(seed=rc.seed, smoke=rc.smoke, argv=None if argv is None else list(argv),
                       steps=list(rc.steps or ALL_STEPS), device=str(device), dtype=dtype,
                       versions=C.library_versions(), python=platform.python_version(), steps_done={},
                       model=run.label, parameters=sum(p.numel() for p in run.model.parameters()),
                       model_identity=LM.model_identity(run.model, run.label), dataset=described)
    if rc.preset:  # the report states the protocol: "as <paper>, except: <the fields you changed>"
        p = PRESETS[rc.preset]
        run.results["preset"] = {"name": rc.preset, "paper": p.paper, "code": p.code,
                                 "overridden": list(rc.preset_overrides), "differs": list(p.differs)}
    run.results["manifest"] = {"command": command_line(cfg, argv), "git_commit": C.git_commit(),
        "versions": run.results["versions"], "device": str(device), "dtype": dtype, "seeds": {"seed": rc.seed},
        "steps": {"load": {"wall_s": time.perf_counter() - t0, **LM.memory_record(device)}},
        "bookkeeping_s": 0.0}
    for step, config in configs.items():  # a bad group or N:M pattern fails now, not after hours
        (llm_steps.hook(step, "check_model") or (lambda *_: None))(run.model, config)
        (llm_steps.hook(step, "check_tokenizer") or (lambda *_: None))(run.tokenizer, config)
    return run


# Shown at the end of --help; tests/test_readme.py runs each one (on a tiny model, with --smoke).
EXAMPLES = """examples (inside the venv: source .venv/bin/activate, or call .venv/bin/python):
  # the whole pipeline on the embedded SmolLM2-135M; results, plots and report.html in data/
  python llm_main_v4.py
  # try Wanda's published protocol small (every budget cut), before running it big
  python llm_main_v4.py --preset wanda --smoke --output-dir runs/wanda-smoke
  # a compression study: 4 pruned variants, each and the dense model quantized at 4 and 3 bits
  python llm_main_v4.py --steps prune,quantize,eval --prune-method wanda,sparsegpt --sparsity-pattern unstructured,2:4 --quant-method gptq --wbits 4,3 --quantize-from 'live,pruned[*]' --output-dir runs/study
  # perplexity only, on your own copy of WikiText-2 (DIR/wikitext-2-raw/wiki.test.raw)
  python llm_main_v4.py --steps eval --data-dir DIR --output-dir runs/ppl
  # two finished runs side by side, and a report rebuilt from results.json alone
  python llm_main_v4.py --compare data runs/study --output-dir runs/cmp
  python llm_main_v4.py --report-only --output-dir runs/study
"""


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(OneLineParser(prog="llm_main_v4.py", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                       formatter_class=argparse.RawDescriptionHelpFormatter))


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point. Returns 0 on success, 2 on bad input (one error line, no traceback)."""
    try:
        ns = build_parser().parse_args(argv)
        cfg = from_args(ns)
        C.setup_logging(cfg.run.log_level)
        with IO.sigint_as_interrupt():  # --report-only and --compare: results.json files alone, no model
            out = Path(cfg.run.output_dir)
            with IO.private_umask():
                if cfg.run.compare:
                    done = compare_runs(cfg.run.compare, out, output_dir_given=ns.output_dir is not None)
                    print(done["markdown"].rsplit("\n\n![", 1)[0])  # the table (and its warnings) on stdout too
                    print(f"\nwrote {out / 'compare.md'} and {out / 'compare.html'}")
                    return 0
                results = (rebuild_report(out) if cfg.run.report_only else
                           run_pipeline(cfg, sys.argv[1:] if argv is None else argv))
    except C.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused (read-only, no permission, gone): its one line, no traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or C.error_line(e)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # temporaries are gone (atomic writes clean up); finished steps are kept
        print("error: interrupted; run the same command again to resume from the finished steps", file=sys.stderr)
        return 130
    if cfg.run.dry_run and not cfg.run.report_only:  # the plan, and nothing run
        print("\n".join(P.plan_lines(results["plan"])) + "\n\ndry run: no step was run")
    elif C.dist_rank_world()[0] == 0:  # under accelerate launch every rank holds the same results
        print(f"{summary_table(results)}\n\nreport: {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
