"""Issue 38: do the intervals cover, and is a † a real difference? Measured on real per-window NLLs.

    python bench/coverage.py                         # embedded SmolLM2, WikiText-2 test beside the checkout
    python bench/coverage.py --seq-len 512 --windows 8,16,32,64 --out data/bench/coverage.md

Step 1 (once, cached in ``data/bench/coverage_nll_<seq>_<population>.json``): the first --population
disjoint windows (200 of 256 tokens: 51k tokens, the first sixth; 0 for the whole split, an hour on
a quiet 2-core CPU) of the WikiText-2 test split (``../shared/data/wikitext-2-raw/wiki.test.raw``),
the population, scored by the embedded model
and by its 4-bit RTN g128 variant (``quantize_model``, integer zero point), through the tool's own
``evaluate_model``: each window's NLL sum and token count. The truth of every question below is its
value over ALL the population's windows.

Step 2: the tool's own interval and test functions (``llm_stats.perplexity_interval`` and
``paired_perplexity``, with the ``dependent`` flag and ``strata`` the eval step would set) on
samples of n windows, for n in --windows, under these designs:
- spread: the tool's ``spread_indices`` (two windows drawn at random in each of n/2 equal stretches
  of the text), one sample per seed in [0, --draws), with the stratified interval;
- systematic (the spread design before 2026-12-07, for reference): every k-th window (k = W // n)
  from every offset in [0, W), taken circularly (indices mod W), with the interval of independent
  windows; a systematic sample has no unbiased variance estimator, and this row shows what that does;
- first: n adjacent windows from every start in [0, W) circularly, as ``--eval-sampling first``
  takes them (the first n); the tool treats them as dependent.

For each it prints the coverage of the perplexity interval (truth: the base's perplexity over all
windows), of the paired ratio interval (truth: RTN over base, all windows), the false-positive rate
of the paired test at nominal 0.05 on a planted null (each window's real RTN difference minus its
token-weighted mean: the true ratio is exactly 1), and the power on the real difference and on a
planted ×1.02 (that null plus log 1.02 nats on every token); each with
a Wilson 95% interval. The samples of systematic and first overlap (neighbouring offsets share
windows), so there the binomial interval is a guide, not exact. Targets (spread at the CPU default of 32 windows):
coverage in [0.93, 0.97], false positives <= 0.06.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402

import llm_io as IO  # noqa: E402
import llm_stats as S  # noqa: E402
from llm_perplexity import spread_indices, spread_strata  # noqa: E402

log = logging.getLogger("bench.coverage")
SMALL = float(np.log(1.02))  # a planted 2% perplexity increase on every token: the power column's small effect
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
CALIB = ROOT.parent / "shared" / "data" / "wikitext-2-tokenized" / "valid.txt"


def window_nll(seq_len: int, population: int, cache: Path) -> dict:
    """{"base": [sums], "rtn4": [sums], "tokens": [counts]} over the first ``population`` disjoint
    windows of WikiText-2 test (0: all of them)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    import llm_data as D
    import llm_model as LM
    from llm_config import EvalConfig, QuantizeConfig
    from llm_perplexity import evaluate_model
    from llm_quantize_model import quantize_model

    model, tok, _ = LM.load_model(LM.LoadConfig())
    ids = D.tokenize_corpus(tok, D.load_corpus(str(WIKI), "test"))
    cfg = EvalConfig(seq_len=seq_len, eval_tokens=population * seq_len, sampling="first", max_new_tokens=0,
                     batch_size=1, progress=True)
    out = {}
    t = time.perf_counter()
    base = evaluate_model(model, tok, ids, cfg)
    out["base"], out["tokens"] = base.window_nll, base.window_tokens
    calib = D.tokenize_corpus(tok, D.load_corpus(str(CALIB), "train"))
    quantize_model(model, tok, calib, QuantizeConfig(method="rtn", wbits=4, group=128))  # in place
    out["rtn4"] = evaluate_model(model, tok, ids, cfg).window_nll
    out.update(seq_len=seq_len, windows=len(out["tokens"]), seconds=time.perf_counter() - t,
               text=str(WIKI.name), model=LM.EMBEDDED_NAME)
    cache.parent.mkdir(parents=True, exist_ok=True)
    IO.write_json(cache, out)
    return out


