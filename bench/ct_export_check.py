"""Issue 34, item 3: the compressed-tensors pack-quantized export of the embedded model, checked.

    taskset -c 1 python bench/ct_export_check.py --model MODEL --calib WIKI/valid.txt --out /tmp/ct

Quantizes the decoder linears (RTN, --wbits, --group, integer zero point, as the quantize step),
stores the codes (``save_codes``) and exports the variant with ``--export-quant-format
compressed-tensors``; prints the layout (config groups, regrouped and dense linears), the bits
actually written per weight (codes checkpoint; the export's decoder linears and whole
checkpoint) and the largest logit difference on 2 x 128 tokens between the in-run model and
the export decompressed by compressed-tensors (float32, then bfloat16). Then the tolerance of a
reader that casts the float32 scales to bf16 (as a bf16 vLLM model holds its ``weight_scale``):
the logit difference with every group's scale rounded to bf16, beside the difference that bf16
arithmetic alone makes (the same weights in a float32 model).
"""
import argparse
import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

import llm_common as C  # noqa: E402
import llm_compress as LC  # noqa: E402
import llm_data as D  # noqa: E402
import llm_export as E  # noqa: E402
import llm_model as LM  # noqa: E402
from llm_config import QuantizeConfig  # noqa: E402
from llm_quantize_model import quantize_model  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--scale-dtype", default="float32", choices=("float32", "float16"))
    a = p.parse_args()
    C.setup_logging("WARNING")
    torch.set_num_threads(1)
    out = Path(a.out)
    model, tok, _ = LM.load_model(LM.LoadConfig(model=a.model))
    calib = D.load_corpus(str(Path(a.calib).resolve()), "train")
    names = {n: LM.weight_view(m).detach().clone() for n, m in LM.decoder_linears(model).items()}
    qcfg = QuantizeConfig(method="rtn", wbits=a.wbits, group=a.group, scale_dtype=a.scale_dtype, progress=False)
    res = quantize_model(model, tok, calib, qcfg)
    for n, w in names.items():  # back to the base weights: the variant is applied from its codes
        LM.weight_view(model.get_submodule(n)).data.copy_(w)
    rec = LC.save_codes(out, "quantized", res.quantized)
    ckpt = out / rec["checkpoint"]
    n_w = sum(w.numel() for w in names.values())
    variant = functools.partial(LC.coded_weights, path=ckpt)
    ex = E.export_variants(model, tok, {"quantized": variant}, out / "export",
                           E.ExportConfig(enabled=True, quant_format="compressed-tensors"),
                           codes={"quantized": (ckpt, res.bits)}).variants["quantized"]
    report = {"avg_bits_papers": res.avg_bits, "codes_checkpoint_bits": LC.stored_bits(ckpt, n_w),
              "export_bits": ex["stored_bits_per_weight"], "bytes": ex["bytes"],
              "layout": {k: v for k, v in ex["quant_format"].items() if k != "regrouped"},
              "regrouped": len(ex["quant_format"]["regrouped"])}
    ids = torch.randint(0, tok.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    with variant(model), torch.no_grad():
        want32 = model(ids).logits
    codes = LC.load_codes(ckpt)
    for dtype in (torch.float32, torch.bfloat16):
        loaded = E.load_compressed_tensors(out / "export" / "quantized", dtype)
        with torch.no_grad():
            got = loaded(ids).logits.float()
            # The in-run weights (dequantized into dtype) in the same loaded model: its rotary
            # frequencies etc. stay as a load in dtype makes them, so only the linears differ.
            for pname, q in codes.items():
                loaded.get_parameter(pname).data.copy_(q.dequantize(dtype))
            want = loaded(ids).logits.float()
            report[f"max_abs_logit_diff_{str(dtype)[6:]}"] = float((got - want).abs().max())
            if dtype == torch.float32:
                report["max_abs_logit_diff_vs_in_run_model_float32"] = float((got - want32).abs().max())
            else:  # a reader holding the scales in bf16 (as a bf16 vLLM model holds weight_scale)
                for pname, q in codes.items():
                    q.scale = q.scale.bfloat16().float()
                    loaded.get_parameter(pname).data.copy_(q.dequantize(dtype))
                diff = (loaded(ids).logits.float() - want).abs()
                report["bf16_scales_logit_diff_max_mean"] = [float(diff.max()), float(diff.mean())]
                # For scale: the same quantized weights in bf16 against float32 (bf16 arithmetic alone)
                base = (want - want32).abs()
                report["bf16_vs_float32_logit_diff_max_mean"] = [float(base.max()), float(base.mean())]
                report["logit_max_abs"] = float(want.abs().max())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
