"""What an export's model card says of its folder: read from the folder, measured by loading it.

    facts = folder_facts(path, stored)                      # config.json, safetensors headers
    readers = check_readers(path, ids, want, tool_loader)  # each reader's logits against the in-run ones
    text = export_section(facts, readers)                   # the card's section on the files and readers

Nothing here is a template filled from the run's settings: group sizes, scale dtypes, the dtype
of everything else and the bits per parameter are read back from the files written, and each
load recipe the card gives was run at export time, with its logit difference from the in-run
variant (the model the run measured). Known refusals of readers not run here (vLLM: no GPU) are
stated as warnings, from vLLM 0.34.0's kernel-selection code (``bench/export_readers.py`` runs
that code on each export).

The sidecar ``llm_variant.json`` carries the variant's structure (2:4 pattern, sparsity, parent,
recipe): no reader parses it, so none refuses it (vLLM refuses any compressed-tensors
``sparsity_config`` with targets, vllm-project/vllm #51188).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from safetensors import safe_open

import llm_common as C
import llm_model as LM

log = logging.getLogger("llm.export")

SIDECAR = "llm_variant.json"
READER_DTYPES = (torch.float32, torch.bfloat16)
# vLLM 0.34.0's mixed-precision kernels for weight-only int (read from its source, run by
# bench/export_readers.py): Marlin (capability 8.0+) takes zero points at 4 bits only (uint4) and
# symmetric 4/8 bits (uint4b8, uint8b128) at group -1, 32, 64, 128 (other widths zero-padded to its
# tiles); Machete (9.0) takes uint4/uint8 with or without zero points at group -1, 64, 128.
MARLIN_GROUPS, MACHETE_GROUPS = (32, 64, 128), (64, 128)


EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export_dtype(choice: str, model, packed: bool) -> torch.dtype:
    """The dtype of the tensors an export does not quantize (embeddings, norms, LM head, biases,
    linears stored dense): --export-dtype; "auto" is bfloat16 for a compressed-tensors export (as
    llm-compressor writes and vLLM serves it) and the model's own dtype otherwise."""
    if choice != "auto":
        return EXPORT_DTYPES[choice]
    return torch.bfloat16 if packed else next(p.dtype for p in model.parameters() if p.is_floating_point())


def cast_unquantized(m, dtype: torch.dtype) -> None:
    """Every floating tensor of ``m`` but the quantization scales to ``dtype`` (in place)."""
    for mod in m.modules():
        for name, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if p.is_floating_point() and not name.endswith("_scale") and p.dtype != dtype:
                p.data = p.data.to(dtype)
    m.config.dtype = dtype


def is_two_of_four(w: torch.Tensor) -> bool:
    """Whether ``w`` [out, in] keeps at most 2 of every 4 consecutive input weights (in % 4 == 0)."""
    return w.dim() == 2 and w.shape[1] % 4 == 0 and bool(((w.reshape(-1, 4) != 0).sum(-1) <= 2).all())


def structure(model, name: str, facts: Mapping) -> dict:
    """The sidecar's account of the variant ``name`` as it is in ``model``: its pattern ("2:4"
    where decoder linears keep 2 of every 4; "unstructured" for another variant made by pruning,
    itself or its parent; "dense"), the zero fraction of the decoder linears (a quantized grid has
    zeros of its own: its zero code), parent and recipe (``facts``)."""
    lin = {n: LM.weight_view(m) for n, m in LM.decoder_linears(model).items()}
    zeros, total = sum(int((w == 0).sum()) for w in lin.values()), sum(w.numel() for w in lin.values())
    two = sorted(n for n, w in lin.items() if is_two_of_four(w))
    sparse = zeros / max(total, 1)
    pruned = any(str(x or "").startswith("pruned") for x in (name, facts.get("parent")))
    pattern = "2:4" if two else "unstructured" if pruned else "dense"
    return {"pattern": pattern, "sparsity": sparse, "two_of_four_linears": len(two),
            "decoder_linears": len(lin), "parent": facts.get("parent"), "recipe": facts.get("made_by"),
            "base_model": facts.get("base_model")}


