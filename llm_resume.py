"""Resuming into an output folder: which steps are skipped, what is carried over, what goes stale.

The rules, which ``llm_main_v4`` applies around its step loop through ``Resume``:

- **Fingerprint.** Each step's fingerprint is stored in ``results.json`` (``steps_done``) as it
  finishes. It covers the step's whole resolved config (``StepConfig.fingerprint_dict``: every
  field that can change a number), the SHA-256 of every text the step reads (``llm_steps.STEPS``
  names them), the model's identity, device and dtype, ``--device-map``, and the fingerprint of
  the nearest earlier step on record (else "load"). A rerun skips a step whose fingerprint equals
  the stored one while every earlier step of this run was skipped too, and its results can be had
  (its files are there; a variant step's variants attach again). Any change reruns that step and
  every later one.
- **Carried over.** The steps this run does not run keep what an earlier run into the folder
  recorded (their sections, fingerprints, ``steps_after``, and their variants, re-attached), as
  long as it was made from the same model identity, device and dtype; results of another model are
  written aside as ``results.json.other-model-<time>``, never mixed in nor silently dropped.
  ``manifest.carried_over`` lists the steps carried.
- **Stale.** ``steps_after`` records the fingerprints of the earlier steps each step was built
  on. A carried-over step built on other results of an earlier step than the folder now holds
  (``--steps prune --sparsity 0.7`` into a folder evaluated at 0.5) is dropped with a warning, and
  the earlier file kept as ``results.json.stale``; later carried steps built on it follow. A variant
  step added since drops nothing: the other variants' results still hold. Export folders no
  longer listed in ``results.json`` move to ``<out>/stale/export/`` (only folders the tool wrote).
- **config.yaml** is written after ``results.json`` (a failed write leaves both as they were): this
  run's config, its steps widened to the carried-over ones with their earlier sections, so
  ``--config`` on it reproduces ``results.json``.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional

import llm_common as C
import llm_io as IO
import llm_results as R
import llm_steps
from llm_cli import read_config_file, write_config
from llm_config import ALL_STEPS
from llm_knobs import fingerprint
from llm_run import Run
from llm_steps import STEPS

log = logging.getLogger("llm.main")


def step_fingerprint(run: Run, step: str, config, previous: str) -> str:
    """The step's whole config, the hashes of the texts it reads, the model's identity and
    the previous step's fingerprint (so a change reruns this step and every later one); hex text."""
    texts = {c: run.texts[c].sha256 for c in STEPS[step].corpora}
    common = {k: run.results[k] for k in ("device", "dtype", "model_identity")}
    return fingerprint(step, previous, config.fingerprint_dict(), texts, common, run.cfg.run.device_map)


def inputs(run: Run, step: str) -> dict:
    """{earlier step: its fingerprint} of the steps before ``step`` whose results this directory
    holds (run now or carried over from an earlier run): what the step is built on."""
    done = run.results["steps_done"]
    return {s: done[s] for s in ALL_STEPS[:ALL_STEPS.index(step)] if s in done}


def built_on(run: Run, step: str) -> str:
    """The fingerprint a step chains on: the nearest earlier step's (whose own chains on the ones
    before it), else "load". So ``--steps zeroshot`` after a changed prune reruns."""
    return ([*inputs(run, step).values()] or ["load"])[-1]


