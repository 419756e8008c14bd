"""llm_stats against independent computations (plain numpy transcriptions, scipy.stats) on
planted data whose answer is known, and the per-window sums of the evaluation against a hand loop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

import llm_stats as S
from llm_data import tokenize_corpus
from llm_evaluate_models import EvalConfig, evaluate_model, evaluate_variants


def numpy_paired_bootstrap(a, b, n_boot, seed, level=0.95):
    """The paired bootstrap written out: n_boot rows of n indices drawn with replacement by
    Generator(seed).integers, the mean difference of each row, its percentiles."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    boots = np.array([np.mean(b[row] - a[row]) for row in idx])
    return np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])


def numpy_paired_perplexity(ps, pt, vs, vt, n_boot, seed, level=0.95):
    ps, pt, vs, vt = (np.asarray(x, float) for x in (ps, pt, vs, vt))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ps), size=(n_boot, len(ps)))
    boots = [vs[r].sum() / vt[r].sum() - ps[r].sum() / pt[r].sum() for r in idx]
    return np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (17, 40), (1, 1)])
def test_wilson_interval_is_scipys_and_its_formula(k, n):
    ci = scipy.stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert S.wilson_interval(k, n) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
    # Wilson's closed form, written out: centre and half-width of the score interval.
    z, p = scipy.stats.norm.ppf(0.975), k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = S.wilson_interval(k, n)
    assert (lo, hi) == (pytest.approx(max(0.0, centre - half), abs=1e-9), pytest.approx(min(1.0, centre + half),
                                                                                         abs=1e-9))
    assert all(math.isnan(x) for x in S.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        S.wilson_interval(5, 4)


def test_mean_interval_is_students_t():
    x = np.random.default_rng(3).normal(2.0, 1.5, size=12)
    m, s = x.mean(), x.std(ddof=1) / math.sqrt(len(x))
    q = scipy.stats.t.ppf(0.975, len(x) - 1)
    lo, hi = S.mean_interval(x)
    assert (lo, hi) == (pytest.approx(m - q * s, rel=1e-12), pytest.approx(m + q * s, rel=1e-12))
    lo90, hi90 = S.mean_interval(x, level=0.9)
    assert lo < lo90 < hi90 < hi
    assert all(math.isnan(v) for v in S.mean_interval([1.0]))
    assert all(math.isnan(v) for v in S.mean_interval([1.0, float("nan")]))  # one finite value
    assert S.mean_interval([1.0, 2.0, float("inf")]) == (math.inf, math.inf)  # propagated, not dropped
    assert all(math.isnan(v) for v in S.mean_interval([1.0, 2.0, float("nan")]))
    assert S.mean_interval([4.0, 4.0, 4.0]) == (4.0, 4.0)


def test_paired_difference_equals_a_numpy_transcription():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = a + 0.3 + rng.normal(scale=0.5, size=50)
    got = S.paired_difference(a, b, n_boot=500, seed=7)
    want = numpy_paired_bootstrap(a, b, 500, 7)
    assert got["ci95"] == [pytest.approx(want[0], abs=1e-12), pytest.approx(want[1], abs=1e-12)]
    assert got["mean"] == pytest.approx(np.mean(b - a), abs=1e-12) and got["n"] == 50
    assert got["significant"] is True and got["method"] == "paired bootstrap, 500 resamples of 50 samples (percentile)"
    # Its p inverts the percentile interval: twice the smaller tail of the replicates beyond 0, +1 smoothed.
    boots = np.array([np.mean((b - a)[r]) for r in np.random.default_rng(7).integers(0, 50, size=(500, 50))])
    assert got["p_value"] == pytest.approx(min(1, 2 * (min((boots <= 0).sum(), (boots >= 0).sum()) + 1) / 501))
    assert S.paired_difference(a, b, n_boot=500, seed=7) == got  # deterministic for a seed
    assert S.paired_difference(a, b, n_boot=500, seed=8)["ci95"] != got["ci95"]
    # Pure noise around no shift: the interval straddles 0.
    null = S.paired_difference(a, a + rng.normal(scale=0.5, size=50) - 0.0, n_boot=500, seed=7)
    assert null["ci95"][0] < 0 < null["ci95"][1] and null["significant"] is False


def test_identical_units_give_zero_and_are_not_a_difference():
    a = np.random.default_rng(1).normal(size=40)
    d = S.paired_difference(a, a.copy())
    assert d["mean"] == 0.0 and d["ci95"] == [0.0, 0.0] and d["significant"] is False
    one = S.paired_difference([1.0], [5.0])
    assert math.isnan(one["ci95"][0]) and one["significant"] is False and "no interval" in one["method"]
    with pytest.raises(ValueError, match="same units"):
        S.paired_difference([1, 2, 3], [1, 2])
    bad = S.paired_difference([1.0, 2.0, 3.0], [1.0, float("nan"), 3.0])  # never raises, never significant
    assert math.isnan(bad["mean"]) and bad["significant"] is False


def test_mcnemar_on_planted_questions():
    """0 of 100 questions differ: p = 1, not significant. 30 of 100 differ, all for the variant:
    p is scipy's binomtest(0, 30), significant; the bootstrap interval is a numpy transcription's."""
    rng = np.random.default_rng(2)
    parent = rng.random(100) < 0.5
    same = S.mcnemar_exact(parent, parent.copy())
    assert (same["a_only"], same["b_only"], same["p_value"], same["significant"]) == (0, 0, 1.0, False)
    assert same["diff"] == 0.0 and same["diff_ci95"] == [0.0, 0.0] and same["acc_a"] == same["acc_b"]

    wrong = np.flatnonzero(~parent)[:30]
    assert len(wrong) == 30
    variant = parent.copy()
    variant[wrong] = True  # right on 30 questions the parent got wrong, wrong on none it got right
    t = S.mcnemar_exact(parent, variant)
    assert (t["n"], t["a_only"], t["b_only"]) == (100, 0, 30)
    assert t["p_value"] == scipy.stats.binomtest(0, 30, 0.5).pvalue == pytest.approx(2 * 0.5 ** 30)
    assert t["significant"] is True and t["diff"] == pytest.approx(0.30)
    assert t["acc_b"] - t["acc_a"] == pytest.approx(0.30)
    want = numpy_paired_bootstrap(parent.astype(float), variant.astype(float), S.N_BOOT, 0)
    assert t["diff_ci95"] == [pytest.approx(want[0]), pytest.approx(want[1])]
    assert t["diff_ci95"][0] > 0 and "bootstrap" in t["ci_method"]
    # Symmetric: the parent against the variant gives the same p, the opposite difference.
    back = S.mcnemar_exact(variant, parent)
    assert back["p_value"] == t["p_value"] and back["diff"] == -t["diff"]


@pytest.mark.parametrize("a_only,b_only", [(3, 7), (10, 4), (5, 5), (0, 1)])
def test_mcnemar_p_is_the_exact_binomial_test_of_the_discordant_pairs(a_only, b_only):
    n = 60
    a = np.zeros(n, bool)
    b = np.zeros(n, bool)
    a[:a_only] = True
    b[a_only:a_only + b_only] = True
    a[50:], b[50:] = True, True  # concordant right answers
    t = S.mcnemar_exact(a, b)
    p = scipy.stats.binomtest(min(a_only, b_only), a_only + b_only, 0.5).pvalue
    assert (t["a_only"], t["b_only"]) == (a_only, b_only) and t["p_value"] == pytest.approx(p, abs=1e-15)
    assert t["significant"] == (p < 0.05)
    with pytest.raises(ValueError):
        S.mcnemar_exact([1, 0, 2], [1, 0, 1])


def ratio_t_interval(sums, tokens, level=0.95):
    """The ratio estimator's Student-t interval written out: R = sum s / sum t, the linearized
    residuals (s_i - R t_i) / mean t, their standard error, t quantile on n - 1 df."""
    s, t = np.asarray(sums, float), np.asarray(tokens, float)
    r = s.sum() / t.sum()
    z = (s - r * t) / t.mean()
    se = z.std(ddof=1) / math.sqrt(len(s))
    q = scipy.stats.t.ppf((1 + level) / 2, len(s) - 1)
    return r - q * se, r + q * se


def test_perplexity_interval_is_a_ratio_estimator_over_windows():
    """Below 30 windows: Student-t on the ratio estimator's linearized residuals; from 30 on: the
    percentile bootstrap of the ratio estimator (a numpy transcription)."""
    rng = np.random.default_rng(4)
    tokens = rng.integers(20, 40, size=16).astype(float)  # unequal windows
    sums = tokens * rng.normal(3.0, 0.3, size=16)
    lo, hi = S.perplexity_interval(sums, tokens, n_boot=800, seed=3)
    want = np.exp(ratio_t_interval(sums, tokens))
    assert (lo, hi) == (pytest.approx(want[0], rel=1e-12), pytest.approx(want[1], rel=1e-12))
    assert lo < math.exp(sums.sum() / tokens.sum()) < hi
    tokens = rng.integers(20, 40, size=40).astype(float)
    sums = tokens * rng.normal(3.0, 0.3, size=40)
    lo, hi = S.perplexity_interval(sums, tokens, n_boot=800, seed=3)
    r = np.random.default_rng(3).integers(0, 40, size=(800, 40))
    want = np.exp(np.quantile([sums[i].sum() / tokens[i].sum() for i in r], [0.025, 0.975]))
    assert (lo, hi) == (pytest.approx(want[0], rel=1e-12), pytest.approx(want[1], rel=1e-12))
    assert all(math.isnan(x) for x in S.perplexity_interval([3.0], [10]))
    lo_inf, hi_inf = S.perplexity_interval([3.0, 2e4, 4.0], [1, 1, 1])  # overflow: inf, never a raise
    assert hi_inf == math.inf


def test_paired_perplexity_on_identical_and_planted_windows():
    rng = np.random.default_rng(5)
    tokens = rng.integers(20, 40, size=12).astype(float)
    parent = tokens * rng.normal(3.0, 0.4, size=12)
    same = S.paired_perplexity(parent, tokens, parent.copy(), tokens)
    assert same["delta_nll"] == 0.0 and same["delta_nll_ci95"] == [0.0, 0.0] and same["significant"] is False
    assert same["ppl_ratio"] == 1.0 and same["ppl_ratio_ci95"] == [1.0, 1.0] and same["n_windows"] == 12

    # A variant 0.05 nats/token worse on every window, give or take 0.01: a real difference, though the
    # windows' own spread (0.4 nats) makes the two unpaired perplexity intervals overlap.
    variant = parent + tokens * (0.05 + rng.normal(0, 0.01, size=12))
    d = S.paired_perplexity(parent, tokens, variant, tokens, n_boot=1000, seed=9)
    want = ratio_t_interval(variant - parent, tokens)  # 12 windows: Student-t on the paired differences
    assert d["delta_nll_ci95"] == [pytest.approx(want[0], abs=1e-12), pytest.approx(want[1], abs=1e-12)]
    assert d["delta_nll"] == pytest.approx(variant.sum() / tokens.sum() - parent.sum() / tokens.sum())
    assert d["significant"] is True and 0.03 < d["delta_nll_ci95"][0] < d["delta_nll_ci95"][1] < 0.07
    assert d["ppl_ratio"] == pytest.approx(math.exp(d["delta_nll"]))
    assert d["ppl_ratio_ci95"] == [pytest.approx(math.exp(x)) for x in d["delta_nll_ci95"]]
    p_lo, p_hi = S.perplexity_interval(parent, tokens)
    v_lo, v_hi = S.perplexity_interval(variant, tokens)
    assert v_lo < p_hi  # unpaired, the intervals overlap: only the paired test sees the difference

    with pytest.raises(ValueError, match="same windows"):
        S.paired_perplexity(parent, tokens, variant[:-1], tokens[:-1])
    one = S.paired_perplexity([3.0], [10], [4.0], [10])
    assert one["significant"] is False and one["method"] == "1 window: no interval"


def test_window_sums_reproduce_the_perplexity_of_a_hand_loop(tiny_llama, tok, sample_text):
    """Each window's NLL sum and token count equal a plain loop over the windows of the model's
    float64 log-probabilities; together they give the model's mean NLL and perplexity."""
    model = tiny_llama(seed=4)
    ids = tokenize_corpus(tok, sample_text[:260])
    res = evaluate_model(model, tok, ids, EvalConfig(seq_len=32, max_new_tokens=0, batch_size=3, progress=False))
    sums, counts = [], []
    for start in range(0, ids.numel() - 31, 32):
        w = ids[start:start + 32]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), -1)
        sums.append(-sum(logp[p - 1, w[p]].item() for p in range(1, 32)))
        counts.append(31)
    assert res.windows == len(sums) == 8 and res.window_tokens == counts
    assert res.window_nll == pytest.approx(sums, rel=1e-5)
    assert sum(res.window_nll) / sum(res.window_tokens) == pytest.approx(res.nll, rel=1e-12)
    assert math.exp(sum(sums) / sum(counts)) == pytest.approx(res.perplexity, rel=1e-5)
    lo, hi = res.perplexity_ci95
    # The whole text is scored: its windows are adjacent, so dependent (Ibragimov-Mueller groups).
    assert res.sampling["design"] == "all" and res.sampling["dependent"] is True
    assert (lo, hi) == S.perplexity_interval(res.window_nll, res.window_tokens, dependent=True)
    assert lo < res.perplexity < hi
    assert res.interval_method == ("Ibragimov-Mueller t over 2 groups of adjacent windows (8 windows, dependent: "
                                   "adjacent or overlapping), 1 df")


