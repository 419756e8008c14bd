"""Issue 38: every † is true. The interval rule, the multiple-testing family, detectable effects, the
sampling design and the contrasts, against independent computations: statsmodels' multipletests,
scipy.stats' t-tests, a Holm loop transcribed, AR(1) series whose truth is known, a hand loop over
the recorded windows."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.signal
import scipy.stats
from statsmodels.stats.multitest import multipletests

import llm_matrix as MX
import llm_stats as S
from llm_data import tokenize_corpus
from llm_evaluate_models import EvalConfig, evaluate_model, evaluate_variants
from llm_perplexity import sampling_plan, spread_indices, spread_strata


def holm_by_hand(p, alpha=0.05):
    """Holm (1979) step-down, written out: sort, compare the k-th smallest with alpha / (m - k),
    stop at the first that fails; adjusted p = running max of (m - k) p_(k), capped at 1."""
    m, order = len(p), np.argsort(p)
    adj, run = np.empty(m), 0.0
    for k, i in enumerate(order):
        run = max(run, min(1.0, (m - k) * p[i]))
        adj[i] = run
    return adj


@pytest.mark.parametrize("method,sm", [("holm", "holm"), ("bh", "fdr_bh"), ("none", None)])
def test_adjustment_equals_statsmodels_multipletests(method, sm):
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(0, 1, 12), [1e-5, 3e-4, 0.004, 0.02]])
    tests = [{"p_value": float(x), "significant": x < 0.05, "kind": "t", "se": 0.1, "df": 9, "n": 10, "min_p": 0.0}
             for x in p] + [{"p_value": float("nan"), "significant": True, "n": 1}]
    out = S.adjust(tests, method)
    want = multipletests(p, alpha=0.05, method=sm)[1] if sm else p
    got = np.array([t["p_adjusted"] for t in tests[:-1]])
    assert got == pytest.approx(want, abs=1e-15)
    if method == "holm":
        assert got == pytest.approx(holm_by_hand(p), abs=1e-15)
    assert [t["significant"] for t in tests[:-1]] == list(want < 0.05)
    assert [t["significant_unadjusted"] for t in tests[:-1]] == list(p < 0.05)
    assert tests[-1]["significant"] is False and "p_adjusted" not in tests[-1]  # no p: outside the family
    assert out["n_tests"] == 16 and out["method"] == method
    assert out["mde_level"] == (0.05 / 16 if method != "none" else 0.05)
    with pytest.raises(ValueError):
        S.adjust([], "bonferoni")


def test_small_samples_use_students_t_as_scipy_does():
    rng = np.random.default_rng(1)
    a = rng.normal(size=9)
    b = a + 0.4 + rng.normal(scale=0.6, size=9)
    d = S.paired_difference(a, b)
    ref = scipy.stats.ttest_rel(b, a)
    ci = ref.confidence_interval(0.95)
    assert d["p_value"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert d["ci95"] == [pytest.approx(ci.low, rel=1e-10), pytest.approx(ci.high, rel=1e-10)]
    assert d["kind"] == "t" and d["df"] == 8 and "Student-t over 9 samples" in d["method"]
    # Two units: Student-t with 1 df, never the percentile bootstrap that calls any two same-sign
    # differences "different". A ratio of 1.0011 over 2 windows is not a difference.
    two = S.paired_perplexity([300.0, 310.0], [100, 100], [300.2, 310.02], [100, 100])
    assert two["kind"] == "t" and two["significant"] is False and two["ppl_ratio"] == pytest.approx(1.0011, abs=1e-3)


def test_dependent_windows_use_a_t_test_on_groups_of_adjacent_ones():
    """Ibragimov & Mueller (2010): 32 dependent units make 4 groups of 8; the interval and p are
    scipy's one-sample t-test on the 4 group means."""
    x = np.random.default_rng(2).normal(0.3, 1.0, size=32)
    e = S.estimate(x, dependent=True, units="windows")
    g = x.reshape(4, 8).mean(axis=1)
    ref = scipy.stats.ttest_1samp(g, 0.0)
    ci = ref.confidence_interval(0.95)
    assert S.n_groups(32) == 4 and e["kind"] == "groups" and e["df"] == 3
    assert e["p_value"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert e["ci95"] == [pytest.approx(ci.low, rel=1e-10), pytest.approx(ci.high, rel=1e-10)]
    assert [S.n_groups(n) for n in (2, 8, 16, 64, 1000)] == [2, 2, 2, 8, 8]


def _ar1(draws: int, n: int, phi: float, seed: int) -> np.ndarray:
    e = np.random.default_rng(seed).normal(size=(draws, n + 200))
    return scipy.signal.lfilter([1.0], [1.0, -phi], e, axis=1)[:, 200:]


def test_false_positive_rate_on_ar1_windows_is_nominal_for_spread_and_for_the_dependent_path():
    """Per-window differences as AR(1) with WikiText-2's lag-1 correlation (0.47) and mean 0, so
    every rejection is a false positive, over 2,000 draws. Spread sampling (every 100th of 3,200
    windows, two drawn in each of 16 stretches, the stratified interval) and 32 adjacent windows
    through the dependence-robust path
    both stay at most 0.07; the same adjacent windows treated as independent reject far more
    often (the failure issue 38 measured), so the test can tell."""
    draws = 2000
    series = _ar1(draws, 3200, 0.47, seed=3)
    spread = np.stack([row[spread_indices(3200, 32, i)] for i, row in enumerate(series)])
    adjacent = _ar1(draws, 32, 0.47, seed=4)
    fp_spread = np.mean([S.estimate(x, strata=spread_strata(32))["p_value"] < 0.05 for x in spread])
    fp_groups = np.mean([S.estimate(x, dependent=True)["p_value"] < 0.05 for x in adjacent])
    fp_naive = np.mean([S.estimate(x)["p_value"] < 0.05 for x in adjacent])
    assert spread.shape[1] == 32
    assert 0.03 <= fp_spread <= 0.07 and fp_groups <= 0.07
    assert fp_naive > 0.10


def test_detectable_effect_and_tests_that_can_never_be_significant():
    """The MDE of a t-test is (t_{1-a/2} + t_{0.8}) x se on its df; McNemar over 4 samples has a
    smallest p of 2 / 2^4 = 0.125: it is marked unreachable, never significant, MDE infinite."""
    t = S.paired_difference([0.0, 1.0, 2.0, 3.0, 4.0], [0.5, 1.7, 2.4, 3.9, 4.6])
    mc = S.mcnemar_exact([0, 0, 0, 0], [1, 1, 1, 1])
    assert mc["min_p"] == 0.125 and mc["p_value"] == 0.125
    S.adjust([t, mc], "holm")
    d = scipy.stats.t(4)
    assert t["mde"] == pytest.approx((d.ppf(1 - 0.025 / 2) + d.ppf(0.8)) * t["se"], rel=1e-12)
    assert mc["reachable"] is False and mc["significant"] is False and mc["mde"] == math.inf
    big = S.mcnemar_exact([0] * 40 + [1] * 60, [1] * 40 + [1] * 60)
    S.adjust([big], "holm")
    assert big["reachable"] is True and big["significant"] is True and 0 < big["mde"] < 0.4


def test_spread_plan_covers_the_text_and_first_is_the_old_protocol():
    """Spread: 8 of 100 windows, two drawn in each quarter of the text (stratified, seeded);
    first: the first 8 windows, adjacent, hence dependent."""
    cfg = EvalConfig(seq_len=32, eval_tokens=8 * 32, seed=5).resolved(False)
    plan, design = sampling_plan(32 * 100 + 7, cfg)
    idx = spread_indices(100, 8, 5)
    assert [s for s, _ in plan] == [32 * i for i in idx] == design["window_starts"]
    assert design["strata"] == spread_strata(8) == [0, 0, 1, 1, 2, 2, 3, 3] and design["dependent"] is False
    for h in range(4):  # each stratum's two windows lie in its quarter, distinct
        a, b = idx[2 * h:2 * h + 2]
        assert 25 * h <= a < b < 25 * (h + 1)
    assert design["design"] == "spread" and design["spacing"] == 12
    first, fd = sampling_plan(32 * 100 + 7, EvalConfig(seq_len=32, eval_tokens=8 * 32, sampling="first").resolved(False))
    assert [s for s, _ in first] == [32 * i for i in range(8)] and fd["dependent"] is True and fd["strata"] is None
    assert spread_indices(100, 8, 5) == idx and spread_indices(100, 8, 6) != idx  # seeded
    assert spread_indices(5, 8, 0) == [0, 1, 2, 3, 4]
    odd = spread_indices(100, 7, 1)  # an odd count: the last of 3 strata holds three
    assert spread_strata(7) == [0, 0, 1, 1, 2, 2, 2] and len(set(odd)) == 7 and odd == sorted(odd)
    assert all(round(100 * 4 / 7) <= i for i in odd[4:]) and all(i < round(100 * 4 / 7) for i in odd[:4])


def test_stratified_interval_is_cochrans_and_covers_where_the_iid_one_over_covers():
    """The spread design's interval: Student-t with n - H df on sum_h W_h^2 s_h^2 / n_h (Cochran
    1977, eq. 5.6, W_h = n_h / n for proportional allocation), transcribed here. On a finite
    population with a strong trend, its coverage of the population mean over 4,000 stratified
    draws is nominal (in [0.93, 0.97]); the iid interval of the same draws over-covers (> 0.99),
    which is why the design has its own variance."""
    rng = np.random.default_rng(0)
    y = rng.normal(size=16)
    lab = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 6, 6]
    e = S.estimate(y, strata=lab, units="windows")
    var = sum((np.sum(np.equal(lab, h)) / 16) ** 2 * np.var(y[np.equal(lab, h)], ddof=1) / np.sum(np.equal(lab, h))
              for h in range(7))
    half = scipy.stats.t.ppf(0.975, 16 - 7) * math.sqrt(var)
    assert e["kind"] == "strata" and e["df"] == 9 and e["se"] == pytest.approx(math.sqrt(var), rel=1e-12)
    assert e["ci95"] == [pytest.approx(y.mean() - half, rel=1e-12), pytest.approx(y.mean() + half, rel=1e-12)]
    with pytest.raises(ValueError):
        S.estimate(y, strata=[0] * 15 + [1])  # a stratum of one unit has no variance
    N, n = 2000, 32
    pop = 3 * np.sin(np.linspace(0, 6 * np.pi, N)) + rng.normal(size=N)  # heterogeneous across the text
    truth = pop.mean()
    cov_strat = cov_iid = 0
    for seed in range(4000):
        idx = spread_indices(N, n, seed)
        x = pop[idx]
        lo, hi = S.estimate(x, strata=spread_strata(n))["ci95"]
        cov_strat += lo <= truth <= hi
        lo, hi = S.mean_interval(x)  # Student-t on the same draws, as if independent
        cov_iid += lo <= truth <= hi
    assert 0.93 <= cov_strat / 4000 <= 0.97 and cov_iid / 4000 > 0.99