class Resume:
    """What an earlier run left in ``out`` (its results.json and config.yaml, read once, before this
    run writes anything), and the rules above applied to this run's ``Run``."""

    def __init__(self, out: Path):
        self.out = out
        self.previous = R.read_results(out)
        self.done_before = self.previous.get("steps_done", {})
        self.earlier_sections = _earlier_config(out) if self.previous else {}
        self.chain_intact = True  # every step of this run so far was unchanged

    def unchanged(self, run: Run, step: str, config) -> tuple[str, bool]:
        """(the step's fingerprint, whether it is skipped): skipped when the fingerprint equals the
        one it finished with last time, every earlier step of this run was unchanged too, and its
        recorded results (and variants) could be restored into ``run``."""
        fp = step_fingerprint(run, step, config, built_on(run, step))
        same = self.chain_intact and self.done_before.get(step) == fp
        self.chain_intact = same
        return fp, bool(same and self._restore(run, step))

    def _restore(self, run: Run, step: str) -> bool:
        """Reuse a skipped step's recorded sections and its variant, if that can still be had; a
        step whose files are gone (a removed export) reruns."""
        run.results.update({k: self.previous[k] for k in R.STEP_SECTIONS[step] if k in self.previous})
        present = llm_steps.hook(step, "outputs_present")
        if present is not None and not present(run):
            log.info("step %s: its files are gone, running it again", step)
            return False
        return step != "finetune" and (not STEPS[step].variants or _attach(run, step))  # finetune reloads its model

    def carry_over(self, run: Run, configs: dict) -> None:
        """Keep what earlier runs into this directory recorded for the steps this run does not run
        (``--steps zeroshot`` into a finished run keeps its perplexities, pruning and exports), and
        re-attach their variants, so later steps still see them; sets ``steps_after`` and
        ``manifest.carried_over``. Only results of this very model, device and dtype are kept; others
        are set aside as a file, never dropped silently."""
        run.results["steps_after"] = {}
        run.results["manifest"]["carried_over"] = self._carried(run, configs)

    def _carried(self, run: Run, configs: dict) -> list:
        previous = self.previous
        done = previous.get("steps_done") or {}
        others = [s for s in ALL_STEPS if s not in configs and s in done]
        if not others:
            return []
        keys = ("model_identity", "device", "dtype")
        if {k: IO.to_strict_json(previous.get(k)) for k in keys} != {k: IO.to_strict_json(run.results.get(k)) for k in keys}:
            aside = run.out / f"results.json.other-model-{int(time.time())}"
            IO.write_json(aside, previous)
            log.warning("the results of steps %s in %s were made from another model, device or dtype; not kept in "
                        "results.json (saved as %s)", ", ".join(others), run.out, aside.name)
            return []
        for step in others:
            run.results.update({k: previous[k] for k in R.STEP_SECTIONS[step] if k in previous})
            run.results["steps_done"][step] = done[step]
            if isinstance(previous.get("steps_after"), dict) and isinstance(previous["steps_after"].get(step), dict):
                run.results["steps_after"][step] = previous["steps_after"][step]
            reattach = llm_steps.hook(step, "reattach")
            if reattach:
                reattach(run)
            elif STEPS[step].variants and isinstance(run.results.get(step), dict):
                parent = run.results[step].get("parent", run.live)
                if not _attach(run, step):  # a file is gone, or the parent it was made on is not in this run
                    names = list(llm_steps.hook(step, "variants_of")(run, run.results[step]))
                    for name in names:
                        run.variants.pop(name, None)
                    log.warning("the %s variants of the earlier run cannot be had (a file is gone or their parent "
                                "%s is not in this run); later steps leave them out", ", ".join(names), parent)
        log.info("kept the recorded results of steps %s (not run this time)", ", ".join(others))
        return others

    def drop_stale(self, run: Run, before: Optional[str] = None) -> None:
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
            on = after.get(step)  # None: an older results.json, which did not say
            if not isinstance(on, dict):
                continue
            changed = [s for s in ALL_STEPS[:ALL_STEPS.index(step)] if s in on and done.get(s) != on[s]]
            if not changed:
                # A variant step added since (``--steps noise`` into a finished run) made new variants; what
                # this step measured of the others still holds, so it is kept: only the new ones lack it.
                added = [s for s in ALL_STEPS[:ALL_STEPS.index(step)] if s in done and s not in on
                         and STEPS[s].variants]
                if added and not getattr(run, f"noted_{step}", False):
                    log.info("step %s: its recorded results are kept; the variants of step %s, added since, are not "
                             "among them (run --steps %s to measure them too)", step, ", ".join(added), step)
                    setattr(run, f"noted_{step}", True)
                continue
            if STEPS[step].variants and isinstance(run.results.get(step), dict):
                for name in llm_steps.hook(step, "variants_of")(run, run.results[step]):
                    run.variants.pop(name, None)
            for k in R.STEP_SECTIONS[step]:
                run.results.pop(k, None)
            done.pop(step), after.pop(step), carried.remove(step)
            aside = run.out / "results.json.stale"
            if C.dist_rank_world()[0] == 0 and not getattr(run, "stale_kept", False):  # once per run: the latest
                IO.write_json(aside, self.previous)
                run.stale_kept = True
            log.warning("step %s: its recorded results were not made on what step(s) %s now hold; left out "
                        "(kept in %s). Run --steps %s to measure them again",
                        step, ", ".join(changed), aside.name, step)

    def finish(self, run: Run) -> None:
        """After the last step: drop every carried step now stale, and set aside the exports that
        results.json no longer lists."""
        self.drop_stale(run)
        _set_aside_stale_exports(run)

    def write_config(self, run: Run) -> None:
        """config.yaml of what results.json now holds: this run's config, its steps widened to the
        carried-over ones, whose sections come from the earlier config.yaml; ``--config`` on it
        reproduces results.json. Call it after ``run.save()``."""
        if C.dist_rank_world()[0] != 0:
            return
        done, cfg, earlier = run.results["steps_done"], run.cfg, self.earlier_sections
        carried = [s for s in run.results["manifest"]["carried_over"] if s in done and s in earlier]
        parts = {s: type(getattr(cfg, s))(**earlier[s]) for s in carried}
        steps = tuple(s for s in ALL_STEPS if s in done or s in (cfg.run.steps or ALL_STEPS))
        run_part = dataclasses.replace(cfg.run, steps=() if steps == ALL_STEPS else steps)
        write_config(dataclasses.replace(cfg, run=run_part, **parts), run.out / "config.yaml")


def _attach(run: Run, step: str) -> bool:
    """Point the step's variants (one, or one per point of a grid) at their records; False if a
    file is gone."""
    section = run.results[step]
    if section.get("status") == "off":  # the step ran and made no variant (--quant-method none)
        return True
    found = llm_steps.hook(step, "variants_of")(run, section)
    records = {r.get("name"): r for r in section.get("grid") or [] if isinstance(r, dict)}  # each its own parent
    return all([run.add_variant(name, w, records.get(name, section).get("parent")) for name, w in found.items()])


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
