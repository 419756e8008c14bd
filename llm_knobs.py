"""The machinery of every config: fields with their help, flag, bounds and CPU/GPU budget.

    steps: Optional[int] = budget(16, 500, "optimizer steps", bounds="[1,10000000]")
    cfg = FinetuneConfig().for_model(model)    # budgets filled by the model's device, validated

Conventions:
- A field made with ``budget(cpu, gpu, ...)`` defaults to None and is a *budget*:
  ``config.resolved(gpu)`` fills it with the CPU or the GPU value. Each step function resolves
  its config from the model's device first, so a notebook call and the pipeline use the same
  numbers; results record the resolved config. Any other None default means "auto" (decided
  by the step from the model, and said so in the field's help) or "none".
- Every field is a flag (``knob(flag=...)``; default ``--<prefix><name>``) unless ``cli=False``.
  Fields of different steps that share a flag (``--seed``, ``--batch-size``, ...) get one
  flag and must share a default.
- ``results=False`` marks fields that cannot change a number (progress bars, log cadence,
  where to write). Every other field is part of the step's resume fingerprint.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import re
import typing
from dataclasses import field, fields
from typing import ClassVar, Optional, Sequence

import llm_model as LM
from llm_common import UserError

log = logging.getLogger("llm.config")

# Numbers above these are refused: they would only hang or overflow (a 10^20-step PGD).
_INT_MAX = 10 ** 9


@functools.lru_cache(maxsize=None)
def hints_of(cls: type) -> dict:
    """A config class's resolved field types, computed once (validation runs on every evaluation)."""
    return typing.get_type_hints(cls)


def knob(default, help: str, *, flag: Optional[str] = None, choices=None, bounds: Optional[str] = None,
         cli: bool = True, results: bool = True, parse=None, many: bool = False, context: bool = False,
         shown: Optional[str] = None, budget: Optional[tuple] = None, grid: bool = False):
    """A config field with its help, flag and check. ``bounds`` is ">=1", ">0" or an interval such
    as "[0,1)"; ``parse`` turns the flag's text into the value; ``many`` makes a repeatable flag;
    ``context`` marks a window length, clamped to the model's context length; ``shown`` is the
    default as --help words it, where the value alone would not say it; ``budget`` is the
    (CPU, GPU) value of a field whose default is None (use ``budget()``); ``grid`` lets the
    field take a tuple of values (a comma list on the command line): one variant per point of
    the grid (``StepConfig.grid_points``)."""
    meta = dict(help=help, flag=flag, choices=choices, bounds=bounds, cli=cli, results=results, parse=parse,
                many=many, context=context, shown=shown, budget=budget, grid=grid)
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable default")
    if budget is not None and (default is not None or len(budget) != 2):
        raise TypeError("a budget field defaults to None and has a (CPU, GPU) pair")
    return field(default=default, metadata=meta)


def budget(cpu, gpu, help: str, **kw):
    """A budget field: None until ``StepConfig.resolved`` fills in ``cpu`` or ``gpu``. CPU: 2 cores
    and the 135M embedded model, a whole run in about five minutes. GPU: the papers' protocols
    (128 x 2048 calibration, full WikiText-2, 20-step PGD, 100-step GCG) for a 7B model on one card."""
    return knob(None, help, budget=(cpu, gpu), **kw)