def test_recorded_windows_are_the_plan_and_their_perplexity_is_a_hand_loop(tiny_llama, tok, sample_text):
    import torch

    model = tiny_llama(seed=4)
    ids = tokenize_corpus(tok, sample_text[:3000])
    cfg = EvalConfig(seq_len=32, eval_tokens=6 * 32, max_new_tokens=0, progress=False, seed=2)
    res = evaluate_model(model, tok, ids, cfg)
    plan, design = sampling_plan(ids.numel(), cfg.for_model(model))
    assert res.window_starts == [s for s, _ in plan] == design["window_starts"] and res.windows == 6
    assert res.window_starts != [32 * i for i in range(6)]  # spread, not the first windows
    total, count = 0.0, 0
    for s in res.window_starts:
        w = ids[s:s + 32]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), -1)
        total -= sum(logp[p - 1, w[p]].item() for p in range(1, 32))
        count += 31
    assert res.tokens_scored == count and res.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def test_contrasts_pair_two_variants_and_a_variant_is_never_different_from_itself(tiny_llama, tok, sample_text):
    import torch

    model = tiny_llama(seed=6)
    ids = tokenize_corpus(tok, sample_text[:4000])
    w = model.model.layers[0].mlp.down_proj.weight
    variants = {"base": None, "pruned[a]": {"model.layers.0.mlp.down_proj.weight": w * 0.5},
                "pruned[b]": {"model.layers.0.mlp.down_proj.weight": torch.zeros_like(w),
                              "lm_head.weight": model.lm_head.weight * 3}}
    res = evaluate_variants(model, tok, ids, variants, EvalConfig(seq_len=32, eval_tokens=12 * 32, max_new_tokens=0,
                                                                  progress=False),
                            parents={"pruned[a]": "base", "pruned[b]": "base"})
    from dataclasses import asdict
    results = {"evaluation": {n: asdict(r) for n, r in res.variants.items()}, "perplexity": res.perplexity,
               "variants": res.parents, "protocol": res.protocol}
    assert MX.grid_siblings(results) == [("pruned[a]", "pruned[b]")]
    self_c = MX.contrast(results, "pruned[a]", "pruned[a]")["tests"]["perplexity"]
    assert self_c["delta_nll"] == 0.0 and self_c["p_value"] == 1.0 and self_c["significant"] is False
    c = MX.contrast(results, "pruned[a]", "pruned[b]")["tests"]["perplexity"]
    ea, eb = results["evaluation"]["pruned[a]"], results["evaluation"]["pruned[b]"]
    want = S.paired_perplexity(ea["window_nll"], ea["window_tokens"], eb["window_nll"], eb["window_tokens"],
                               strata=spread_strata(12))  # the spread design's strata, as recorded
    assert eb["sampling"]["strata"] == spread_strata(12) and want["kind"] == "strata"
    assert {k: c[k] for k in want} == want and c["difference"] == want["ppl_ratio"]
    fam = MX.finalize(results, "holm", ["base,pruned[b]"])
    assert [(x["a"], x["b"], x["why"]) for x in fam["contrasts"]] == [("base", "pruned[b]", "--contrast"),
                                                                      ("pruned[a]", "pruned[b]", "grid siblings")]
    # 2 tests against the parent + 2 contrasts, adjusted together (Holm), in place.
    assert fam["multiple_testing"]["n_tests"] == 4
    vs = results["evaluation"]["pruned[b]"]["vs_parent"]
    ps = sorted([vs["p_value"], results["evaluation"]["pruned[a]"]["vs_parent"]["p_value"]]
                + [x["tests"]["perplexity"]["p_value"] for x in fam["contrasts"]])
    assert vs["p_adjusted"] == pytest.approx(holm_by_hand(np.array(ps))[ps.index(vs["p_value"])], abs=1e-12)
    assert MX.finalize(results, "holm", ["nosuch,pruned[*]"])["warnings"]


