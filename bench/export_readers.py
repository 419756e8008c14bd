"""Issue 40, item 6: every compressed-tensors export of a run, read by the readers users deploy with.

    python bench/export_readers.py --model tiny --out /tmp/er-tiny
    python bench/export_readers.py --model data/cache/SmolLM2-135M-Instruct.Q4_1-... --out /tmp/er-smol

First (once) a separate venv (``--venv``, default /tmp/llm-vllm-venv; never in the project) gets
vLLM's current release ``--no-deps``, the transformers and compressed-tensors versions vLLM pins,
and the few pure-Python packages its config code imports; torch and the rest come from the tool's
venv through a ``.pth`` line (vLLM pins another torch: its compiled extensions are not loaded, and
nothing here needs them).

Then, in the tool's venv: the model, 2:4-pruned or not (magnitude, the 2 smallest of every 4),
quantized by RTN at --group, 4 and 8 bits, symmetric and asymmetric, each exported with
``--export-quant-format compressed-tensors`` (reader check on: the tool's loader and transformers
of the tool's venv, float32 and bfloat16). In the vLLM venv, for each export: whether vLLM's
``CompressedTensorsConfig.from_config`` parses its config, the scheme and weight type vLLM's
``get_scheme`` gives each linear, the kernel ``choose_mp_linear_kernel`` picks at compute
capability 8.0 and 9.0 (vLLM's platform object replaced by a CUDA one that reports that
capability: selection only, no kernel runs), whether the parameters vLLM's scheme creates
(``create_weights``) have the shapes of the tensors in the file, and whether the transformers and
compressed-tensors that vLLM pins load it, with the logit difference from the in-run variant.
A last row is the export of the previous version, whose 2:4 marker (``sparsity_config``) vLLM
refuses. Prints a Markdown table (and ``--table FILE``).
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Pure-Python packages vLLM's config and kernel-selection modules import (found by importing them).
VLLM_IMPORTS = ["pyzmq", "pybase64", "cbor2", "msgspec", "uvloop", "py-cpuinfo", "prometheus_client", "llguidance",
                "xgrammar", "apache-tvm-ffi", "einops"]


def setup_venv(path: Path) -> Path:
    """The vLLM venv (created once): vLLM --no-deps, its pinned transformers / compressed-tensors."""
    py = path / "bin" / "python"
    if (path / ".ready").is_file():
        return py
    venv.create(path, with_pip=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--no-deps"]
    subprocess.run(pip + ["vllm"], check=True)
    reqs = subprocess.run([str(py), "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('vllm')))"],
                          check=True, capture_output=True, text=True).stdout.splitlines()
    pins = [r.split(";")[0].replace(" ", "") for r in reqs
            if r.split(";")[0].strip().startswith(("transformers", "compressed-tensors"))]
    subprocess.run(pip + pins + VLLM_IMPORTS, check=True)
    site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    import site as here
    (Path(site) / "zz_tool_venv.pth").write_text(here.getsitepackages()[0] + "\n")  # torch etc., after its own
    (path / ".ready").write_text("\n".join(pins) + "\n")
    return py


# ------------------------------------------------------------------ the vLLM side (runs in the vLLM venv)

def vllm_side(export: Path, logits: Path) -> dict:
    import importlib.metadata as md
    import warnings

    import torch

    out = {"vllm": md.version("vllm"), "transformers": md.version("transformers"),
           "compressed_tensors": md.version("compressed-tensors")}
    raw = json.loads((export / "config.json").read_text())["quantization_config"]
    try:
        import vllm.platforms as P
        from vllm.model_executor.kernels.linear import choose_mp_linear_kernel
        from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
        from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import \
            CompressedTensorsConfig
        from vllm.platforms.interface import DeviceCapability, Platform, PlatformEnum
    except Exception as e:  # noqa: BLE001
        out["import"] = f"{type(e).__name__}: {e}"[:300]
        return out
    try:
        cfg = CompressedTensorsConfig.from_config(raw)
        out["parse"] = "ok"
    except Exception as e:  # noqa: BLE001
        out["parse"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"[:300]
        cfg = None

    class Cuda(Platform):  # selection only: the capability asked, as a CUDA device reports it
        _enum, device_name, device_type, dispatch_key = PlatformEnum.CUDA, "cuda", "cuda", "CUDA"
        cc = (8, 0)

        @classmethod
        def get_device_capability(cls, device_id=0):
            return DeviceCapability(*cls.cc)

    old, fake = P.current_platform, Cuda()
    for name, mod in list(sys.modules.items()):  # the modules bound the CPU platform at import
        if name.startswith("vllm.") and getattr(mod, "current_platform", None) is old:
            mod.current_platform = fake
        if name.startswith("vllm.") and hasattr(mod, "get_tensor_model_parallel_rank"):
            mod.get_tensor_model_parallel_rank, mod.get_tensor_model_parallel_world_size = (lambda: 0), (lambda: 1)
    from safetensors import safe_open
    shapes, dtypes = {}, {}
    for f in sorted(export.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                shapes[k], dtypes[k] = tuple(h.get_slice(k).get_shape()), h.get_slice(k).get_dtype()
    linears = sorted({k.rsplit(".", 1)[0] for k in shapes if k.endswith(".weight_packed")})
    kinds: dict = {}
    for name in linears if cfg is not None else ():
        out_f, in_f = (int(x) for x in _tensor(export, name + ".weight_shape"))
        try:
            s = cfg.get_scheme(layer=torch.nn.Linear(in_f, out_f), layer_name=name)
        except Exception as e:  # noqa: BLE001
            kinds.setdefault(f"scheme error: {e}"[:200], []).append(name)
            continue
        row = {"scheme": type(s).__name__, "type": str(getattr(s, "quant_type", "?")),
               "group": getattr(s, "group_size", None)}
        for cc in (80, 90):
            Cuda.cc = divmod(cc, 10)
            c = MPLinearLayerConfig(full_weight_shape=(in_f, out_f), partition_weight_shape=(in_f, out_f),
                                    weight_type=s.quant_type, act_type=torch.bfloat16, group_size=s.group_size,
                                    zero_points=not s.symmetric)
            try:
                row[f"kernel_{cc}"] = choose_mp_linear_kernel(c, compute_capability=cc).__name__
            except Exception as e:  # noqa: BLE001
                row[f"kernel_{cc}"] = "none: " + str(e).replace("\n", " ")[:400]
        # vLLM's parameters as the scheme creates them, at a capability that has a kernel
        Cuda.cc = (8, 0) if not row["kernel_80"].startswith("none") else (9, 0)
        layer = torch.nn.Module()
        try:
            s.create_weights(layer, output_size=out_f, input_size=in_f, output_partition_sizes=[out_f],
                             input_size_per_partition=in_f, params_dtype=torch.bfloat16,
                             weight_loader=lambda *a, **k: None)
            want = {n: tuple(p.shape) for n, p in layer.named_parameters()}
            got = {n: shapes.get(f"{name}.{n}") for n in want}
            bad = {n: (want[n], got[n]) for n in want if got[n] != want[n] and not (n == "weight_shape" and got[n])}
            extra = [k[len(name) + 1:] for k in shapes if k.startswith(name + ".") and k[len(name) + 1:] not in want]
            row["shapes"] = "match" if not bad and not extra else f"differ: {bad} extra {extra}"
        except Exception as e:  # noqa: BLE001
            row["shapes"] = f"create_weights: {type(e).__name__}: {e}"[:200]
        kinds.setdefault(json.dumps(row, sort_keys=True), []).append(name)
    out["linears"] = [{**json.loads(k), "n": len(v)} if k.startswith("{") else {"error": k, "n": len(v)}
                      for k, v in kinds.items()]
    ref = torch.load(logits)
    out["readers"] = {}
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig as TCT
    import inspect
    deq = {"dequantize": True} if "dequantize" in inspect.signature(TCT.__init__).parameters else {"run_compressed": False}
    for reader, kw in (("dequantize", {"quantization_config": TCT(**deq)}), ("plain", {})):
        for dt in ("float32", "bfloat16"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m = AutoModelForCausalLM.from_pretrained(export, dtype=getattr(torch, dt), **kw).eval()
                with torch.no_grad():
                    got = m(input_ids=ref["ids"]).logits.float()
                d = (got - ref["want"]).abs()
                out["readers"][f"{reader}, {dt}"] = {"loads": True, "max": float(d.max()), "mean": float(d.mean()),
                                                     "top1": float((got.argmax(-1) == ref["want"].argmax(-1))
                                                                   .float().mean())}
            except Exception as e:  # noqa: BLE001
                out["readers"][f"{reader}, {dt}"] = {"loads": False, "error": f"{type(e).__name__}: "
                                                                              f"{str(e).splitlines()[0]}"[:200]}
    out["deq_kwargs"] = deq
    return out


def _tensor(export: Path, key: str):
    from safetensors import safe_open

    for f in sorted(export.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            if key in h.keys():
                return h.get_tensor(key).tolist()
    raise KeyError(key)


# ------------------------------------------------------------------ the tool side

def tiny_model(path: Path, tok_from: Path):
    """A random 2-layer Llama of hidden 128 (widths 128, 256: Marlin- and Machete-sized at g128)
    with SmolLM2's tokenizer, saved to ``path``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tok_from)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tool_side(a) -> list[dict]:
    import torch

    sys.path.insert(0, str(ROOT))
    import llm_common as C
    import llm_compress as LC
    import llm_export as E
    import llm_model as LM
    import llm_variants as V

    C.setup_logging("WARNING")
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    model_path = a.model
    if a.model == "tiny":
        cache = sorted((ROOT.parent / "main" / "data" / "cache").glob("SmolLM2-*")) or sorted(
            (ROOT / "data" / "cache").glob("SmolLM2-*"))
        model_path = str(tiny_model(out / "tiny-model", cache[0]))
    model, tok, _ = LM.load_model(LM.LoadConfig(model=model_path))
    lin = LM.decoder_linears(model)
    masks = {}
    for n, mod in lin.items():
        w = LM.weight_view(mod).detach().abs().reshape(-1, 4)
        masks[n + ".weight"] = torch.zeros_like(w, dtype=torch.bool).scatter_(1, w.argsort(1)[:, :2], True).reshape(
            LM.weight_view(mod).shape)
    rows = []
    for pattern in ("dense", "2:4"):
        pruned = functools.partial(V.masked_weights, masks=masks) if pattern == "2:4" else None
        for bits in (4, 8):
            for sym in (False, True):
                name = f"{'2of4-' if pattern == '2:4' else ''}w{bits}{'-sym' if sym else '-asym'}"
                with V.applied_variant(model, pruned):
                    recs = {n + ".weight": LC.rtn_quantize(LM.weight_view(m).detach(), bits, a.group, symmetric=sym)
                            for n, m in lin.items()}
                LC.save_codes(out / "run", name, recs)
                ckpt = out / "run" / "checkpoints" / f"{name}.safetensors"
                variant = functools.partial(LC.coded_weights, path=ckpt)
                res = E.export_variants(model, tok, {name: variant}, out / "export",
                                        E.ExportConfig(enabled=True, quant_format="compressed-tensors",
                                                       reader_check=True),
                                        codes={name: (ckpt, {n: bits for n in lin})})
                rec = res.variants[name]
                ids = torch.randint(0, model.get_input_embeddings().weight.shape[0], (2, E.READER_CHECK_TOKENS),
                                    generator=torch.Generator().manual_seed(0))
                with variant(model), torch.no_grad():
                    want = model(input_ids=ids).logits.float()
                (out / "logits").mkdir(parents=True, exist_ok=True)
                torch.save({"ids": ids, "want": want}, out / "logits" / f"{name}.pt")
                rows.append({"name": name, "path": str(out / "export" / name), "rec": rec,
                             "logits": str(out / "logits" / f"{name}.pt")})
                print(f"exported {name}: {rec['stored_bits_per_weight']}", flush=True)
    # the previous version's 2:4 export: the same folder with compressed-tensors' 2:4 marker
    src = next(r for r in rows if r["name"] == "2of4-w4-asym")
    legacy = out / "export-legacy" / "2of4-w4-asym+sparsity_config"
    shutil.rmtree(legacy, ignore_errors=True)
    shutil.copytree(src["path"], legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    cfg["quantization_config"]["sparsity_config"] = {
        "format": "dense", "sparsity_structure": "2:4", "targets": sorted(lin), "ignore": [],
        "global_sparsity": 0.5}
    (legacy / "config.json").write_text(json.dumps(cfg, indent=2))
    rows.append({**src, "rec": {**src["rec"], "readers": {}}, "name": "2of4-w4-asym, previous 2:4 marker",
                 "path": str(legacy), "legacy": True})
    return rows


def _diff(r: dict | None) -> str:
    if not r:
        return "-"
    if not r.get("loads"):
        return "**fails**"
    return f"{r.get('max_abs_logit_diff', r.get('max')):.3g} / {r.get('mean_abs_logit_diff', r.get('mean')):.2g}"


def _count(lin: list, key: str) -> str:
    """"Marlin x 10; none x 4": how many linears got each answer (a refusal's reason cut to its kind)."""
    n: dict = {}
    for x in lin:
        v = str(x.get(key, x.get("error", "")))
        v = v.removesuffix("LinearKernel") if not v.startswith(("none", "create_weights", "differ")) else \
            v.split(":")[0]
        n[v] = n.get(v, 0) + x.get("n", 1)
    return "; ".join(f"{k} x {c}" for k, c in sorted(n.items())) or "-"


def reasons(rows: list[dict]) -> list[str]:
    """Each distinct refusal vLLM gave, once."""
    seen = {}
    for r in rows:
        for x in (r.get("vllm") or {}).get("linears") or ():
            for key in ("kernel_80", "kernel_90", "shapes"):
                v = str(x.get(key, ""))
                if v.startswith(("none", "create_weights", "differ")):
                    seen.setdefault(v, r["name"])
    return [f"- {name}: {v}" for v, name in seen.items()]


def table(rows: list[dict], model: str) -> str:
    v = next((r["vllm"] for r in rows if r.get("vllm")), {})
    lines = [f"Model: {model}. vLLM {v.get('vllm')} (config and kernel selection run on CPU), transformers "
             f"{v.get('transformers')} + compressed-tensors {v.get('compressed_tensors')} (vLLM's pins) beside the "
             "tool's own. Logit differences from the in-run variant on 2 x 64 tokens, max / mean.", "",
             "| export | group written | bits/weight (linears, file) | vLLM parses | vLLM scheme, type | kernel sm80 | "
             "kernel sm90 | vLLM param shapes | tool loader fp32 | tf (tool) dequantize fp32 / bf16 | "
             "tf (tool) plain fp32 | tf (vLLM pin) dequantize fp32 / bf16 | tf (vLLM pin) plain fp32 |",
             "|" + "---|" * 13]
    for r in rows:
        rec, vl = r["rec"], r.get("vllm") or {}
        rd, vr = rec.get("readers") or {}, vl.get("readers") or {}
        lin = vl.get("linears") or []
        kinds = {(x.get("scheme"), x.get("type")) for x in lin}
        k80, k90, sh = _count(lin, "kernel_80"), _count(lin, "kernel_90"), _count(lin, "shapes")
        parse = vl.get("parse", vl.get("import", "not run"))
        sb = rec["stored_bits_per_weight"]
        tool = "llm-sensitivity (compressed-tensors decompressor)"
        lines.append(
            f"| {r['name']} | {rec.get('group_size_written')} | {sb['decoder_linears']:.2f}, {sb['checkpoint']:.2f} | "
            f"{'yes' if parse == 'ok' else '**no**: ' + parse} | "
            f"{'; '.join(f'{a} {b}' for a, b in sorted(kinds, key=str)) or '-'} | {k80} | {k90} | {sh} | "
            f"{_diff(rd.get(tool + ', float32'))} | "
            f"{_diff(rd.get('transformers dequantize, float32'))}; {_diff(rd.get('transformers dequantize, bfloat16'))} | "
            f"{_diff(rd.get('transformers plain, float32'))} | "
            f"{_diff(vr.get('dequantize, float32'))}; {_diff(vr.get('dequantize, bfloat16'))} | "
            f"{_diff(vr.get('plain, float32'))} |")
    why = reasons(rows)
    return "\n".join(lines + (["", "vLLM's refusals, as it words them:", ""] + why if why else [])) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="a model folder, or 'tiny'")
    p.add_argument("--out", help="folder of the exports and readers.json (required but with --vllm-side)")
    p.add_argument("--reuse", action="store_true", help="the exports of an earlier run in --out: rerun the readers")
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--venv", default="/tmp/llm-vllm-venv")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", default=None, help="also write the Markdown table here")
    p.add_argument("--vllm-side", nargs=2, metavar=("EXPORT", "LOGITS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.vllm_side:
        res = vllm_side(Path(a.vllm_side[0]), Path(a.vllm_side[1]))
        print("VLLM-SIDE " + json.dumps(res))
        return
    if not a.out:
        p.error("--out is required")
    py = setup_venv(Path(a.venv))
    rows = json.loads((Path(a.out) / "readers.json").read_text()) if a.reuse else tool_side(a)
    for r in rows:
        done = subprocess.run([str(py), __file__, "--vllm-side", r["path"], r["logits"]], capture_output=True,
                              text=True, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": str(a.threads),
                                              "VLLM_LOGGING_LEVEL": "ERROR", "HOME": "/tmp"})
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("VLLM-SIDE ")), None)
        r["vllm"] = json.loads(line[len("VLLM-SIDE "):]) if line else {"import": done.stderr.strip()[-300:]}
    (Path(a.out) / "readers.json").write_text(json.dumps([{k: v for k, v in r.items()} for r in rows], indent=1,
                                                         default=str))
    text = table(rows, a.model)
    print(text)
    if a.table:
        Path(a.table).write_text(text)


if __name__ == "__main__":
    main()