def budget_of(cls: type, name: str) -> Optional[tuple]:
    """The (CPU, GPU) budget of a config field, or None when it is not a budget."""
    return next(f.metadata.get("budget") for f in fields(cls) if f.name == name)


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
    # {field: (whether these settings read it, why not)}: a field given a value that is then not
    # read is named in a warning (``ignored``), never dropped without a word.
    applies: ClassVar[dict] = {}

    @property
    def calibration_seed(self) -> int:
        """The seed calibration windows are drawn with: one point's ``calib_seed`` (--calib-seeds),
        else ``seed``."""
        c = getattr(self, "calib_seed", None)
        return self.seed if c is None or isinstance(c, tuple) else c

    # --smoke: the least work that still runs every line of a step (a budget of 2 windows, not 1,
    # so that anything computed across windows, e.g. a spread, is computed).
    SMOKE = {"len": 32, "tokens": 256, "limit": 8, "count": 2, "list": 2, "sweep_seeds": 1}

    def smoke(self):
        """A copy for a smoke run (``--smoke``): every budget cut (counts to 2, window lengths to 32
        tokens, token budgets to 256, zero-shot questions to 8 per task; "all" (0) counts as large),
        and the lists and repeats that multiply work (sweep eps, attack eps, RTN bits, probes,
        sweep seeds) cut to their first values. The pipeline, not the model, is what it tests."""
        cap, out = self.SMOKE, {}
        for f in fields(self):
            v, name = getattr(self, f.name), f.name
            if isinstance(v, bool) or v is None:
                continue
            if isinstance(v, int) and (f.metadata.get("budget") or name.endswith(("probes", "prompts", "super_weights"))
                                       or name == "sweep_seeds"):
                kind = ("len" if f.metadata.get("context") or name.endswith("len") else
                        "tokens" if "tokens" in name else "limit" if name in ("limit", "n_prompts") else
                        "sweep_seeds" if name == "sweep_seeds" else "count")
                out[name] = cap[kind] if v == 0 and kind in ("tokens", "limit") else min(v, max(cap[kind], 1))
            elif isinstance(v, tuple) and len(v) > cap["list"] and \
                    f.metadata.get("parse") in (parse_floats, parse_ints):
                out[name] = v[:cap["list"]]
        if "filter_prompts" in out:
            out["filter_prompts"] = max(out["filter_prompts"], 2)  # bounds: a filter needs two
        return dataclasses.replace(self, **out)

    def ignored(self, given: Sequence = ()) -> list:
        """(flag, why) of each field set away from its default, or whose flag is in ``given`` (typed
        by the user, default value or not: ``--quantize-from live``), that these settings do not read."""
        return [(flag_of(type(self), f), self.applies[f.name][1]) for f in fields(self)
                if f.name in self.applies and (getattr(self, f.name) != f.default or flag_of(type(self), f) in given)
                and not self.applies[f.name][0](self)]

    def resolved(self, gpu: bool):
        """A copy whose unset budgets take the CPU (``gpu=False``) or GPU value."""
        fill = {f.name: f.metadata["budget"][int(gpu)] for f in fields(self)
                if getattr(self, f.name) is None and f.metadata.get("budget") is not None}
        return dataclasses.replace(self, **fill)

    def for_model(self, model):
        """Resolved for the model's device, window lengths clamped to its context (with a
        warning; results record the clamped value), and validated: what every step runs with."""
        key = (LM.is_cuda_model(model), LM.context_length(model))
        if getattr(self, "_resolved_for", None) == (key, self._values()):  # resolved once, at the step boundary
            return self
        cfg = self.resolved(key[0])
        ctx = key[1]
        clamp = {f.name: ctx for f in fields(cfg) if f.metadata.get("context") and ctx
                 and isinstance(getattr(cfg, f.name), int) and getattr(cfg, f.name) > ctx}
        for name in clamp:
            log.warning("%s: %s=%d exceeds the model's context of %d positions; using %d",
                        flag_of(type(cfg), next(f for f in fields(cfg) if f.name == name)), name,
                        getattr(cfg, name), ctx, ctx)
        cfg = dataclasses.replace(cfg, **clamp)
        cfg.validate()
        cfg._resolved_for = (key, cfg._values())  # not a field; a config changed since is resolved again
        return cfg

    def _values(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))

    # --------------------------------------------------------------- grids of variants

    def grid_axes(self) -> dict:
        """{field: its values} of the grid fields given several values."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.metadata.get("grid") and isinstance(getattr(self, f.name), tuple)}

    def grid_points(self) -> list:
        """Every point of the grid, in the fields' order (the last field varies fastest), each a
        config with one value per field; points the step computes identically (``point_key``)
        once. A config without several values is its own single point."""
        axes = self.grid_axes()
        if not axes:
            return [self]
        points, seen = [], set()
        for combo in itertools.product(*axes.values()):
            p = dataclasses.replace(self, **dict(zip(axes, combo)))
            if p.point_key() not in seen:
                seen.add(p.point_key())
                points.append(p)
        return points

    def point_key(self) -> tuple:
        """What tells two points of a grid apart; subclasses drop what a point ignores."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.metadata.get("grid"))

    def validate(self) -> None:
        """Raise UserError naming the flag of the first field out of range (for a grid: of
        any point)."""
        if self.grid_axes():
            for f in fields(self):
                v = getattr(self, f.name)
                if f.metadata.get("grid") and isinstance(v, tuple) and len(set(v)) != len(v):
                    raise UserError(f"{flag_of(type(self), f)} names a value twice: {','.join(map(str, v))}")
            for point in self.grid_points():
                point.validate()
            return
        hints = hints_of(type(self))
        for f in fields(self):
            v, m, name = getattr(self, f.name), f.metadata, flag_of(type(self), f)
            if hints[f.name] in (bool, Optional[bool]) and not isinstance(v, bool) and \
                    (v is not None or hints[f.name] is bool):  # "false" from a notebook is not False
                raise UserError(f"{name} must be {'on or off' if hints[f.name] is bool else 'on, off or auto'}, "
                                f"got {v!r}")
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
                if isinstance(v, list) and ("tuple" in str(hints[f.name]) or f.metadata.get("grid")):
                    v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
                kw[f.name] = v
        return cls(**kw)

    def fingerprint_dict(self) -> dict:
        """The fields that can change a number (``results=True``), for the resume fingerprint."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("results", True)}


def exact(x: float) -> str:
    """A grid value as a variant name says it: short (``0.5``, ``1e-05``), and distinct for
    distinct values (``0.5000001`` is not ``0.5``): two points never share a name."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


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




