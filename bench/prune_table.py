"""Perplexity against sparsity for several pruning methods and patterns: one pipeline grid run.

    python bench/prune_table.py --text ../shared/data/wikitext-2-raw/wiki.test.raw \
        --calib ../shared/data/wikitext-2-tokenized/valid.txt --methods magnitude,wanda,sparsegpt \
        --sparsities 0.5,0.6,0.7 --patterns unstructured,2:4

A thin wrapper over ``llm_main_v4.py --steps prune,eval`` with comma lists on the pruning knobs:
the model is loaded once and the calibration windows drawn once. The run folder (--out) holds
results.json, report.md with the grid table, and plots/prune_curves.png; this script also prints
the table. --text and --calib take what --dataset and --train-dataset take (wikitext2, c4, a
file). Other flags (--seq-len, --eval-tokens, --calib-samples, --calib-seq-len, --model, ...)
pass through to the pipeline.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llm_main_v4 as M  # noqa: E402
import llm_results as R  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default="wikitext2", help="evaluation text (--dataset)")
    p.add_argument("--calib", default="wikitext2", help="calibration text (--train-dataset)")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--sparsities", default="0.5,0.6,0.7")
    p.add_argument("--patterns", default="unstructured")
    p.add_argument("--out", default="out/prune_table")
    a, rest = p.parse_known_args()
    argv = ["--steps", "prune,eval", "--dataset", a.text, "--train-dataset", a.calib, "--prune-method", a.methods,
            "--sparsity", a.sparsities, "--sparsity-pattern", a.patterns, "--output-dir", a.out,
            "--log-level", "WARNING", *rest]
    rc = M.main(argv)
    if rc:
        return rc
    res = json.loads((Path(a.out) / "results.json").read_text())
    curves = R.prune_curves(res)
    dense_ppl, _ = curves.pop("dense")
    print(f"\n{'method':10s} {'pattern':12s} {'sparsity':>8s} {'perplexity':>11s}   (dense {R.fmt(dense_ppl)})")
    for (method, pattern), pts in curves.items():
        for s, ppl, _ in pts:
            print(f"{method:10s} {pattern:12s} {s:8.4f} {R.fmt(ppl):>11s}")
    print(f"\ncurves: {Path(a.out) / 'plots' / 'prune_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