def rate(hits: int, n: int) -> str:
    lo, hi = S.wilson_interval(hits, n)
    return f"{hits / n:.3f} [{lo:.3f}, {hi:.3f}]"


def run(data: dict, sizes: list, designs: list, draws: int = 2000) -> list[str]:
    base, rtn, tok = (np.asarray(data[k], float) for k in ("base", "rtn4", "tokens"))
    W = base.size
    truth_nll = base.sum() / tok.sum()
    truth_delta = (rtn - base).sum() / tok.sum()
    null = base + (rtn - base) - truth_delta * tok  # planted: true delta exactly 0 over all windows
    lag1 = float(np.corrcoef(base[:-1] / tok[:-1], base[1:] / tok[1:])[0, 1])
    lines = [f"{W} windows of {data['seq_len']} tokens; base perplexity {np.exp(truth_nll):.3f}, RTN 4-bit g128 "
             f"{np.exp(rtn.sum() / tok.sum()):.3f} (ratio {np.exp(truth_delta):.4f}); lag-1 correlation of "
             f"the base's per-window NLL {lag1:.2f}.", "",
             "| design | windows | method | samples | perplexity coverage | ratio coverage | null false positives "
             "| power (RTN) | power (×1.02) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for design in designs:
        for n in sizes:
            k = max(1, W // n)
            cov_p = cov_r = fp = pw = pw_small = 0
            method = ""
            strata = spread_strata(n) if design == "spread" else None
            samples = ([spread_indices(W, n, seed) for seed in range(draws)] if design == "spread" else
                       [((o + k * np.arange(n)) if design == "systematic" else (o + np.arange(n))) % W
                        for o in range(W)])
            for o, idx in enumerate(samples):
                kw = {"dependent": design == "first", "strata": strata, "seed": o}
                lo, hi = S.perplexity_interval(base[idx], tok[idx], **kw)
                cov_p += lo <= np.exp(truth_nll) <= hi
                real = S.paired_perplexity(base[idx], tok[idx], rtn[idx], tok[idx], **kw)
                lo, hi = real["ppl_ratio_ci95"]
                cov_r += lo <= np.exp(truth_delta) <= hi
                pw += real["p_value"] < 0.05
                planted = S.paired_perplexity(base[idx], tok[idx], null[idx], tok[idx], **kw)
                fp += planted["p_value"] < 0.05
                small = S.paired_perplexity(base[idx], tok[idx], null[idx] + SMALL * tok[idx], tok[idx], **kw)
                pw_small += small["p_value"] < 0.05
                method = real["kind"]
            m = len(samples)
            lines.append(f"| {design} | {n} | {method} | {m} | {rate(cov_p, m)} | {rate(cov_r, m)} | {rate(fp, m)} | "
                         f"{rate(pw, m)} | {rate(pw_small, m)} |")
            log.info("%s", lines[-1])
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=256, help="the CPU default window")
    ap.add_argument("--population", type=int, default=200,
                    help="the first N windows of the text are the population (0: the whole split; about "
                         "1,180 windows of 256, two model passes of 302k tokens: an hour of a quiet 2-core CPU)")
    ap.add_argument("--windows", default="8,16,32,64")
    ap.add_argument("--designs", default="spread,systematic,first")
    ap.add_argument("--draws", type=int, default=2000, help="seeds of the spread design per row")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default=str(ROOT / "data" / "bench" / "coverage.md"))
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not WIKI.is_file():
        sys.exit(f"error: {WIKI} not found (the shared WikiText-2 test split beside the checkout)")
    cache = Path(a.cache or ROOT / "data" / "bench" / f"coverage_nll_{a.seq_len}_{a.population}.json")
    data = window_nll(a.seq_len, a.population, cache)
    t = time.perf_counter()
    lines = run(data, [int(x) for x in a.windows.split(",")], a.designs.split(","), a.draws)
    text = "\n".join(lines) + f"\n\n(simulation {time.perf_counter() - t:.0f} s; NLL pass {data['seconds']:.0f} s)\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