def test_sliding_windows_keep_their_unequal_counts(tiny_llama, tok, sample_text):
    ids = tokenize_corpus(tok, sample_text[:200])
    res = evaluate_model(tiny_llama(), tok, ids, EvalConfig(seq_len=32, stride=16, max_new_tokens=0,
                                                             progress=False))
    assert res.window_tokens[0] == 31 and set(res.window_tokens[1:]) == {16}
    assert sum(res.window_tokens) == res.tokens_scored
    assert sum(res.window_nll) / res.tokens_scored == pytest.approx(res.nll, rel=1e-12)


def test_one_window_has_no_interval(tiny_llama, tok, sample_text):
    ids = tokenize_corpus(tok, sample_text[:40])
    res = evaluate_model(tiny_llama(), tok, ids, EvalConfig(seq_len=32, max_new_tokens=0, progress=False))
    assert res.windows == 1 and all(math.isnan(x) for x in res.perplexity_ci95)
    assert res.interval_method == "1 window: no interval"


def test_every_variant_gets_its_paired_difference_from_its_parent(tiny_llama, tok, sample_text):
    """The eval step pairs each variant with its parent on the same windows: a copy of the parent
    is no difference; a variant with a zeroed layer is, and its numbers are paired_perplexity's
    on the two models' window sums."""
    model = tiny_llama(seed=6)
    ids = tokenize_corpus(tok, sample_text[:4000])
    w = model.model.layers[0].mlp.down_proj.weight
    broken = {"model.layers.0.mlp.down_proj.weight": torch.zeros_like(w),
              "lm_head.weight": model.lm_head.weight * 3}
    same = {"model.layers.0.mlp.down_proj.weight": w.detach().clone()}
    cfg = EvalConfig(seq_len=32, eval_tokens=12 * 32, max_new_tokens=0, progress=False)  # 12 spread windows
    res = evaluate_variants(model, tok, ids, {"base": None, "copy": same, "broken": broken}, cfg,
                            parents={"copy": "base", "broken": "base"})
    assert res.protocol["sampling"]["design"] == "spread" and not res.protocol["sampling"]["dependent"]
    base, copy, brk = (res.variants[n] for n in ("base", "copy", "broken"))
    assert base.vs_parent is None
    assert copy.vs_parent["parent"] == "base" and copy.vs_parent["delta_nll"] == 0.0
    assert copy.vs_parent["significant"] is False and copy.vs_parent["ppl_ratio_ci95"] == [1.0, 1.0]
    strata = res.protocol["sampling"]["strata"]  # the spread design's: 6 strata of 2 windows
    assert strata == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    want = S.paired_perplexity(base.window_nll, base.window_tokens, brk.window_nll, brk.window_tokens, strata=strata)
    assert brk.vs_parent == {"parent": "base", **want} and want["kind"] == "strata" and want["df"] == 6
    assert brk.vs_parent["ppl_ratio"] == pytest.approx(brk.perplexity / base.perplexity, rel=1e-9)
    assert brk.vs_parent["significant"] is True


