"""The export step: every variant as a loadable ``save_pretrained`` directory with a model card.

    res = export_variants(model, tokenizer, {"base": None, "pruned": mask_ctx}, "data/export",
                          ExportConfig(enabled=True), facts={"pruned": {"method": "wanda 2:4"}})
    AutoModelForCausalLM.from_pretrained("data/export/pruned")   # the pruned model, anywhere

Each directory holds sharded safetensors, the config, the tokenizer and a ``README.md`` model
card (base model, how the variant was made, calibration data, this run's metrics, the command
line). safetensors has no sparse format, so a pruned variant is stored dense with its zeros.

``--export-2of4``, on CUDA: PyTorch's semi-structured sparse kernels (``to_sparse_semi_structured``,
cuSPARSELt or CUTLASS, Ampere or newer) run a linear whose weight keeps 2 of every 4 input
weights at up to 2x the dense matmul rate. We convert every such linear of a 2:4 variant, check
the logits against the dense model, and measure forward tokens/s against dense at each batch size
on the same GPU. PyTorch has no on-disk format for these tensors, so the directory stays dense
and ``semi_structured(model)`` converts a loaded model the same way. Wanda reports 1.24x for the
linear layers of LLaMA-65B at 2:4; whole-model numbers are lower, since attention, norms and the
LM head stay dense.

``--export-quant-format compressed-tensors``: a variant stored as codes (the ``quantized`` ones) is
written in the compressed-tensors ``pack-quantized`` format (Neural Magic / vLLM; vLLM's parser
refuses ``naive-quantized``) by the library's own ``ModelCompressor``: codes packed into int32,
scales in float16 where every one is fp16-exact (``--quant-scale-dtype float16``) else float32, for
an asymmetric grid the zero point packed along the output dimension (as vLLM and llm-compressor
read and write it), symmetric grids (``--quant-symmetric``) with none. Every packed linear is
written at one group size, the gcd of every group and input width (``export_group``: SmolLM2 at
g128 is written at g64, each scale and zero repeated per sub-group: the same values, more scales),
since transformers fails on config groups of several sizes. Everything not quantized is written
in ``--export-dtype`` (bfloat16 by default for this format). Each export is decompressed by the
library and must give our weights bit for bit (``_check_decompressed``). Linears that keep weights
in full precision, have non-contiguous groups (GPTQ act order) or a float zero point are stored
dense. No ``sparsity_config`` is written (vLLM refuses any with targets): a 2:4 variant says so
in its card and in ``llm_variant.json`` (pattern, sparsity, parent, recipe), written for every
variant.

The card (``llm_export_card``) is read from the folder, never from a template: group sizes, scale
dtype, the dtype of everything else, bits per parameter of the checkpoint and per decoder-linear
weight; and, with the reader check (``--export-reader-check``), each reader's load of the folder at
export (the tool's ``load_compressed_tensors``, transformers' ``CompressedTensorsConfig(dequantize=
True)`` and plain ``from_pretrained``, float32 and bfloat16) with its logit difference from the
in-run variant. transformers 5.24's plain path refuses an asymmetric export (it builds the zero
point unpacked, [out, groups]); the card says so from the measurement.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.sparse import to_sparse_semi_structured
from transformers import AutoConfig, AutoModelForCausalLM

import llm_common as C
import llm_io as IO
import llm_model as LM
import llm_export_card as CARD
from llm_export_card import is_two_of_four
import llm_variants as V
from llm_compress import load_codes
from llm_config import ExportConfig
import llm_results as R
from llm_run import Run

__all__ = ["ExportConfig", "ExportResult", "export_variants", "is_two_of_four", "load_compressed_tensors",
           "model_card", "semi_structured", "stored_bits_per_weight", "tokens_per_second",
           "validate_compressed_tensors", "write_compressed_tensors"]

log = logging.getLogger("llm.export")


@dataclass
class ExportResult:
    status: str                                   # "ran" or "off"
    variants: dict = field(default_factory=dict)  # name -> {path, files, bytes, zero_fraction, bits, ...}
    two_of_four: dict = field(default_factory=dict)  # status, reason, linears converted, tokens/s per batch
    seconds: float = 0.0
    config: dict = field(default_factory=dict)


CT_FORMAT = "pack-quantized"
READER_CHECK_TOKENS = 64  # tokens per sequence (2 sequences) of the readers' logit check
_ST_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
             "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _ct():
    """compressed-tensors' modules (root, compressors, config, quantization), imported on first use:
    only this export format needs the package, and importing it takes seconds."""
    try:
        import compressed_tensors as root, compressed_tensors.compressors as comp, \
            compressed_tensors.config as cfgs, compressed_tensors.quantization as quant
    except ImportError as e:
        raise C.UserError(f"--export-quant-format compressed-tensors needs the compressed-tensors package "
                          f"({C.error_line(e)}); pip install compressed-tensors")
    return root, comp, cfgs, quant


def export_group(records: Mapping) -> Optional[int]:
    """The one group size written for every packed linear: the gcd of each linear's quantization
    group and input width (SmolLM2's 576- and 1536-wide inputs at group 128: 64). Readers take one
    group size per config group, and transformers 5.24 fails to load config groups of different
    sizes (down_proj's scales at g128 against the g64 model it builds: "size 24 against 12"), so
    a narrower tail group (576 = 4 x 128 + 64) is never written as its own group size; every group
    is split into sub-groups that repeat its scale and zero (the same values, more scales)."""
    sizes = [v for q in records.values() for v in (int((q.g_idx == 0).sum()), q.codes.shape[1])]
    return functools.reduce(math.gcd, sizes) if sizes else None


def _ct_layout(model, records: Mapping, bits: Mapping[str, int]) -> tuple[dict, list, Optional[int]]:
    """Module names of the compressed-tensors config groups, {(bits, symmetric): [names]}; the
    quantized linears stored dense instead (kept weights, non-contiguous groups, non-Linear, a
    float zero point: the format's zero point is an integer code); and the one group size
    written (``export_group`` of the packed linears)."""
    groups: dict = {}
    dense, packed = [], {}
    for pname, q in records.items():
        name = pname.rsplit(".", 1)[0]
        inp = q.codes.shape[1]
        gs = int((q.g_idx == 0).sum())
        contiguous = torch.equal(q.g_idx.long().cpu(), torch.arange(inp) // gs)
        has_kept = q.keep is not None and bool(q.keep.any())
        if has_kept or not contiguous or q.zero_point == "float" or type(model.get_submodule(name)) is not torch.nn.Linear:
            dense.append(name)
            continue
        packed[pname] = q
        # a symmetric grid's zeros are all the middle code: written without a zero point
        sym = bool(q.symmetric) and bool((q.zero == 2 ** (int(bits[name]) - 1)).all())
        groups.setdefault((int(bits[name]), sym), []).append(name)
    return groups, dense, export_group(packed)


def _regrid(t: torch.Tensor, gs: int, g2: int, inp: int) -> torch.Tensor:
    """Per-group values t [out, ceil(inp / gs)] repeated for sub-groups of g2 | gs columns:
    [out, inp / g2]."""
    return t[:, torch.arange(0, inp, g2) // gs]


def write_compressed_tensors(model, records: Mapping, bits: Mapping[str, int], path: Path,
                             max_shard_size: str, dtype: torch.dtype = torch.bfloat16) -> tuple[dict, dict]:
    """Write ``model`` (holding the dequantized weights of ``records``, parameter name ->
    ``llm_compress.Quantized``, with ``bits`` per linear name) to ``path`` in the
    compressed-tensors ``pack-quantized`` format, through the library's own ``ModelCompressor``:
    codes packed into int32 (``weight_packed`` [out, in x bits / 32]), the scales
    ``weight_scale`` [out, in / group] in float16 where every one is fp16-exact
    (``--quant-scale-dtype float16``) and float32 otherwise (ours, bit for bit), for an asymmetric
    grid the zero point packed along the output dimension (``weight_zero_point`` int32
    [out x bits / 32, groups], the shape vLLM's WNA16 scheme loads), and ``weight_shape``. One
    group size for every linear (``export_group``); one config group per (bits, symmetric), each
    with its targets (never a ``sparsity_config``: vLLM refuses any with targets). Everything not
    quantized is written in ``dtype``. The packer requantizes the float32 dequantized weights
    with those scales, which gives our codes back (``export_variants`` then decompresses the files
    with the library and compares). Works on a copy: the live model keeps its plain linears.
    Returns ({format, group_size, groups, dense, regrouped, symmetric, scale_dtype}, {linear name:
    its float32 weight as quantized})."""
    _, comp, _, quant = _ct()
    groups, dense, group = _ct_layout(model, records, bits)
    if dense:
        log.warning("compressed-tensors: %d quantized linears keep weights in full precision, have non-contiguous "
                    "groups or a float zero point; stored dense: %s", len(dense), ", ".join(dense[:4]))
    m = copy.deepcopy(model)
    schemes = {f"group_{i}": quant.QuantizationScheme(targets=names, weights=quant.QuantizationArgs(
        num_bits=b, type="int", symmetric=sym, strategy="group", group_size=group))
        for i, ((b, sym), names) in enumerate(sorted(groups.items()))}
    quant.apply_quantization_config(m, quant.QuantizationConfig(config_groups=schemes, format=CT_FORMAT))
    want, regrouped, scale_dtypes = {}, {}, set()
    for (b, sym), names in groups.items():
        for name in names:
            q, mod = records[name + ".weight"], m.get_submodule(name)
            gs, inp = int((q.g_idx == 0).sum()), q.codes.shape[1]
            if gs != group:
                regrouped[name] = gs
            with torch.no_grad():  # float32 weights and scales: requantizing gives our codes exactly
                want[name] = mod.weight.data = q.dequantize(torch.float32)
                scale = _regrid(q.scale.float(), gs, group, inp)
                if torch.equal(scale.half().float(), scale):  # --quant-scale-dtype float16: 16 bits a scale
                    scale = scale.half()
                scale_dtypes.add(str(scale.dtype).removeprefix("torch."))
                mod.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
                if hasattr(mod, "weight_zero_point"):
                    # its signed grid: code c in [0, 2^b) is c - 2^(b-1), and so is the zero (0 when symmetric)
                    mod.weight_zero_point.data = (_regrid(q.zero, gs, group, inp) - 2 ** (b - 1)).to(
                        mod.weight_zero_point.dtype)
    if regrouped:
        log.info("compressed-tensors: %d linears written at group %d, the gcd of every group and width (their "
                 "groups' scales and zeros repeated: the same values, more scales)", len(regrouped), group)
    with CARD.quiet_libraries():  # their progress bars, not our log
        compressor = comp.ModelCompressor.from_pretrained_model(m, quantization_format=CT_FORMAT)
        compressor.compress_model(m)
        CARD.cast_unquantized(m, dtype)
        m.save_pretrained(path, max_shard_size=max_shard_size)
        compressor.update_config(path)
    return {"format": f"compressed-tensors {CT_FORMAT}", "group_size": group,
            "groups": {f"{b} bits, {'symmetric' if sym else 'asymmetric'}, group {group}": len(n)
                       for (b, sym), n in sorted(groups.items())},
            "symmetric": sorted({sym for _, sym in groups}), "scale_dtype": sorted(scale_dtypes),
            "dense": dense, "regrouped": regrouped}, want


def _check_decompressed(path: Path, want: Mapping[str, torch.Tensor]) -> float:
    """The largest difference between the linears that compressed-tensors' decompressor reads
    from ``path`` and ``want``; raises RuntimeError when any differs or is missing (a library
    change of rounding or packing: we refuse to ship other weights)."""
    qconf, _ = _ct_configs(path)
    seen, diff = set(), 0.0
    for n, w in (_decompressed(path, qconf) if qconf is not None else ()):
        seen.add(n)
        diff = max(diff, float((w.float() - want[n]).abs().max()))
    if diff or seen != set(want):
        raise RuntimeError(f"compressed-tensors export of {path.name}: the decompressed weights differ from "
                           f"the quantized ones by up to {diff:g}, or linears are missing "
                           f"({sorted(set(want) - seen)[:3]})")
    return diff


def _ct_configs(path: Path) -> tuple:
    """(QuantizationConfig or None, sparsity config or None) of an export's config.json, each
    parsed by compressed-tensors' own pydantic model (an invalid one raises)."""
    _, _, cfgs, quant = _ct()
    raw = json.loads((path / "config.json").read_text())["quantization_config"]
    qconf = quant.QuantizationConfig.model_validate(raw) if raw.get("config_groups") else None
    sp = raw.get("sparsity_config") or None
    return qconf, cfgs.SparsityCompressionConfig.get_value_from_registry(sp["format"]).model_validate(sp) \
        if sp else None


def _decompressed(path: Path, qconf) -> Iterator[tuple[str, torch.Tensor]]:
    """(linear name, its weight [out, in] decompressed by the format's registered compressor, in
    the scales' dtype) for each target of each config group, reading one linear's tensors at a
    time (a 7B export is never held dense in memory)."""
    _, comp, _, _ = _ct()
    compressor = comp.BaseCompressor.get_value_from_registry(qconf.format)
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(f), "pt")) for f in sorted(path.glob("*.safetensors"))]
        where = {k: f for f in files for k in f.keys()}
        for scheme in qconf.config_groups.values():
            for name in scheme.targets:
                part = {k[len(name) + 1:]: f.get_tensor(k) for k, f in where.items()
                        if k.startswith(name + ".weight")}
                if "weight_packed" not in part:
                    raise ValueError(f"{path}: {name} is in a config group but has no packed weight")
                yield name, compressor.decompress(part, scheme)["weight"]


def validate_compressed_tensors(path) -> tuple[dict, dict]:
    """Read a compressed-tensors export with the library's own pieces: its ``quantization_config``
    parsed by ``QuantizationConfig`` (pydantic; an invalid one raises) and the sparsity config by
    the ``SparsityCompressionConfig`` its format registers; every config group's linears
    decompressed by the registered compressor (``PackedQuantizationCompressor.decompress``) to
    dense weights [out, in] in the scales' dtype (float32 here). Returns (the state dict with
    dense weights, {"quantization": QuantizationConfig, "sparsity": config or None})."""
    path = Path(path)
    qconf, sparsity = _ct_configs(path)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    for name, w in (_decompressed(path, qconf) if qconf is not None else ()):
        for k in [k for k in state if k.startswith(name + ".weight")]:
            del state[k]
        state[name + ".weight"] = w
    return state, {"quantization": qconf, "sparsity": sparsity}


def load_compressed_tensors(path, dtype: torch.dtype = torch.float32):
    """The model of a compressed-tensors export, its linears decompressed by
    ``validate_compressed_tensors`` (transformers 5.24 cannot reload an asymmetric
    ``pack-quantized`` checkpoint: it builds the zero point unpacked, [out, groups], and refuses
    the packed one). Weights are cast to ``dtype``, as a load in that dtype would."""
    path = Path(path)
    cfg = AutoConfig.from_pretrained(path)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    CARD.check_tensors(path, model, _ct_configs(path)[0])  # a wrong shape or dtype never loads as a wrong model
    state, _ = validate_compressed_tensors(path)
    want = model.state_dict()
    for k, v in state.items():
        if k in want and (tuple(v.shape) != tuple(want[k].shape) or not v.is_floating_point()):
            raise ValueError(f"{path}: {k} is {CARD.ST_DTYPE.get(v.dtype, v.dtype)} {list(v.shape)}, but the config's "
                             f"architecture needs a float tensor {list(want[k].shape)}")
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    if unexpected or any(k not in tied for k in missing):
        raise ValueError(f"{path}: the checkpoint does not fit its config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    model.tie_weights()
    return model.eval()


def stored_bits_per_weight(path: Path, model) -> dict:
    """Bits actually written per weight in the folder ``path`` of ``model``'s export:
    ``decoder_linears``: the bytes of every tensor of the decoder linears' weights (packed codes,
    scales, zero points, shapes; the dense weight where stored dense; biases not counted) x 8 over
    their weight count; ``checkpoint``: the bytes of every safetensors file (headers, embeddings,
    norms, ...) x 8 over all the model's parameters (tied ones once)."""
    lin = {n: LM.weight_view(m).numel() for n, m in LM.decoder_linears(model).items()}
    lin_bytes = file_bytes = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        file_bytes += f.stat().st_size
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                mod, _, leaf = k.rpartition(".")
                if mod in lin and leaf.startswith("weight"):
                    sl = h.get_slice(k)
                    lin_bytes += math.prod(sl.get_shape()) * _ST_BYTES[sl.get_dtype()]
    params = sum(p.numel() for p in model.parameters())
    return {"decoder_linears": 8 * lin_bytes / max(sum(lin.values()), 1),
            "checkpoint": 8 * file_bytes / params}


@contextlib.contextmanager
def semi_structured(model: torch.nn.Module) -> Iterator[list]:
    """Convert, in place, every decoder linear whose weight is 2:4 to PyTorch's semi-structured
    sparse format for the body (CUDA, fp16/bf16); the dense weights come back on exit. Yields the
    names converted; a linear the kernels refuse (shape, dtype) stays dense and is not named."""
    done = {}
    try:
        for name, mod in LM.decoder_linears(model).items():
            if not isinstance(mod, torch.nn.Linear) or not is_two_of_four(mod.weight.data):
                continue
            try:
                sparse = to_sparse_semi_structured(mod.weight.data)
            except (RuntimeError, ValueError) as e:
                log.debug("%s stays dense: %s", name, e)
                continue
            done[name] = mod.weight
            mod.weight = torch.nn.Parameter(sparse, requires_grad=False)
        yield list(done)
    finally:
        for name, dense in done.items():
            model.get_submodule(name).weight = dense


@torch.no_grad()
def tokens_per_second(model: torch.nn.Module, batch: int, seq_len: int, iters: int = 10, warmup: int = 3) -> float:
    """Forward (prefill) throughput in tokens/s on random ids [batch, seq_len], logits of the last
    position only. Timed with a device sync around the loop, not per step."""
    device = LM.input_device(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.get_input_embeddings().weight.shape[0], (batch, seq_len), generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with LM.use_cache(model, False):
        for _ in range(warmup):
            model(input_ids=ids, logits_to_keep=1)
        sync()
        t = time.perf_counter()
        for _ in range(iters):
            model(input_ids=ids, logits_to_keep=1)
        sync()
    return batch * seq_len * iters / (time.perf_counter() - t)


def _speed(model, cfg: ExportConfig, variants: Mapping[str, object]) -> dict:
    """The 2:4 conversion and its measured speed-up for the first variant that is 2:4."""
    if not LM.is_cuda_model(model):
        return {"status": "skipped", "reason": "semi-structured sparse kernels need CUDA (compute capability 8.0+)"}
    for name, weights in variants.items():
        with V.applied_variant(model, weights):
            if not any(is_two_of_four(LM.weight_view(m)) for m in LM.decoder_linears(model).values()):
                continue
            vocab = model.get_input_embeddings().weight.shape[0]
            ids = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0)).to(LM.input_device(model))
            with torch.no_grad():
                ref = model(input_ids=ids).logits.float()
            dense = {b: tokens_per_second(model, b, cfg.speed_seq_len) for b in cfg.speed_batches}
            try:
                with semi_structured(model) as converted, torch.no_grad():
                    if not converted:
                        return {"status": "skipped", "variant": name, "reason": "the kernels refused every linear"}
                    err = (model(input_ids=ids).logits.float() - ref).abs().max().item()
                    sparse = {b: tokens_per_second(model, b, cfg.speed_seq_len) for b in cfg.speed_batches}
            except RuntimeError as e:  # an older GPU or a kernel missing from this build
                return {"status": "failed", "variant": name, "reason": C.error_line(e)}
            return {"status": "ran", "variant": name, "linears": len(converted), "max_abs_logit_diff": err,
                    "device": torch.cuda.get_device_name(LM.input_device(model)), "seq_len": cfg.speed_seq_len,
                    "tokens_per_s": {str(b): {"dense": dense[b], "2:4": sparse[b], "speedup": sparse[b] / dense[b]}
                                     for b in cfg.speed_batches}}
    return {"status": "skipped", "reason": "no variant has 2:4 linears (prune with --sparsity-pattern 2:4)"}


def model_card(name: str, facts: Mapping, command: str = "", export_lines: Sequence[str] = ()) -> str:
    """A Hugging Face model card (README.md, YAML front matter) for one exported variant;
    ``export_lines`` (``llm_export_card.export_section``: the files as written, the readers as
    tested) replace the generic load line."""
    base, hub_id = facts.get("base_model") or "unknown", facts.get("hub_id")
    kind = next((tag for prefix, tag in (("pruned", "pruning"), ("noisy", "weight-noise"), ("quantized", "quantization"),
                                         ("fine-tuned", "fine-tuned")) if name.startswith(prefix)), "variant")
    # Front matter the Hub reads; a local base is not a hub id, so it is named in the text only.
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["llm-sensitivity", kind],
            **({"base_model": hub_id, "license": "other", "license_name": "same-as-base-model",
                "license_link": f"https://huggingface.co/{hub_id}"} if hub_id else {"license": "other"}),
            **({"datasets": facts["datasets"]} if facts.get("datasets") else {})}
    lines = ["---", *[f"{k}: {json.dumps(v)}" for k, v in meta.items()], "---", "",
             f"# {name} variant of {base}", "",
             f"Exported by llm-sensitivity (`llm_main_v4.py --export`). Base model: "
             f"{hub_id or f'local ({base})'}. Parent variant: {facts.get('parent') or '-'}. License: that of the "
             "base model.", ""]
    if facts.get("made_by"):
        lines.append(f"- **How it was made:** {facts['made_by']}")
    if facts.get("calibration"):
        lines.append(f"- **Calibration data:** {facts['calibration']}")
    if facts.get("from_gguf"):
        lines.append("- The base weights were dequantized from a 4-bit GGUF file (the embedded model is Q4_1: "
                     "blocks of 32 with an fp16 scale and unrounded minimum). 4-bit RTN at group 32 with a float "
                     "zero point gives them back exactly; the default integer zero point does not.")
    m = facts.get("metrics") or {}
    if "perplexity" in m:
        p = m["perplexity"]
        value = f"{p['value']:.4f}" if isinstance(p["value"], float) else p["value"]  # "inf"/"nan" as saved
        lines.append(f"- **Perplexity** {value} on {p.get('text')} (disjoint windows of {p.get('window')} tokens, "
                     f"{p.get('tokens')} tokens scored)")
    if "zeroshot" in m:
        z = m["zeroshot"]
        lines += ["", "| task | acc | acc_norm | n |", "|---|---|---|---|"]
        pct = lambda v: f"{100 * v:.1f}%" if isinstance(v, float) else "-"  # noqa: E731
        lines += [f"| {t} | {pct(r.get('acc'))} | {pct(r.get('acc_norm'))} | {r.get('n')} |"
                  for t, r in z["tasks"].items()]
        lines.append(f"| mean | {pct(z['mean'].get('acc'))} | {pct(z['mean'].get('acc_norm'))} | |")
        if z.get("limit"):
            lines.append(f"\nZero-shot on the first {z['limit']} examples per task only (a CPU budget).")
    if export_lines:
        lines += list(export_lines)
    else:
        lines += ["", "Load it with:", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(PATH_TO_THIS_FOLDER)", "```"]
    if command:
        lines += ["", "Command line of the run:", "", "```", command, "```"]
    return "\n".join(lines) + "\n"


_SHARDS = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


def _refuse_foreign_files(path: Path, new: Path) -> None:
    """Replacing ``path`` by the new export ``new`` may remove only what an export writes: the
    files it writes now, and weight shards of another shard size. Anything else (a user's
    notes) stops the export, with the old folder intact."""
    if not path.is_dir():
        return
    ours = {p.name for p in new.iterdir()}
    foreign = sorted(p.name for p in path.iterdir() if p.name not in ours and not _SHARDS.fullmatch(p.name))
    if foreign:
        raise C.UserError(f"{path} holds files this export would not write ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); move them out of it (nothing was changed)")


READER_CHECK_AUTO_PARAMS = 3e9  # --export-reader-check auto: six loads of a larger model cost more than the export


def _save_plain(model, path: Path, dtype: torch.dtype, max_shard_size: str) -> None:
    """``save_pretrained`` with every floating tensor in ``dtype`` (a copy when that differs from
    the model's own: the live model is restored bit for bit)."""
    m = model
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        m = copy.deepcopy(model).to(dtype)
    with LM.use_cache(m, getattr(model, "llm_use_cache", True)):  # the model's own setting, not ours
        m.save_pretrained(path, max_shard_size=max_shard_size)


def export_variants(model, tokenizer, variants: Mapping[str, object], out_dir, config: ExportConfig = ExportConfig(),
                    facts: Optional[Mapping[str, dict]] = None, codes: Optional[Mapping[str, tuple]] = None
                    ) -> ExportResult:
    """Write each variant (see ``llm_common.applied_variant``) as ``<out_dir>/<name>/``, atomically,
    with its card and ``llm_variant.json``. The model is changed in place for each variant and
    restored bit for bit. ``codes``: variant name -> (its ``save_codes`` checkpoint, bits per
    linear), for ``config.quant_format``. With the reader check, each folder is loaded by every
    reader (``llm_export_card.check_readers``) and the card gives what loaded and how close."""
    config = config.for_model(model)
    if not (config.enabled or config.two_of_four):
        return ExportResult("off", config=asdict(config))
    t0, res = time.perf_counter(), ExportResult("ran", config=asdict(config))
    n_params = sum(p.numel() for p in model.parameters())
    check = config.reader_check if config.reader_check is not None else n_params <= READER_CHECK_AUTO_PARAMS
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, READER_CHECK_TOKENS), generator=torch.Generator().manual_seed(0))
    for name, weights in variants.items():
        path = Path(out_dir) / V.file_stem(name)
        packed = config.quant_format == "compressed-tensors" and name in (codes or {})
        dtype = CARD.export_dtype(config.dtype, model, packed)
        f = (facts or {}).get(name, {})
        layout, readers = None, None
        with V.applied_variant(model, weights), IO.atomic_path(path) as tmp:
            if packed:
                ckpt, bits = codes[name]
                layout, want = write_compressed_tensors(model, load_codes(ckpt), bits, tmp, config.max_shard_size,
                                                        dtype)
                layout["max_abs_diff"] = _check_decompressed(tmp, want)
                del want
            else:
                _save_plain(model, tmp, dtype, config.max_shard_size)
            tokenizer.save_pretrained(tmp)
            structure = CARD.structure(model, name, f)
            CARD.write_sidecar(tmp, {"variant": name, **structure, "export_dtype": str(dtype)[6:],
                                     **({"quantization": {k: layout[k] for k in ("format", "group_size", "groups",
                                                                                  "symmetric", "scale_dtype")}}
                                        if layout else {})})
            stored = stored_bits_per_weight(tmp, model)
            if check:
                with torch.no_grad():
                    want_logits = model(input_ids=ids.to(LM.input_device(model))).logits.float().cpu()
                readers = CARD.check_readers(tmp, ids, want_logits, packed, load_compressed_tensors)
            folder = CARD.folder_facts(tmp, stored)
            folder["check_tokens"] = ids.shape[1]
            folder["check_dtype"] = str(next(p.dtype for p in model.parameters() if p.is_floating_point()))[6:]
            if folder["sparsity_config"]:  # vLLM refuses any; we never write one
                raise RuntimeError(f"{name}: the export's config holds a sparsity_config")
            card = model_card(name, f, config.command, CARD.export_section(folder, readers, packed))
            (tmp / "README.md").write_text(card)
            _refuse_foreign_files(path, tmp)
        files = sorted(p.name for p in path.iterdir())
        res.variants[name] = {"path": str(path), "files": files, "zero_fraction_linears": structure["sparsity"],
                              "pattern": structure["pattern"], "bytes": sum(p.stat().st_size for p in path.iterdir()),
                              "stored_bits_per_weight": stored, "export_dtype": str(dtype)[6:],
                              "tensor_dtypes": folder["dtypes"],
                              **({"quant_format": layout, "group_size_written": layout["group_size"]}
                                 if packed else {}),
                              **({"readers": readers} if readers is not None else {})}
        bad = [k for k, r in (readers or {}).items() if not r["loads"]]
        log.info("exported %s to %s%s", name, path, f" (does not load with: {'; '.join(bad)})" if bad else "")
    if config.two_of_four:
        res.two_of_four = _speed(model, config, variants)
        log.info("2:4 export: %s", res.two_of_four.get("reason") or res.two_of_four.get("tokens_per_s"))
    res.seconds = time.perf_counter() - t0
    return res


def pipeline_step(run: Run, config: ExportConfig) -> Optional[str]:
    """The pipeline's export: every variant as a save_pretrained folder with its model card,
    into ``<out>/export``; "off" without --export."""
    facts = R.variant_facts(run.results, {n: run.parents.get(n) for n in run.variants})
    codes = {name: (run.out / q["checkpoint"], q["bits"]) for name, q in R.variant_records(run.results, "quantize",
                                                                                           "quantized")
             if q.get("format") == "codes" and name in run.variants}  # every quantized variant of a grid too
    if (config.enabled or config.two_of_four) and config.quant_format == "compressed-tensors" and not codes:
        log.warning("--export-quant-format compressed-tensors has no effect here: this run has no quantized "
                    "variant (--quant-method rtn or gptq with the quantize step makes one); every variant is "
                    "exported dequantized")
    res = export_variants(run.model, run.tokenizer, run.variants, run.out / "export",
                          dataclasses.replace(config, command=run.results["manifest"]["command"]), facts, codes)
    run.results["export"] = asdict(res)
    return "off" if res.status == "off" else None


def prepare(config: ExportConfig, asked: ExportConfig, run_config, texts: dict) -> ExportConfig:
    """Before loading: the compressed-tensors export writes the quantized variant's codes, which
    --save-variants does not keep."""
    if config.quant_format != "dequantized" and run_config.save_variants:
        raise C.UserError("--export-quant-format compressed-tensors needs the quantized variant's codes; "
                          "--save-variants stores it dense: drop one of the two")
    return config


def outputs_present(run: Run) -> bool:
    """Whether every file the recorded export lists is still on disk (else the step reruns)."""
    rec = run.results.get("export") or {}
    return all((run.out / "export" / V.file_stem(name) / f).is_file() for name, v in (rec.get("variants") or {}).items()
               for f in (v.get("files") or ()))