def write_sidecar(path: Path, info: Mapping) -> None:
    """``llm_variant.json``: the variant's structure where no reader parses it."""
    (Path(path) / SIDECAR).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def folder_facts(path: Path, stored: Mapping) -> dict:
    """What the folder holds, read from it: the ``quantization_config`` of config.json (format,
    per config group its bits, symmetry, strategy, group size and number of targets; whether it
    holds a ``sparsity_config``), per kind of tensor (packed codes, scales, zero points, every
    other tensor) its dtypes and bytes from the safetensors headers, the config's dtype, the
    sidecar, and ``stored`` (``stored_bits_per_weight`` of the folder)."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    q = cfg.get("quantization_config") or {}
    groups = [{"bits": (g.get("weights") or {}).get("num_bits"), "symmetric": (g.get("weights") or {}).get("symmetric"),
               "strategy": (g.get("weights") or {}).get("strategy"),
               "group_size": (g.get("weights") or {}).get("group_size"), "linears": len(g.get("targets") or ())}
              for g in (q.get("config_groups") or {}).values()]
    tensors: dict = {}
    shapes: list = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                kind = next((kd for suffix, kd in (("weight_packed", "packed codes"), ("weight_scale", "scales"),
                                                   ("weight_zero_point", "zero points"), ("weight_shape", "shapes"))
                             if k.endswith(suffix)), "not quantized")
                t = tensors.setdefault(kind, {})
                t[sl.get_dtype()] = t.get(sl.get_dtype(), 0) + math.prod(sl.get_shape())
                if kind == "shapes":  # [out, in] of a packed linear, as stored
                    shapes.append(tuple(int(x) for x in h.get_tensor(k).tolist()))
    sidecar = json.loads((path / SIDECAR).read_text()) if (path / SIDECAR).is_file() else {}
    return {"format": q.get("format"), "quant_method": q.get("quant_method"), "groups": groups,
            "sparsity_config": q.get("sparsity_config"), "dtypes": tensors, "config_dtype": cfg.get("dtype"),
            "stored_bits": dict(stored), "sidecar": sidecar, "packed_shapes": shapes,
            "bytes": sum(f.stat().st_size for f in path.glob("*.safetensors"))}


def _load_transformers(path: Path, dtype: torch.dtype, dequantize: bool):
    from transformers import AutoModelForCausalLM

    kw = {}
    if dequantize:
        from transformers import CompressedTensorsConfig

        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()


def readers_of(packed: bool, tool_loader: Optional[Callable]) -> dict:
    """{reader name: (the Python it takes, loader(path, dtype))} of an export: a compressed one
    has three (the tool's loader, transformers' dequantize path, plain ``from_pretrained``), a
    dequantized one plain ``from_pretrained`` only."""
    plain = ("AutoModelForCausalLM.from_pretrained(PATH, dtype=DTYPE)",
             lambda p, d: _load_transformers(p, d, False))
    if not packed:
        return {"transformers": plain}
    return {"llm-sensitivity (compressed-tensors decompressor)": (
                "import llm_export; llm_export.load_compressed_tensors(PATH, DTYPE)", tool_loader),
            "transformers dequantize": (
                "from transformers import CompressedTensorsConfig\nAutoModelForCausalLM.from_pretrained(PATH, "
                "dtype=DTYPE, quantization_config=CompressedTensorsConfig(dequantize=True))",
                lambda p, d: _load_transformers(p, d, True)),
            "transformers plain": plain}


@torch.no_grad()
def check_readers(path: Path, ids: torch.Tensor, want: torch.Tensor, packed: bool,
                  tool_loader: Optional[Callable] = None) -> dict:
    """Load the export at ``path`` with each reader (``readers_of``) in float32 and bfloat16 and
    compare its logits on ``ids`` with ``want`` (the in-run variant's, float32): {"reader,
    dtype": {loads, error (one line, or None), max_abs_logit_diff, mean_abs_logit_diff,
    top1_agreement}}. A reader that raises is recorded as not loading, never stops the export."""
    out = {}
    for name, (_, load) in readers_of(packed, tool_loader).items():
        for dtype in READER_DTYPES:
            key = f"{name}, {str(dtype).removeprefix('torch.')}"
            try:
                with quiet_libraries():
                    model = load(path, dtype)
                    got = model(input_ids=ids.to(model.device)).logits.float().cpu()
                del model
            except Exception as e:  # noqa: BLE001  (every failure of a reader is what we report)
                out[key] = {"loads": False, "error": C.error_line(e)[:300]}
                continue
            d = (got - want).abs()
            out[key] = {"loads": True, "error": None, "max_abs_logit_diff": float(d.max()),
                        "mean_abs_logit_diff": float(d.mean()),
                        "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean())}
    return out


@contextlib.contextmanager
def quiet_libraries():
    """transformers' and compressed-tensors' load chatter (progress bars, mismatch reports) off
    the run's log: the outcome is recorded instead."""
    loggers = [logging.getLogger(n) for n in ("transformers", "compressed_tensors")]
    levels = [lg.level for lg in loggers]
    try:
        from transformers.utils import logging as tl
        bars = tl.is_progress_bar_enabled()
        tl.disable_progress_bar()
    except ImportError:
        bars = None
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if bars:
            tl.enable_progress_bar()