def test_the_report_shows_each_interval_and_marks_only_the_paired_differences(tiny_llama, tok, sample_text):
    """From a results.json made by the eval step and planted zero-shot tests: each perplexity with
    its interval, each ratio to the parent with its paired interval, the mark on the variant that
    differs and not on the copy; the zero-shot marks follow McNemar; the end-of-run table keeps
    its columns; an older results.json without intervals still renders."""
    import dataclasses

    import llm_report
    import llm_report_stats as RS

    model = tiny_llama(seed=6)
    ids = tokenize_corpus(tok, sample_text[:4000])
    w = model.model.layers[0].mlp.down_proj.weight
    variants = {"base": None, "copy": {"model.layers.0.mlp.down_proj.weight": w.detach().clone()},
                "broken": {"lm_head.weight": model.lm_head.weight * 3}}
    res = evaluate_variants(model, tok, ids, variants, EvalConfig(seq_len=32, eval_tokens=12 * 32, max_new_tokens=0,
                                                                  progress=False),
                            parents={"copy": "base", "broken": "base"})
    ev = {n: dataclasses.asdict(r) for n, r in res.variants.items()}
    assert ev["broken"]["vs_parent"]["significant"] and not ev["copy"]["vs_parent"]["significant"]
    parent_q, same_q, better_q = [False] * 60 + [True] * 40, [False] * 60 + [True] * 40, [True] * 100
    zs_paired = {"copy": {"qa": S.mcnemar_exact(parent_q, same_q), "parent": "base"},
                 "broken": {"qa": S.mcnemar_exact(parent_q, better_q), "parent": "base"}}
    zs_paired["copy"]["mean"], zs_paired["broken"]["mean"] = zs_paired["copy"]["qa"], zs_paired["broken"]["qa"]
    acc = {"base": 0.4, "copy": 0.4, "broken": 1.0}
    results = {"perplexity": res.perplexity, "evaluation": ev, "variants": res.parents, "protocol": res.protocol,
               "zeroshot": {"status": "ran", "protocol": {"tasks": ["qa"], "num_fewshot": 0},
                            "parents": res.parents, "paired": zs_paired,
                            "tasks": {n: {"qa": {"acc": a, "acc_stderr": 0.05}} for n, a in acc.items()},
                            "mean": {n: {"acc": a, "acc_stderr": 0.05, "tasks": 1} for n, a in acc.items()}}}
    md = llm_report.report_markdown(results)
    rows = {ln.split(" | ")[0][2:]: ln for ln in md.split("## Zero-shot")[0].splitlines() if ln.startswith("| ")}
    lo, hi = ev["broken"]["vs_parent"]["ppl_ratio_ci95"]
    assert f"[{lo:.4g}, {hi:.4g}] {RS.MARK}" in md.split("## Zero-shot")[0]
    assert RS.MARK not in rows["copy"].split(" | ")[3] and RS.MARK in rows["broken"].split(" | ")[3]
    blo, bhi = ev["base"]["perplexity_ci95"]
    assert f"{ev['base']['perplexity']:.4g} [{blo:.4g}, {bhi:.4g}]" in md
    assert ev["base"]["interval_method"] in md and ev["broken"]["vs_parent"]["method"] in md
    zs_lines = md.split("## Zero-shot")[1].splitlines()
    zs_rows = [next(ln for ln in zs_lines if ln.startswith(f"| {n} |")) for n in ("broken", "copy")]
    assert f"100.0 ± 5.0 {RS.MARK}" in zs_rows[0] and "+60.0 [" in zs_rows[0]
    assert f"p {scipy.stats.binomtest(0, 60).pvalue:.2g} {RS.MARK}" in zs_rows[0]
    assert RS.MARK not in zs_rows[1] and "p 1" in zs_rows[1] and "McNemar's exact test" in md

    table = llm_report.summary_table(results).splitlines()
    assert table[0].split() == ["variant", "parent", "perplexity", "95%", "interval", "x", "parent", "zero-shot",
                                "mean"]
    broken = next(ln for ln in table if ln.startswith("broken "))
    assert f"{ev['broken']['vs_parent']['ppl_ratio']:.4g} {RS.MARK}" in broken
    assert f"[{blo:.4g}, {bhi:.4g}]" in next(ln for ln in table if ln.startswith("base "))
    assert "Student-t over 12 windows" in table[-1]

    old = {k: {n: {f: v for f, v in e.items() if f not in ("perplexity_ci95", "vs_parent", "interval_method")}
               for n, e in ev.items()} if k == "evaluation" else v for k, v in results.items()}
    old["zeroshot"] = {k: v for k, v in results["zeroshot"].items() if k != "paired"}
    md_old = llm_report.report_markdown(old)
    assert RS.MARK not in md_old and "| broken |" in md_old
    assert RS.MARK not in llm_report.summary_table(old)
