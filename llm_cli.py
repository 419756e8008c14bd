"""The command line and config files, generated from the config dataclasses.

    python llm_main_v4.py --sparsity 0.6 --prune-method sparsegpt
    python llm_main_v4.py --config data/config.yaml --seed 1      # a file, then flags over it

One flag per config field (``llm_knobs.flag_of``), grouped by step, with the real defaults
and budgets in ``--help``. A config file is YAML (read by PyYAML) with the same names: a
section per step holding field names (``prune: {sparsity: 0.6}``), or flag names at the top
level (``sparsity: 0.6``, ``prune-method: wanda``). Its values go through the very conversion
and checks that flag text does, so a file can say nothing a flag cannot. Every run writes
``config.yaml`` beside ``results.json``; ``--config`` on it reruns the run.

Why not jsonargparse, omegaconf or ``HfArgumentParser``: each brings a second type system over
the same dataclasses (omegaconf cannot hold ``protect``'s ``str | tuple``; ``HfArgumentParser``
reads one flat dataclass per file), while the fields here already carry their parsers, bounds
and budgets. YAML itself is read by PyYAML, which lm-eval and transformers already require.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shlex
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import yaml

import llm_io as IO
from llm_common import UserError
from llm_config import ALL_STEPS, STEP_CONFIGS, PipelineConfig, RunConfig
from llm_presets import PRESETS
from llm_knobs import flag_of, hints_of, parse_max_memory, parse_switch

log = logging.getLogger("llm.main")

SECTIONS = {"run": RunConfig, **STEP_CONFIGS}


def _default_text(cls: type, f: dataclasses.Field) -> str:
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    if f.metadata.get("budget") is not None:
        cpu, gpu = f.metadata["budget"]
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
            if hints[f.name] is bool and m.get("grid"):  # a switch that is also a grid axis: --flag, --flag off,on
                group.add_argument(flag, dest=dest, nargs="?", const="on", default=None, help=helptext,
                                   metavar="{on,off}[,...]")
            elif hints[f.name] is bool:
                group.add_argument(flag, dest=dest, action="store_true", default=None, help=helptext)
            elif m.get("many") == "+":  # one flag, several values: --compare A B C
                group.add_argument(flag, dest=dest, nargs="+", default=None, help=helptext)
            elif m.get("many"):
                group.add_argument(flag, dest=dest, action="append", default=None, help=helptext)
            elif hints[f.name] == Optional[bool]:
                group.add_argument(flag, dest=dest, choices=("on", "off", "auto"), default=None, help=helptext)
            else:
                choices = None if m.get("grid") else m.get("choices")  # a grid's items are checked one by one
                metavar = ("{" + ",".join(m["choices"]) + "}[,...]" if m.get("grid") and m.get("choices") else
                           None if choices else flag[2:].split("-")[-1].upper() + ("[,...]" if m.get("grid") else ""))
                group.add_argument(flag, dest=dest, default=None, choices=choices, help=helptext, metavar=metavar)
    return parser


def _convert(cls: type, f: dataclasses.Field, text):
    """Flag text -> field value; UserError naming the flag on bad text."""
    hint, m, flag = hints_of(cls)[f.name], f.metadata, flag_of(cls, f)
    if m.get("many") and isinstance(text, str):  # one text is one item, never its characters
        text = [text]
    if any(not str(t).strip() for t in (text if m.get("many") else [text])):
        raise UserError(f"{flag} must not be empty")  # an empty value never means anything here
    if m.get("grid") and "," in text:  # a grid: one variant per value
        items = [t.strip() for t in text.split(",")]
        if not all(items):
            raise UserError(f"{flag} must be a value or a comma list of values, got {text!r}")
        return tuple(_convert(cls, f, t) for t in items)
    try:
        if m.get("many"):
            return tuple(text)
        if m.get("parse"):
            return m["parse"](text)
        if hint in (bool, Optional[bool]):
            return parse_switch(text, tristate=hint != bool)
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
        want = str(e) if m.get("parse") or "finite" in str(e) or hint in (bool, Optional[bool]) else \
            kind.get(hint, "valid")
        raise UserError(f"{flag} must be {want}, got {text!r}")


def _value(cls: type, f: dataclasses.Field, v, where: str):
    """A YAML value (text: ``_ConfigLoader`` reads every scalar as written) -> field value, through
    the flag conversion; ``where`` names the key in errors."""
    m = f.metadata
    if v is None:
        return f.default
    if isinstance(v, (list, tuple)) and not v:
        return ()
    if isinstance(v, (list, tuple)):
        if any(isinstance(x, (list, dict)) for x in v):
            raise UserError(f"{where}: a list of plain values is expected, not nested lists or mappings")
        if not (m.get("many") or m.get("grid") or "tuple" in str(hints_of(cls)[f.name])):
            raise UserError(f"{where}: one value is expected, not a list")
        v = [str(x) for x in v] if m.get("many") else ",".join(map(str, v))
    elif isinstance(v, dict):  # --max-memory as a mapping
        if m.get("parse") is not parse_max_memory:
            raise UserError(f"{where}: a value is expected, not a mapping")
        v = ",".join(f"{k}={x}" for k, x in v.items())
    else:
        v = str(v)
    return _convert(cls, f, v)


def _flag_index() -> dict:
    """Flag name (and the field-style spelling with underscores) -> every (section, field) it sets."""
    index: dict = {}
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            if f.metadata.get("cli", True):
                flag = flag_of(cls, f)[2:]
                for key in {flag, flag.replace("-", "_")}:
                    index.setdefault(key, []).append((name, f))
    return index


class _ConfigLoader(yaml.SafeLoader):
    """A config file read as text, the way a flag is: every plain scalar stays the string it is
    written as (only an empty value, ``~`` and ``null`` are None), so the field's type reads it.
    YAML 1.1's guesses never reach a field: ``2:4`` is not the base-60 number 124, ``off`` not a
    boolean of a text field, ``0755`` not octal. A key given twice and anchors/aliases (a few
    hundred bytes of aliases expand to gigabytes) are refused."""

    yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag == "tag:yaml.org,2002:null"]
                               for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            raise yaml.MarkedYAMLError("in a config file", None, "anchors and aliases (&, *) are not read; "
                                       "write each value out", self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=True) for k, _ in node.value]
        twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if twice is not None:
            raise yaml.MarkedYAMLError("in a config file", None, f"{twice!r} is given twice", node.start_mark)
        return super().construct_mapping(node, deep=deep)


_MAX_CONFIG_BYTES = 1 << 20


def read_config_file(path: str) -> dict:
    """{section: {field: value}} of a YAML config file; UserError on a missing file, bad YAML, an
    unknown name, or a field set twice (a top-level flag and its section's field) to two values."""
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise UserError(f"--config: {path} is not a file")
    if p.stat().st_size > _MAX_CONFIG_BYTES:
        raise UserError(f"--config {path}: larger than {_MAX_CONFIG_BYTES} bytes; not a config file")
    try:
        doc = yaml.load(p.read_text(encoding="utf-8"), Loader=_ConfigLoader) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        mark = getattr(e, "problem_mark", None)
        why = getattr(e, "problem", None) or (str(e).splitlines() or ["nested too deeply"])[0]
        raise UserError(f"--config {path}: not valid YAML ({f'line {mark.line + 1}: ' if mark else ''}{why})")
    if not isinstance(doc, dict):
        raise UserError(f"--config {path}: expected a mapping of sections or flags, got {type(doc).__name__}")
    out: dict = {name: {} for name in SECTIONS}
    said: dict = {}  # (section, field) -> the key that set it
    index = _flag_index()

    def put(name: str, f: dataclasses.Field, value, where: str):
        v = _value(SECTIONS[name], f, value, f"--config {path}: {where}")
        if (name, f.name) in said and out[name][f.name] != v:
            raise UserError(f"--config {path}: {name}.{f.name} is set twice, by {said[name, f.name]} and by "
                            f"{where}; keep one")
        out[name][f.name], said[name, f.name] = v, where

    for key, value in doc.items():
        key = str(key).lstrip("-")
        if key in SECTIONS and isinstance(value, dict):
            known = {f.name: f for f in fields(SECTIONS[key]) if f.metadata.get("cli", True)}
            for k, v in value.items():
                if k not in known:
                    raise UserError(f"--config {path}: {key}.{k} is not a field of the {key} config")
                put(key, known[k], v, f"{key}.{k}")
        elif key in index:
            for name, f in index[key]:
                put(name, f, value, key)
        else:
            raise UserError(f"--config {path}: {key!r} is neither a step section nor a flag")
    return out


def from_args(ns: argparse.Namespace) -> PipelineConfig:
    """The PipelineConfig of parsed flags, in layers: the dataclass defaults, then ``--preset``'s
    fields, then ``--config``'s file, then the flags given. The preset's fields that the file or
    the flags changed are recorded in ``run.preset_overrides`` (the report lists them)."""
    given = read_config_file(ns.config) if getattr(ns, "config", None) else {name: {} for name in SECTIONS}
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            if f.metadata.get("cli", True):
                text = getattr(ns, flag_of(cls, f)[2:].replace("-", "_"))
                if text is not None:
                    given[name][f.name] = _convert(cls, f, text)
        given[name].pop("config", None)  # the file itself is not part of the run's config
    preset = given["run"].get("preset")
    fields_of = PRESETS[preset].fields if preset else {}
    overrides = sorted({f"{flag_of(SECTIONS[name], f)} {_flag_text(given[name][f.name])}"
                        for name, cls in SECTIONS.items() for f in fields(cls)
                        if f.name in fields_of.get(name, {}) and f.name in given[name]
                        and given[name][f.name] != fields_of[name][f.name]})
    parts = {name: cls(**{**fields_of.get(name, {}), **given[name]}) for name, cls in SECTIONS.items()}
    typed = tuple(sorted({flag_of(cls, f) for name, cls in SECTIONS.items() for f in fields(cls)
                          if f.name in given[name]}))
    parts["run"] = dataclasses.replace(parts["run"], preset_overrides=tuple(overrides), flags_given=typed)
    return PipelineConfig(**parts)


_MODES = ("config", "report_only", "compare", "dry_run")  # what the command does, not how a run computes


def _flag_text(v) -> str:
    """A field value as its flag would say it (tuples as comma lists)."""
    v = _yaml_value(v)
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _yaml_value(v):
    if isinstance(v, tuple) and v and all(isinstance(x, tuple) and len(x) == 3 for x in v):
        return ",".join(f"{m}:{r}:{c}" for m, r, c in v)  # --protect-super-weights text
    if isinstance(v, tuple):
        return [_yaml_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): x for k, x in v.items()}
    return v


