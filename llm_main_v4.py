"""Orchestrator: load or fine-tune a causal LM, then prune, quantize, perturb, evaluate, export, attack, analyse.

    python llm_main_v4.py                       # every step on the embedded SmolLM2-135M
    python llm_main_v4.py --steps eval --dataset wiki.test.raw --seq-len 2048
    run_pipeline(PipelineConfig(prune=PruneConfig(sparsity=0.6)))   # from Python; configs: llm_config

Only this module parses argv, with flags generated from the configs (``llm_cli``). It knows
the steps only through the registry below and the hooks each step module exposes:

    pipeline_step(run, config) -> None | "off"   the step on the shared ``llm_run.Run``
    variants_of(run, section)                    a variant step's {name: weights} from its record
    check_model(model, config)                   optional: refuse right after loading
    check_tokenizer(tokenizer, config)           optional: the same, for what the tokenizer lacks
    prepare(config, asked, run_config, texts)    optional: the config once the texts are read
    outputs_present(run)                         optional: False reruns a skipped step
    reattach(run)                                optional: an earlier run's live model back

What stays here is generic: resume by fingerprint, carrying results over, the manifest.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import llm_common as C
import llm_data as D
import llm_io as IO
import llm_model as LM
import llm_results as R
import llm_variants as V
from llm_cli import OneLineParser, add_arguments, from_args, read_config_file, write_config
from llm_compare import compare_runs
from llm_config import ALL_STEPS, PipelineConfig
from llm_presets import PRESETS
from llm_knobs import fingerprint, flag_of, parse_variant_patterns
from llm_matrix import finalize, power_table, robustness_matrix
from llm_plots import make_plots
from llm_report import rebuild_report, summary_table, write_report
from llm_results import STEP_SECTIONS, read_results
from llm_run import Run
from llm_tracking import Trackers

log = logging.getLogger("llm.main")


@dataclass(frozen=True)
class Step:
    module: str                   # imported when the step runs: --report-only loads no step module
    corpora: tuple                # texts it reads: their hashes enter its fingerprint
    variants: bool = False        # whether it makes variants (``variants_of`` gives them back)


# The registry: one row per step, in pipeline order. Configs: llm_config.STEP_CONFIGS; the
# results.json sections each writes: llm_results.STEP_SECTIONS; plots: llm_plots.
STEPS = {
    "finetune": Step("llm_finetune", ("train",)),
    "prune": Step("llm_prune_model", ("train",), variants=True),
    "quantize": Step("llm_quantize_model", ("train",), variants=True),
    "noise": Step("llm_robustness_test", ("eval", "train"), variants=True),
    "eval": Step("llm_evaluate_models", ("eval",)),
    "zeroshot": Step("llm_zeroshot", ()),
    "export": Step("llm_export", ()),
    "adversarial": Step("llm_adversarial_test", ("eval",)),
    "analysis": Step("llm_integrated_analysis", ("train", "eval")),
}


def _hook(step: str, name: str):
    return getattr(importlib.import_module(STEPS[step].module), name, None)


def run_pipeline(cfg: PipelineConfig, argv: Optional[list] = None) -> dict:
    """Run the configured steps in order, resuming from ``<output_dir>/results.json``: a step
    whose fingerprint matches the saved one is skipped and its recorded results kept. A second
    run on the same output directory is refused while this one holds its lock (under
    ``accelerate launch`` / torchrun the launch's rank 0 holds it for all ranks)."""
    out = Path(cfg.run.output_dir)
    with IO.private_umask():
        configs, texts, described = _check_before_loading(cfg, out)
        with IO.output_lock(out) if C.launch_rank() == 0 else contextlib.nullcontext(), IO.writing_into(out):
            return _run(cfg, argv, out, configs, texts, described)


def _run(cfg: PipelineConfig, argv: Optional[list], out: Path, configs: dict, texts: dict, described: dict) -> dict:
    previous = read_results(out)
    done_before = previous.get("steps_done", {})
    earlier_sections = _earlier_config(out) if previous else {}
    run = _start(cfg, out, None if argv is None else list(argv), texts, described)
    for step, config in configs.items():  # a bad group or N:M pattern fails now, not after hours
        (_hook(step, "check_model") or (lambda *_: None))(run.model, config)
        (_hook(step, "check_tokenizer") or (lambda *_: None))(run.tokenizer, config)
    run.results["steps_after"] = {}
    run.results["manifest"]["carried_over"] = _carry_over(run, configs, previous)
    manifest, chain_intact = run.results["manifest"], True
    with Trackers(cfg.run.log_to, out, out.resolve().name, IO.to_strict_json(asdict(cfg))) as trackers:
        for step, config in configs.items():
            _drop_stale(run, previous, before=step)
            inputs = _inputs(run, step)
            _, same = _run_step(run, step, config, _built_on(run, step), chain_intact and done_before.get(step),
                                previous, trackers.open)
            run.results["steps_after"][step] = inputs
            _write_config(run, earlier_sections)  # after results.json: a failed write leaves both as they were
            chain_intact = chain_intact and same
            if manifest["steps"][step]["skipped"] is not True:  # a skipped step's numbers are logged already
                trackers.step(step, run.results)
    _drop_stale(run, previous)
    _set_aside_stale_exports(run)
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
    _write_config(run, earlier_sections)
    if C.dist_rank_world()[0] == 0:
        md, html_path = write_report(IO.to_strict_json(run.results), out)
        log.info("wrote %s, %s and %s", out / "results.json", md, html_path)
    return run.results


def _run_step(run: Run, step: str, config, prev_fp: str, done_fp: Optional[str], previous: dict,
              starting=lambda: None) -> tuple[str, bool]:
    """Run one step, or skip it when its fingerprint equals the one it finished with last time
    (``done_fp``, None when the chain of earlier steps changed) and its results can be had;
    ``starting()`` is called before a step that runs. Returns (its fingerprint, whether it was unchanged)."""
    manifest, device = run.results["manifest"], LM.input_device(run.model)
    tb = time.perf_counter()
    fp = _fingerprint(run, step, config, prev_fp)
    same = done_fp == fp
    skip = same and _restore(run, step, previous)
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
        skip = "off" if _hook(step, "pipeline_step")(run, config) == "off" else False
    tb = time.perf_counter()
    manifest["steps"][step] = {"wall_s": tb - t, **_memory(device), "skipped": skip}
    run.results["steps_done"][step] = fp
    run.save()
    manifest["bookkeeping_s"] += time.perf_counter() - tb
    return fp, same


def _memory(device) -> dict:
    """What memory a step's manifest entry names, each by what it measures: the process's peak RSS so
    far (host memory, as the OS reports it) and, on CUDA, the torch allocator's peak in the step."""
    cuda = {"peak_cuda_allocated_mib": LM.peak_memory_mb(device)} if device.type == "cuda" else {}
    return {"peak_rss_mib": LM.peak_rss_mib(), **cuda}


def _inputs(run: Run, step: str) -> dict:
    """{earlier step: its fingerprint} of the steps before ``step`` whose results this directory
    holds (run now or carried over from an earlier run): what the step is built on."""
    done = run.results["steps_done"]
    return {s: done[s] for s in ALL_STEPS[:ALL_STEPS.index(step)] if s in done}


def _built_on(run: Run, step: str) -> str:
    """The fingerprint a step chains on: the nearest earlier step's (whose own chains on the ones
    before it), else "load". So ``--steps zeroshot`` after a changed prune reruns."""
    return ([*_inputs(run, step).values()] or ["load"])[-1]


def _drop_stale(run: Run, previous: dict, before: Optional[str] = None) -> None:
    """Leave out the carried-over steps (those before ``before``, or all) built on other results
    of an earlier step than this directory now holds: ``--steps prune --sparsity 0.7`` into a folder
    evaluated at 0.5 drops the 0.5 perplexities rather than show them beside the 0.7 mask. Later
    carried steps built on a dropped one follow. The earlier file is kept aside. A variant step
    added since (``--steps noise``) drops nothing: the results of the other variants still hold,
    and the new variants simply have none yet."""
    after, done, carried = run.results["steps_after"], run.results["steps_done"], run.results["manifest"]["carried_over"]
    for step in [s for s in ALL_STEPS if s in carried]:
        if before and ALL_STEPS.index(step) >= ALL_STEPS.index(before):
            break
        built_on = after.get(step)  # None: an older results.json, which did not say
        if not isinstance(built_on, dict):
            continue
        changed = [s for s in ALL_STEPS[:ALL_STEPS.index(step)] if s in built_on and done.get(s) != built_on[s]]
        if not changed:
            # A variant step added since (``--steps noise`` into a finished run) made new variants; what
            # this step measured of the others still holds, so it is kept: only the new ones lack it.
            added = [s for s in ALL_STEPS[:ALL_STEPS.index(step)] if s in done and s not in built_on
                     and STEPS[s].variants]
            if added and not getattr(run, f"noted_{step}", False):
                log.info("step %s: its recorded results are kept; the variants of step %s, added since, are not "
                         "among them (run --steps %s to measure them too)", step, ", ".join(added), step)
                setattr(run, f"noted_{step}", True)
            continue
        if STEPS[step].variants and isinstance(run.results.get(step), dict):
            for name in _hook(step, "variants_of")(run, run.results[step]):
                run.variants.pop(name, None)
        for k in STEP_SECTIONS[step]:
            run.results.pop(k, None)
        done.pop(step), after.pop(step), carried.remove(step)
        aside = run.out / "results.json.stale"
        if C.dist_rank_world()[0] == 0 and not getattr(run, "stale_kept", False):  # once per run: the latest
            IO.write_json(aside, previous)
            run.stale_kept = True
        log.warning("step %s: its recorded results were not made on what step(s) %s now hold; left out "
                    "(kept in %s). Run --steps %s to measure them again",
                    step, ", ".join(changed), aside.name, step)


def _set_aside_stale_exports(run: Run) -> None:
    """An export folder that results.json no longer lists (its results dropped as stale, or the export
    now off) goes where stale results go: ``<out>/stale/export/<name>``. Only folders this tool's
    manifest says it wrote are moved; a folder of the user's in ``export/`` stays."""
    if C.dist_rank_world()[0] != 0:
        return
    listed = R.field(run.results, "export", "variants", kind=dict, default={})
    kept = {f"export/{Path(str(R.field(v, 'path', default=''))).name}" for v in listed.values()}
    moved = [rel for rel in sorted(IO.written(run.out)) if rel.startswith("export/") and rel.count("/") == 1
             and rel not in kept and IO.remove_written(run.out, rel, aside="stale")]
    if moved:
        log.warning("exports no longer in results.json moved to %s: %s", run.out / "stale" / "export",
                    ", ".join(m.split("/", 1)[1] for m in moved))


def _earlier_config(out: Path) -> dict:
    """The sections of the earlier run's config.yaml (those of its steps that this run carries over
    go into the new one), or {} when it is gone or unreadable."""
    try:
        return read_config_file(str(out / "config.yaml")) if (out / "config.yaml").is_file() else {}
    except C.UserError as e:
        log.warning("the earlier %s cannot be read (%s); config.yaml will hold this run's steps only",
                    out / "config.yaml", e)
        return {}


def _write_config(run: Run, earlier: dict) -> None:
    """config.yaml of what results.json now holds: this run's config, its steps widened to the
    carried-over ones, whose sections come from the earlier config.yaml; ``--config`` on it
    reproduces results.json."""
    if C.dist_rank_world()[0] != 0:
        return
    done, cfg = run.results["steps_done"], run.cfg
    carried = [s for s in run.results["manifest"]["carried_over"] if s in done and s in earlier]
    parts = {s: type(getattr(cfg, s))(**earlier[s]) for s in carried}
    steps = tuple(s for s in ALL_STEPS if s in done or s in (cfg.run.steps or ALL_STEPS))
    run_part = dataclasses.replace(cfg.run, steps=() if steps == ALL_STEPS else steps)
    write_config(dataclasses.replace(cfg, run=run_part, **parts), run.out / "config.yaml")


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
    _warn_ignored(cfg, configs)
    IO.ensure_writable_dir(out, "--output-dir")
    for sub in OUTPUT_FOLDERS:  # one linked out of the folder: refused now, not after the steps that write it
        IO.check_inside(out / sub / "x", out)
    texts, described = D.load_texts(rc.dataset, rc.train_dataset, {c for s in configs for c in STEPS[s].corpora},
                                    rc.no_fallback, rc.allow_overlap, default_train="c4" if gpu else "wikitext2",
                                    local=rc.data_dir)
    for step, config in configs.items():
        prepare = _hook(step, "prepare")
        if prepare:  # ``asked``: the config as given, its budgets not yet filled
            configs[step] = prepare(config, getattr(cfg, step), rc, texts)
            configs[step].validate()
    _check_variant_patterns(configs, out)
    return configs, texts, described


def _check_variant_patterns(configs: dict, out: Path) -> None:
    """Before loading: every variant pattern (``--robustness-variants``, ``--quantize-from``) must
    choose a variant that the run will hold when its step runs: the names the variant steps will make
    (each step's ``planned`` hook; a superset, so nothing valid is refused) and those an earlier run
    into ``out`` left. A typo, ``ALL`` or a variant of a step that is not run fails now, not after
    the steps before it ran."""
    try:  # never touched here: a results.json not ours is dealt with (moved aside) under the lock, later
        earlier = R.field(R.read_results(out, foreign=True), "variants", kind=dict, default={}) \
            if (out / "results.json").is_file() else {}
    except (OSError, ValueError):
        earlier = {}
    names, live = list(dict.fromkeys(["base", *map(str, earlier)])), "base"
    for step, config in sorted(configs.items(), key=lambda sc: ALL_STEPS.index(sc[0])):
        plan = _hook(step, "planned")
        if plan:
            names, live = plan(config, names, live)
        ignored = {flag for flag, _ in config.ignored()}
        for f in dataclasses.fields(config):
            flag = flag_of(type(config), f)
            if f.metadata.get("parse") is parse_variant_patterns and flag not in ignored:
                V.select_variants(names, getattr(config, f.name), live, flag=flag)


def _warn_ignored(cfg: PipelineConfig, configs: dict) -> None:
    """Name every setting that this run will not read, rather than drop it without a word: a
    field that the chosen method ignores (``StepConfig.applies``), and one of a step that is not
    run (unless a step that runs shares its flag). Preset values are not the user's: not named."""
    preset, given = PRESETS[cfg.run.preset].fields if cfg.run.preset else {}, set(cfg.run.flags_given)
    for step in configs:
        for flag, why in getattr(cfg, step).ignored(given):
            log.warning("%s has no effect here: %s", flag, why)
    read = {flag_of(type(c), f) for c in (cfg.run, *configs.values()) for f in dataclasses.fields(c)}
    unread = {}
    for step in (s for s in ALL_STEPS if s not in configs):
        part = getattr(cfg, step)
        for f in dataclasses.fields(part):
            flag = flag_of(type(part), f)
            changed = getattr(part, f.name) != preset.get(step, {}).get(f.name, f.default)
            if f.metadata.get("cli", True) and flag not in read and (flag in given or changed):
                unread.setdefault(step, []).append(flag)
    if unread:
        flags = ", ".join(dict.fromkeys(sum(unread.values(), [])))  # a flag two steps share: named once
        log.warning("%s: no effect here, as step %s is not run (--steps %s)", flags,
                    ", ".join(unread), ",".join(configs))


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
    _check_vocabulary(run.model, run.tokenizer, run.label)
    dtype = str(LM.resolve_dtype(rc.dtype, device))
    run.results.update(seed=rc.seed, smoke=rc.smoke, argv=argv, steps=list(rc.steps or ALL_STEPS), device=str(device), dtype=dtype,
                       versions=C.library_versions(), python=platform.python_version(), steps_done={},
                       model=run.label, parameters=sum(p.numel() for p in run.model.parameters()),
                       model_identity=LM.model_identity(run.model, run.label), dataset=described)
    if rc.preset:  # the report states the protocol: "as <paper>, except: <the fields you changed>"
        p = PRESETS[rc.preset]
        run.results["preset"] = {"name": rc.preset, "paper": p.paper, "code": p.code,
                                 "overridden": list(rc.preset_overrides), "differs": list(p.differs)}
    run.results["manifest"] = {"command": _command(cfg, argv), "git_commit": C.git_commit(),
        "versions": run.results["versions"], "device": str(device), "dtype": dtype, "seeds": {"seed": rc.seed},
        "steps": {"load": {"wall_s": time.perf_counter() - t0, **_memory(device)}},
        "bookkeeping_s": 0.0}
    return run


def _check_vocabulary(model, tokenizer, label: str) -> None:
    """A tokenizer whose ids run past the model's embedding rows (a tokenizer of another model, or
    tokens added without resizing) would fail deep inside a step on the first such id: one line now."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows, ids = getattr(emb, "num_embeddings", None), len(tokenizer) if tokenizer is not None else 0
    if rows is None or ids <= rows:
        return
    # Ids ordinary text or the pipeline itself produces (the base vocabulary, added tokens that are
    # not special, bos/eos/pad) must have rows; a special token only a tokenizer class adds by
    # default (Qwen2's unk <|endoftext|>, which byte-level BPE never emits) is a warning.
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    used = {i for i, t in added.items() if not getattr(t, "special", False)}
    used |= {getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")} - {None}
    if getattr(tokenizer, "vocab_size", 0) > rows or any(i >= rows for i in used):
        raise C.UserError(f"the tokenizer of {label} has {ids} token ids but the model's embedding has {rows} rows: "
                          "they do not belong together (tokens added without resize_token_embeddings?)")
    log.warning("the tokenizer of %s has special tokens without embedding rows (%s): text that holds them "
                "cannot be scored", label, ", ".join(str(t) for i, t in sorted(added.items()) if i >= rows))


def _command(cfg: PipelineConfig, argv: Optional[list]) -> str:
    """The command line as a shell would take it back (shlex: spaces and ``;`` stay inside their
    argument). Called from Python (a notebook: sys.argv is the kernel's), the config instead."""
    if argv is not None:
        return shlex.join(["python", "llm_main_v4.py", *map(str, argv)])
    changed = {name: {k: v for k, v in asdict(part).items() if v != asdict(type(part)()).get(k)}
               for name, part in vars(cfg).items()}
    return "run_pipeline(PipelineConfig(...)) called from Python, not from the command line; config changed " \
           "from the defaults: " + json.dumps(IO.to_strict_json({k: v for k, v in changed.items() if v}), sort_keys=True)


def _fingerprint(run: Run, step: str, config, previous: str) -> str:
    """The step's whole config, the hashes of the texts it reads, the model's identity and
    the previous step's fingerprint (so a change reruns this step and every later one)."""
    texts = {c: run.texts[c].sha256 for c in STEPS[step].corpora}
    common = {k: run.results[k] for k in ("device", "dtype", "model_identity")}
    return fingerprint(step, previous, config.fingerprint_dict(), texts, common, run.cfg.run.device_map)


def _restore(run: Run, step: str, previous: dict) -> bool:
    """Reuse a skipped step's recorded sections and its variant, if that can still be had; a
    step whose files are gone (a removed export) reruns."""
    run.results.update({k: previous[k] for k in STEP_SECTIONS[step] if k in previous})
    present = _hook(step, "outputs_present")
    if present is not None and not present(run):
        log.info("step %s: its files are gone, running it again", step)
        return False
    return step != "finetune" and (not STEPS[step].variants or _attach(run, step))  # finetune reloads its model


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
        run.results.update({k: previous[k] for k in STEP_SECTIONS[step] if k in previous})
        run.results["steps_done"][step] = done[step]
        if isinstance(previous.get("steps_after"), dict) and isinstance(previous["steps_after"].get(step), dict):
            run.results["steps_after"][step] = previous["steps_after"][step]
        reattach = _hook(step, "reattach")
        if reattach:
            reattach(run)
        elif STEPS[step].variants and isinstance(run.results.get(step), dict):
            parent = run.results[step].get("parent", run.live)
            if not _attach(run, step):  # a file is gone, or the parent it was made on is not in this run
                names = list(_hook(step, "variants_of")(run, run.results[step]))
                for name in names:
                    run.variants.pop(name, None)
                log.warning("the %s variants of the earlier run cannot be had (a file is gone or their parent "
                            "%s is not in this run); later steps leave them out", ", ".join(names), parent)
    log.info("kept the recorded results of steps %s (not run this time)", ", ".join(others))
    return others


def _attach(run: Run, step: str) -> bool:
    """Point the step's variants (one, or one per point of a grid) at their records; False if a
    file is gone."""
    section = run.results[step]
    if section.get("status") == "off":  # the step ran and made no variant (--quant-method none)
        return True
    found = _hook(step, "variants_of")(run, section)
    records = {r.get("name"): r for r in section.get("grid") or [] if isinstance(r, dict)}  # each its own parent
    return all([run.add_variant(name, w, records.get(name, section).get("parent")) for name, w in found.items()])


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
    if C.dist_rank_world()[0] == 0:  # under accelerate launch every rank holds the same results
        print(f"{summary_table(results)}\n\nreport: {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