def known_refusals(facts: Mapping) -> list[str]:
    """Readers known to refuse this folder, from its facts (vLLM 0.34.0's kernel-selection code)."""
    out = []
    for g in facts.get("groups") or ():
        b, sym, gs = g["bits"], g["symmetric"], g["group_size"]
        if not sym and b != 4:
            narrow = sum(o % 128 != 0 for o, _ in facts.get("packed_shapes") or ())
            out.append(f"vLLM: asymmetric {b}-bit weights have no kernel below compute capability 9.0 (Marlin takes "
                       f"zero points at 4 bits only); on 9.0 Machete takes them at group 64 or 128"
                       + ("" if gs in MACHETE_GROUPS else f", not {gs}") + " and output widths that are multiples "
                       "of 128" + (f", which {narrow} of this folder's quantized linears are not: vLLM refuses "
                                   "the model on any GPU" if narrow else "")
                       + ". Export with --quant-symmetric for Marlin on 8.0+.")
        elif gs not in MARLIN_GROUPS:
            out.append(f"vLLM: Marlin takes groups of {', '.join(map(str, MARLIN_GROUPS))} only; this folder "
                       f"has {gs}.")
    if facts.get("groups"):
        out.append("vLLM casts the scales to the model dtype (bfloat16 by default) and computes in it: its logits "
                   "are nearest the bfloat16 rows of the readers' table, not the float32 ones.")
    if (facts.get("sidecar") or {}).get("pattern") == "2:4":
        out.append("2:4 sparsity is stored dense (zeros written): no reader runs it as sparse; vLLM no longer "
                   "accepts compressed-tensors' sparsity_config, so none is written (see llm_variant.json).")
    return out


def _dtypes(d: Mapping) -> str:
    return ", ".join(f"{k} ({n:,} values)" for k, n in sorted(d.items()))


def export_section(facts: Mapping, readers: Optional[Mapping], packed: bool) -> list[str]:
    """The card's lines on the files (as written) and on how each reader loads them (as measured)."""
    sb = facts.get("stored_bits") or {}
    lines = ["", "## Files, as written", ""]
    if packed:
        lines.append(f"- **Format:** compressed-tensors `{facts.get('format')}` (codes packed into int32).")
        for g in facts.get("groups") or ():
            lines.append(f"- **Config group:** {g['bits']}-bit {'symmetric' if g['symmetric'] else 'asymmetric'} "
                         f"int, strategy {g['strategy']}, group size {g['group_size']}, {g['linears']} linears.")
    else:
        lines.append("- **Format:** plain safetensors (weights dequantized, pruned weights stored as zeros).")
    for kind, d in sorted((facts.get("dtypes") or {}).items()):
        lines.append(f"- **{kind.capitalize()}:** {_dtypes(d)}.")
    lines.append(f"- **Bits per parameter:** {sb.get('checkpoint', float('nan')):.3f} for the whole checkpoint "
                 f"({facts.get('bytes', 0):,} bytes of safetensors), {sb.get('decoder_linears', float('nan')):.3f} "
                 "per decoder-linear weight (codes, scales, zero points and shapes; weights stored dense count "
                 "in full).")
    side = facts.get("sidecar") or {}
    if side.get("pattern") == "2:4":
        lines.append(f"- **Sparsity:** 2:4 ({side.get('two_of_four_linears')} decoder linears keep 2 of every 4 "
                     f"weights; {100 * side.get('sparsity', 0):.1f}% of decoder-linear weights are zero), stated "
                     f"in `{SIDECAR}`.")
    if readers:
        lines += ["", "## Readers, tested at export", "",
                  "Each reader loaded this folder at export time and ran it on 2 x "
                  f"{facts.get('check_tokens', '?')} tokens; the difference is from the logits of the variant as "
                  f"the run measured it ({facts.get('check_dtype', 'float32')})."
                  + (f" The tensors not quantized are stored in {facts['config_dtype']} (--export-dtype): that alone "
                     "moves the float32 rows away from 0." if facts.get("config_dtype") not in (None, "float32")
                     else ""), "",
                  "| reader | dtype | loads | max abs logit diff | mean abs logit diff | top-1 agreement |",
                  "|---|---|---|---|---|---|"]
        for key, r in readers.items():
            name, dt = key.rsplit(", ", 1)
            if r["loads"]:
                lines.append(f"| {name} | {dt} | yes | {r['max_abs_logit_diff']:.4g} | "
                             f"{r['mean_abs_logit_diff']:.4g} | {r['top1_agreement']:.3f} |")
            else:
                lines.append(f"| {name} | {dt} | **no**: {r['error'].replace('|', '/')} | - | - | - |")
        lines += ["", "Load recipes (each one is a row above that loads):", ""]
        recipes = readers_of(packed, None)
        for name, (code, _) in recipes.items():
            ok = [k.rsplit(', ', 1)[1] for k, r in readers.items() if k.rsplit(', ', 1)[0] == name and r["loads"]]
            if ok:
                lines += [f"- {name} (tested in {', '.join(ok)}):", "", "```python",
                          "from transformers import AutoModelForCausalLM", code, "```", ""]
            else:
                lines.append(f"- {name}: does not load this folder (the error is in the table).")
    else:
        lines += ["", "The readers were not run at export (--export-reader-check off): no load recipe is claimed."]
    refusals = known_refusals(facts) if packed or (facts.get("sidecar") or {}).get("pattern") == "2:4" else []
    if refusals:
        lines += ["", "## Known refusals (not run here)", ""] + [f"- {w}" for w in refusals]
    return lines


