"""Issue 34, item 4: how much calibration GPTQ needs to beat RTN on the embedded model.

    taskset -c 1 python bench/gptq_calibration.py --text WIKI/wiki.test.raw \\
        --calib WIKI/valid.txt --samples 8,16,32 --out /tmp/gptq_calibration.json

For 4-bit group 128 (integer zero point, the quantize step's defaults): RTN once, then GPTQ
with each --samples count of calibration windows of 512 tokens (each --seeds draw, drawn from
--calib as the pipeline draws them). Each row: WikiText-2 perplexity (disjoint --seq-len windows over the
first --eval-tokens tokens of --text, the pipeline's CPU eval protocol), the quantize step's
wall and CPU time (one core when run under taskset -c 1), and the relative output error
||(W - Q) X|| / ||W X|| that ``quantize_model`` records, averaged over the linears (all, and
the MLP down projections alone) on its first 8 calibration windows (``--quant-error-windows 8``) and on
a disjoint held-out draw of as many (the README's 32-window figures predate that cap: all 32). Rows are written (atomically) after each one, and a markdown table beside
--out.
"""
import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

import llm_common as C  # noqa: E402
import llm_data as D  # noqa: E402
import llm_io as IO  # noqa: E402
import llm_model as LM  # noqa: E402
import llm_variants as V  # noqa: E402
from llm_config import EvalConfig, QuantizeConfig  # noqa: E402
from llm_perplexity import evaluate_model  # noqa: E402
from llm_quantize_model import quantize_model  # noqa: E402

log = logging.getLogger("bench.gptq_calibration")


def _mean(d: dict, part: str = "") -> float:
    vals = [v for k, v in d.items() if part in k]
    return sum(vals) / len(vals) if vals else float("nan")


def markdown(doc: dict) -> str:
    lines = [f"{doc['model']}: {doc['evaluation']}; calibration {doc['calibration']}; 4-bit, group 128, "
             f"integer zero point. Dense perplexity {doc['dense_perplexity']:.2f}.", "",
             "Output error ||(W-Q)X||/||WX||, mean over the 210 linears (down_proj: over the 30 MLP down "
             "projections), on (up to 8 of) the calibration windows and on a disjoint held-out draw of as "
             "many.", "",
             "| method | windows x tokens | seed | perplexity | quantize s (CPU s) | err calib | "
             "err held-out | "
             "down_proj calib | down_proj held-out |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['method']} | {r['windows']} x {r['seq_len']} | {r.get('seed', 0)} | "
                     f"{r['perplexity']:.2f} | {r['quantize_seconds']:.0f} "
                     f"({r.get('cpu_seconds', float('nan')):.0f}) | "
                     f"{r['err_calibration']:.4f} | {r['err_held_out']:.4f} | "
                     f"{r['down_calibration']:.4f} | {r['down_held_out']:.4f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", required=True, help="evaluation text (WikiText-2 test, raw)")
    p.add_argument("--calib", required=True, help="calibration text (WikiText-2 validation, or embedded)")
    p.add_argument("--out", required=True, help="JSON output; the markdown table goes beside it (.md)")
    p.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2)")
    p.add_argument("--cache-dir", default="data/cache", help="dequantized GGUF cache of the embedded model")
    p.add_argument("--samples", default="8,16,32", help="GPTQ calibration window counts")
    p.add_argument("--seeds", default="0", help="calibration draws (seeds) of each GPTQ count")
    p.add_argument("--no-rtn", action="store_true", help="skip the RTN row (it does not depend on the draw)")
    p.add_argument("--seq-len-calib", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    C.setup_logging("WARNING")
    torch.set_num_threads(a.threads)
    out = Path(a.out).resolve()
    try:
        cache = str(Path(a.cache_dir).resolve())
        model, tok, name = LM.load_model(LM.LoadConfig(model=a.model, cache_dir=cache))
        ids = D.tokenize_corpus(tok, D.load_corpus(str(Path(a.text).resolve()), "test"))
        # "embedded": the pydoc corpus the pipeline falls back to offline (WikiText-2 train not cached)
        calib = D.load_corpus(a.calib if a.calib == "embedded" else str(Path(a.calib).resolve()), "train")
    except C.UserError as e:
        sys.exit(f"error: {C.error_line(e)}")
    ecfg = EvalConfig(seq_len=a.seq_len, eval_tokens=a.eval_tokens, max_new_tokens=0, progress=False)
    doc = {"model": name, "threads": a.threads,
           "evaluation": f"WikiText-2 test ({Path(a.text).name}), perplexity over disjoint {a.seq_len}-token "
                         f"windows of the first {a.eval_tokens} tokens",
           "calibration": f"{Path(a.calib).name}, windows of {a.seq_len_calib} tokens, seeds {a.seeds}",
           "dense_perplexity": evaluate_model(model, tok, ids, ecfg).perplexity, "rows": []}
    print(f"dense perplexity {doc['dense_perplexity']:.3f}", flush=True)
    names = [n + ".weight" for n in LM.decoder_linears(model)]
    first = int(a.samples.split(",")[0])
    jobs = ([] if a.no_rtn else [("rtn", first, 0)]) + [("gptq", int(n), int(s)) for s in a.seeds.split(",")
                                                        for n in a.samples.split(",")]
    for method, n, seed in jobs:
        with V.restored_on_exit(model, names):
            t, cpu = time.perf_counter(), time.process_time()
            qcfg = QuantizeConfig(method=method, wbits=4, group=128, calib_samples=n,
                                  calib_seq_len=a.seq_len_calib, calib_seed=seed, error_windows=8, progress=False)
            r = quantize_model(model, tok, calib, qcfg)
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
            ppl = evaluate_model(model, tok, ids, ecfg).perplexity
        e = r.output_error
        row = {"method": method, "seed": seed, "cpu_seconds": cpu, "windows": r.calibration["windows"],
               "seq_len": r.calibration["seq_len"], "perplexity": ppl, "quantize_seconds": wall,
               "held_out_windows": e["held_out_windows"],
               "err_calibration": _mean(e["calibration"]), "err_held_out": _mean(e["held_out"]),
               "down_calibration": _mean(e["calibration"], "down_proj"),
               "down_held_out": _mean(e["held_out"], "down_proj"), "output_error": e}
        doc["rows"].append(row)
        print(f"{method} {n:3d} windows seed {seed}: ppl {ppl:.3f}, {wall:.0f} s ({cpu:.0f} s CPU), "
              f"error calib {row['err_calibration']:.4f} held-out {row['err_held_out']:.4f} (down_proj "
              f"{row['down_calibration']:.4f} / {row['down_held_out']:.4f})", flush=True)
        IO.write_json(out, doc)
        out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