def config_yaml(cfg: PipelineConfig) -> str:
    """The whole config as YAML, one section per step, every field a flag sets (budgets left
    null: the device fills them, as on the command line). ``--config`` on it gives ``cfg`` back."""
    doc = {name: {f.name: _yaml_value(getattr(getattr(cfg, name), f.name)) for f in fields(cls)
                  if f.metadata.get("cli", True) and f.name not in _MODES} for name, cls in SECTIONS.items()}
    return "# written by llm_main_v4.py; rerun with: python llm_main_v4.py --config <this file>\n" + \
        yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, allow_unicode=True)


def write_config(cfg: PipelineConfig, path: Path) -> None:
    IO.write_text(path, config_yaml(cfg))


def command_line(cfg: PipelineConfig, argv: Optional[list]) -> str:
    """The command line as a shell would take it back (shlex: spaces and ``;`` stay inside their
    argument). Called from Python (a notebook: sys.argv is the kernel's), the config instead."""
    if argv is not None:
        return shlex.join(["python", "llm_main_v4.py", *map(str, argv)])
    changed = {name: {k: v for k, v in asdict(part).items() if v != asdict(type(part)()).get(k)}
               for name, part in vars(cfg).items()}
    return "run_pipeline(PipelineConfig(...)) called from Python, not from the command line; config changed " \
           "from the defaults: " + json.dumps(IO.to_strict_json({k: v for k, v in changed.items() if v}), sort_keys=True)


def warn_ignored(cfg: PipelineConfig, configs: dict) -> None:
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
