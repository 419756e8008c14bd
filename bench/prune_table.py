"""Perplexity of every pruning method at 50% unstructured and 2:4 on the embedded model.

    python bench/prune_table.py --calib-windows 32 --calib-seq-len 2048 --eval-tokens 65536 --seq-len 2048

Calibration: windows of ../shared/data/wikitext-2-tokenized/valid.txt; evaluation: the first
--eval-tokens tokens of ../shared/data/wikitext-2-raw/wiki.test.raw. The defaults are a
reduced protocol sized for a 2-core CPU; the flags above give the full one. Writes the table
to --out (JSON) and the perplexity-vs-sparsity plot beside it when --sweep is given.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llm_common as C  # noqa: E402
import llm_data as D  # noqa: E402
import llm_io as IO  # noqa: E402
import llm_model as LM  # noqa: E402
import llm_variants as V  # noqa: E402
from llm_perplexity import EvalConfig, evaluate_model  # noqa: E402
from llm_prune_model import PruneConfig, prune_model  # noqa: E402
from llm_plots import plot_perplexity_vs_sparsity  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt,taylor")
    p.add_argument("--patterns", default="unstructured,2:4")
    p.add_argument("--sweep", default="", help="comma list of sparsities for the perplexity-vs-sparsity plot")
    p.add_argument("--out", default="out/prune_table.json")
    a = p.parse_args()
    C.setup_logging("WARNING")
    model, tok, label = LM.load_model(LM.LoadConfig(model=a.model))
    calib = D.sample_windows(D.tokenize_corpus(tok, (SHARED / "wikitext-2-tokenized" / "valid.txt").read_text()),
                             a.calib_windows, a.calib_seq_len, seed=0)
    ids = D.tokenize_corpus(tok, (SHARED / "wikitext-2-raw" / "wiki.test.raw").read_text())
    ecfg = EvalConfig(seq_len=a.seq_len, eval_tokens=a.eval_tokens, max_new_tokens=0, progress=False)
    names = [n + ".weight" for n in LM.decoder_linears(model)]
    rows = [{"method": "dense", "pattern": "-", "perplexity": evaluate_model(model, tok, ids, ecfg).perplexity}]
    print(f"dense: {rows[0]['perplexity']:.3f}", flush=True)
    jobs = [(m, pat, 0.5) for pat in a.patterns.split(",") for m in a.methods.split(",")]
    jobs += [(m, "unstructured", float(s)) for s in a.sweep.split(",") if s for m in a.methods.split(",")]
    for method, pattern, sparsity in jobs:
        with V.restored_on_exit(model, names):
            t = time.perf_counter()
            res = prune_model(model, tok, calib, PruneConfig(method=method, sparsity=sparsity, pattern=pattern,
                                                             progress=False))
            ppl = evaluate_model(model, tok, ids, ecfg).perplexity
        rows.append({"method": method, "pattern": pattern, "sparsity": res.overall_sparsity, "perplexity": ppl,
                     "prune_seconds": res.seconds, "total_seconds": time.perf_counter() - t})
        print(f"{method:10s} {pattern:12s} sparsity {res.overall_sparsity:.4f}  perplexity {ppl:10.3f}  "
              f"prune {res.seconds:6.1f} s", flush=True)
    out = Path(a.out)
    IO.write_json(out, {"model": label, "calibration": f"{a.calib_windows} x {a.calib_seq_len} valid.txt",
                       "evaluation": f"first {a.eval_tokens} tokens of wiki.test.raw, windows of {a.seq_len}",
                       "rows": rows})
    if a.sweep:
        sweep = {}
        for r in rows:
            if r["method"] != "dense" and r["pattern"] == "unstructured":
                sweep.setdefault(r["method"], {})[str(round(r["sparsity"], 2))] = r["perplexity"]
        plot_perplexity_vs_sparsity(sweep, out.with_suffix(".png"), dense=rows[0]["perplexity"])


if __name__ == "__main__":
    main()