ST_DTYPE = {torch.int32: "I32", torch.int64: "I64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def check_tensors(path: Path, model, qconf) -> None:
    """Every tensor of each quantized linear of a compressed-tensors export checked against its
    config group (bits, group size, strategy, symmetry) and the linear's shape in the architecture
    the config builds, before anything is decompressed: ``weight_shape`` [out, in],
    ``weight_packed`` int32 [out, ceil(in x bits / 32)] (codes back to back: 3 bits too),
    ``weight_scale`` float [out, groups] (channel: [out, 1]) and, asymmetric, ``weight_zero_point``
    int32 [ceil(out x bits / 32), groups] (packed along the outputs). A wrong one raises ValueError
    naming it: the decompressor would otherwise broadcast a wrong scale into a model that runs,
    wrongly. ``qconf``: the export's quantization config (compressed-tensors' model), None for none."""
    if qconf is None:
        return
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(f), "pt")) for f in sorted(path.glob("*.safetensors"))]
        where = {k: f for f in files for k in f.keys()}

        def spec(key: str) -> Optional[tuple]:
            return (where[key].get_slice(key).get_dtype(), tuple(where[key].get_slice(key).get_shape())) \
                if key in where else None

        for scheme in qconf.config_groups.values():
            w = scheme.weights
            for name in scheme.targets:
                try:
                    out, inp = LM.weight_view(model.get_submodule(name)).shape
                except (AttributeError, ValueError, TypeError):
                    raise ValueError(f"{path}: config group target {name} is not a linear of the config's "
                                     "architecture") from None
                groups = math.ceil(inp / w.group_size) if w.strategy == "group" and w.group_size else 1
                need = {"weight_packed": (("I32",), (out, math.ceil(inp * w.num_bits / 32))),  # bits back to back
                        "weight_shape": (("I64", "I32"), (2,))}
                if w.strategy in ("group", "channel"):
                    need["weight_scale"] = (("F32", "F16", "BF16"), (out, groups))
                    if not w.symmetric:
                        need["weight_zero_point"] = (("I32",), (math.ceil(out * w.num_bits / 32), groups))
                for key, (dtypes, shape) in need.items():
                    got = spec(f"{name}.{key}")
                    if got is None or got[0] not in dtypes or got[1] != shape:
                        found = "missing" if got is None else f"{got[0]} {list(got[1])}"
                        raise ValueError(f"{path}: {name}.{key} is {found}"
                                         f"; {w.num_bits}-bit {w.strategy} quantization (group {w.group_size}) of "
                                         f"this [{out}, {inp}] linear needs {' or '.join(dtypes)} {list(shape)}")
                shape_of = where[f"{name}.weight_shape"].get_tensor(f"{name}.weight_shape").tolist()
                if shape_of != [out, inp]:
                    raise ValueError(f"{path}: {name}.weight_shape says {shape_of}, the architecture has "
                                     f"[{out}, {inp}]")