def parse_max_memory(text: str) -> dict:
    out = {}
    for item in text.split(","):
        key, _, val = item.partition("=")
        if not val.strip() or not key.strip():
            raise ValueError(f"DEVICE=SIZE items such as '0=20GiB,cpu=64GiB' (item {item!r} is not DEVICE=SIZE)")
        out[int(key) if key.strip().isdigit() else key.strip()] = val.strip()
    return out


def flag_of(cls: type, f: dataclasses.Field) -> str:
    """The command-line flag of a config field."""
    return f.metadata.get("flag") or "--" + (cls.prefix + f.name).replace("_", "-")


def parse_nm(pattern: str) -> Optional[tuple[int, int]]:
    """A sparsity pattern, parsed once: None for "unstructured", else (n kept, m) of N:M with
    0 < N < M <= 1024. UserError naming --sparsity-pattern otherwise."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not m:
        raise UserError(f"--sparsity-pattern must be 'unstructured' or N:M like 2:4, got {pattern!r}")
    n, size = int(m.group(1)), int(m.group(2))
    if not 0 < n < size <= 1024:
        raise UserError(f"--sparsity-pattern {pattern}: need 0 < N < M <= 1024")
    return n, size


TRACKERS = ("tensorboard", "wandb", "mlflow")


def parse_trackers(text: str) -> tuple:
    """'none', or a comma list from tensorboard, wandb, mlflow (accelerate's trackers)."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if names == ("none",):
        return ()
    if not names or any(t not in TRACKERS for t in names):
        raise ValueError(f"none, or a comma list from {','.join(TRACKERS)}")
    return tuple(dict.fromkeys(names))


def trackers_of(value) -> tuple:
    """``log_to`` as a tuple of tracker names, whether a notebook gave "tensorboard" or a tuple."""
    try:
        return parse_trackers(value) if isinstance(value, str) else parse_trackers(",".join(value) or "none")
    except ValueError as e:
        raise UserError(f"--log-to must be {e}, got {value!r}")


def parse_names(text: str) -> tuple:
    return _parse_list(text, str, "names")


# The one reading of a switch, for flags and config files alike: a quoted "false" is False.
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_switch(text, tristate: bool = False) -> Optional[bool]:
    """A boolean (or, with ``tristate``, on/off/auto) from its text: true/yes/on/1 and
    false/no/off/0 in any case, "auto" for None; ValueError saying what is allowed otherwise."""
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in _TRUE or t in _FALSE:
        return t in _TRUE
    if tristate and t == "auto":
        return None
    raise ValueError("on, off or auto" if tristate else "true or false (also yes/no, on/off, 1/0)")


def parse_variant_patterns(text: str) -> tuple:
    """'all', 'live', or a comma list of variant names and patterns; commas inside brackets
    belong to a grid name (``pruned[wanda,0.5,unstructured],quantized``)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    if depth != 0 or not all(out):
        raise ValueError("all, live, or a comma list of variant names or patterns such as pruned[*]")
    twice = sorted({p for p in out if out.count(p) > 1})
    if twice:  # as a grid flag refuses a repeated value: a repeat is a slip, never meant
        raise ValueError(f"a list without repeats ({', '.join(twice)} given twice)")
    return tuple(out)


# --------------------------------------------------------------- fields several steps share


def seed_knob():
    """The ``seed`` field of the steps that draw random numbers, defined once. Its flag, --seed, is
    also the one of ``RunConfig.seed``, which keeps its own help."""
    return knob(0, "seed", flag="--seed", bounds="[0,4294967295]")


def progress_knob():
    """The ``progress`` field of the steps that show progress bars, defined once (no flag; no number
    depends on it)."""
    return knob(True, "progress bars", cli=False, results=False)


SUPER_WEIGHT_PROMPT = "Apple Inc. is a worldwide tech company."


def super_weight_prompt_knob():
    """The ``super_weight_prompt`` field of the steps that detect super weights, defined once."""
    return knob(SUPER_WEIGHT_PROMPT, "prompt of the super-weight detector", flag="--super-weight-prompt")


def variants_knob():
    """The ``variants`` field of the steps that measure every variant (noise sweep, attacks, analysis)."""
    return knob(("all",), "variants the noise sweep, the attacks and the analysis measure: all, live (the live "
                          "model only), or a comma list of names and patterns with * and ? (pruned[*])",
                flag="--robustness-variants", parse=parse_variant_patterns)