@pytest.mark.parametrize("flags,words", [
    (["--multiple-testing", "bonferoni"], "--multiple-testing"),
    (["--eval-sampling", "random"], "--eval-sampling"),
    (["--contrast", "pruned"], "--contrast"),
    (["--contrast", "a,b,c"], "--contrast"),
    (["--contrast", "all,pruned"], "--contrast"),
])
def test_bad_test_flags_give_one_error_line_before_loading(flags, words, tiny_run_dir, tmp_path, capsys, monkeypatch):
    import llm_main_v4
    import llm_model as LM
    from conftest import one_error, tiny_argv

    monkeypatch.setattr(LM, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    rc = llm_main_v4.main(tiny_argv(tiny_run_dir, tmp_path / "o", "--steps", "eval", *flags))
    assert rc == 2 and words in one_error(capsys)


def test_a_run_adjusts_its_marks_contrasts_its_grid_and_says_what_it_can_detect(tiny_run_dir, tmp_path):
    """A prune grid (wanda, sparsegpt) and its evaluation: every paired test is in one Holm family,
    † follows the adjusted p, the two grid points are contrasted, and the report states the design,
    the family and the detectable change; --multiple-testing none leaves p_adjusted = p."""
    import json

    import llm_main_v4
    from conftest import tiny_argv

    out = tmp_path / "o"
    assert llm_main_v4.main(tiny_argv(tiny_run_dir, out, "--steps", "prune,eval", "--prune-method",
                                      "wanda,sparsegpt", "--contrast", "base,pruned[sparsegpt*]")) == 0
    r = json.loads((out / "results.json").read_text())
    rb, ev = r["robustness"], r["evaluation"]
    tests = [ev[n]["vs_parent"] for n in ev if ev[n].get("vs_parent")]
    tests += [t for c in rb["contrasts"] for t in c["tests"].values()]
    assert rb["multiple_testing"]["method"] == "holm" and rb["multiple_testing"]["n_tests"] == len(tests) == 4
    ps = np.array([t["p_value"] for t in tests])
    assert [t["p_adjusted"] for t in tests] == pytest.approx(list(holm_by_hand(ps)), abs=1e-12)
    assert all(t["significant"] == (t["p_adjusted"] < 0.05) for t in tests)
    assert {(c["a"], c["b"]) for c in rb["contrasts"]} == {
        ("base", "pruned[sparsegpt,0.5,unstructured]"),
        ("pruned[wanda,0.5,unstructured]", "pruned[sparsegpt,0.5,unstructured]")}
    assert r["protocol"]["sampling"]["design"] == "spread" and r["protocol"]["sampling"]["window_starts"]
    md = (out / "report.md").read_text()
    assert "(--eval-sampling spread)" in md and "### Contrasts between variants" in md
    assert "after Holm's adjustment over all 4 paired tests" in md and "### What this budget can detect" in md
    # The same run again with --multiple-testing none: the steps are skipped (the method is no part of
    # their fingerprint) and the family is redone: p_adjusted = p, † = p < 0.05.
    assert llm_main_v4.main(tiny_argv(tiny_run_dir, out, "--steps", "prune,eval", "--prune-method",
                                      "wanda,sparsegpt", "--multiple-testing", "none")) == 0
    r2 = json.loads((out / "results.json").read_text())
    assert [r2["manifest"]["steps"][s]["skipped"] for s in ("prune", "eval")] == [True, True]
    again = [r2["evaluation"][n]["vs_parent"] for n in ev if ev[n].get("vs_parent")]
    assert [t["p_adjusted"] for t in again] == [t["p_value"] for t in again]
    assert r2["robustness"]["multiple_testing"]["method"] == "none" and len(r2["robustness"]["contrasts"]) == 1
