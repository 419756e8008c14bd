"""Every robustness measure on every variant (issue 31): the noise sweep, the attacks, the curvature
and the super weights of each pruned, quantized and noisy variant, and the matrix they make.

One pipeline run on a tiny planted model (shared by the tests below) measures every variant in
place; the tests check those numbers against the same measures taken on each variant's export
loaded as a model of its own, the live model's bits, the super-weight status by hand, and the
variant selection and the matrix against their definitions."""
from __future__ import annotations

import json

import pytest
import torch

import llm_adversarial_test as ADV
import llm_data as D
import llm_integrated_analysis as AN
import llm_matrix as MX
import llm_robustness_test as NZ
import llm_variants as V
from conftest import make_pipeline_config, make_tokenizer, planted_model_dir
from llm_common import UserError
from llm_knobs import parse_variant_patterns


@pytest.fixture(scope="module")
def measured(tmp_path_factory, sample_text):
    """A 3-block Llama with a planted super weight, pruned (wanda) and made noisy, every variant
    exported, attacked and analysed. No fine-tune, and no sample prompts: the attack samples
    are windows of the text alone, so a model loaded from an export builds the very same ones."""
    from llm_main_v4 import run_pipeline

    d = planted_model_dir(tmp_path_factory.mktemp("measured"), sample_text)
    cfg = make_pipeline_config(d / "model", d / "text.txt", d / "out",
                               steps=["prune", "noise", "eval", "safety", "export", "adversarial", "analysis"],
                               export={"enabled": True}, adversarial={"prompts": ()},
                               noise={"map": False, "epsilon": 0.02, "mode": "relative"})
    results = run_pipeline(cfg)
    return d, cfg, results


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _texts(d):
    texts, _ = D.load_texts(str(d / "text.txt"), str(d / "text.txt"), {"train", "eval"}, False, True)
    return texts, D.tokenize_corpus(make_tokenizer(), texts["eval"])


def test_every_step_measures_every_variant_and_the_matrix_holds_them(measured):
    d, _, r = measured
    names = ["base", "pruned", "noisy"]
    for step in ("noise", "safety", "adversarial", "analysis"):
        assert list(r[step]["variants"]) == names, step
    assert r["adversarial"]["variants"]["pruned"]["parent"] == "base"
    rows = r["robustness"]["rows"]
    assert list(rows) == names and rows["pruned"]["parent"] == "base"
    cells = rows["pruned"]["cells"]
    for key in ("perplexity", "pgd_delta_nll", "fgsm_delta_nll", "targeted_success", "gcg_transfer_nll",
                "noise_doubling_eps", "hessian_trace", "top_eigenvalue", "super_weights_kept", "refusal_rate",
                "jailbreak_asr", "safety_flips", "kl_parent"):
        assert key in cells, key
    # the safety step's McNemar tests are in the run's family: adjusted like every other test
    assert "p_adjusted" in r["safety"]["variants"]["pruned"]["vs_parent"]["refusal"]
    # The relative cell is the variant's value against the parent's, as MEASURES says.
    assert cells["perplexity"]["relative"] == pytest.approx(r["perplexity"]["pruned"] / r["perplexity"]["base"])
    pgd = [row for row in r["adversarial"]["variants"]["pruned"]["table"] if row["method"] == "pgd"][-1]
    base_pgd = [row for row in r["adversarial"]["variants"]["base"]["table"] if row["method"] == "pgd"][-1]
    assert cells["pgd_delta_nll"]["relative"] == pytest.approx(pgd["delta_nll"] - base_pgd["delta_nll"])
    # Targeted success is 0/1 per sample: compared with the parent by McNemar's exact test.
    from scipy.stats import binomtest

    hits = [r["adversarial"]["variants"][n]["targeted"]["hits"] for n in ("base", "pruned")]
    b = sum(x and not y for x, y in zip(*hits))
    c = sum(y and not x for x, y in zip(*hits))
    mc = r["adversarial"]["variants"]["pruned"]["vs_parent"]["targeted_success"]
    assert mc["p_value"] == (binomtest(b, b + c, 0.5).pvalue if b + c else 1.0)
    report = (d / "out" / "report.md").read_text()
    assert "## Robustness matrix" in report and "plots/robustness_heatmap.png" in report
    assert "## Trust panel" in report and "GCG refusal substrings" in report
    assert (d / "out" / "plots" / "robustness_heatmap.png").stat().st_size > 0


def test_in_place_measures_equal_those_on_the_exported_variant(measured):
    """Attacks, the noise sweep, the Hessian trace and the super weights of the pruned and the noisy
    variant, measured in place during the run, equal the same measures on each variant's export
    loaded as a model of its own."""
    d, cfg, r = measured
    texts, ids = _texts(d)
    tok = make_tokenizer()
    for name in ("pruned", "noisy"):
        m = _model(d / "out" / "export" / name)
        adv = ADV.attack_variants(m, tok, ids, {name: None}, {}, cfg.adversarial.resolved(False),
                                  r["adversarial"]["gcg"])[name]
        got = r["adversarial"]["variants"][name]
        assert len(got["table"]) == 2 * len(cfg.adversarial.epsilons) and len(got["table"][0]["delta_nll_samples"]) == 2
        for a, b in zip(adv["table"], got["table"]):
            assert a["delta_nll_samples"] == pytest.approx(b["delta_nll_samples"], rel=1e-4, abs=1e-5)
        assert adv["targeted"]["hits"] == got["targeted"]["hits"]
        assert adv["gcg_transfer"]["target_nll"] == pytest.approx(got["gcg_transfer"]["target_nll"], rel=1e-5)
        nz = NZ.sweep_variants(m, tok, ids, {name: None}, {}, cfg.noise.resolved(False))[name]
        want = r["noise"]["variants"][name]["tolerance"]["per_seed"]  # None: that seed never doubled
        assert [x is None for x in nz["tolerance"]["per_seed"]] == [x is None for x in want]
        assert [x for x in nz["tolerance"]["per_seed"] if x is not None] == pytest.approx(
            [x for x in want if x is not None], rel=1e-5)
        an = AN.analyse_variants(m, tok, texts["train"], ids, {name: None}, {}, {name: None},
                                 cfg.analysis.resolved(False), r["analysis"]["super_weights"])[name]
        mine = r["analysis"]["variants"][name]
        assert an["curvature"]["trace_total_samples"] == pytest.approx(mine["curvature"]["trace_total_samples"],
                                                                       rel=1e-4)
        assert an["curvature"]["top_eigenvalue"] == pytest.approx(mine["curvature"]["top_eigenvalue"], rel=1e-4)
        assert [s["value"] for s in an["super_weights"]] == [s["value"] for s in mine["super_weights"]]
        assert [s["ablation_ppl_ratio"] for s in an["super_weights"]] == pytest.approx(
            [s["ablation_ppl_ratio"] for s in mine["super_weights"]], rel=1e-5)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_measuring_every_variant_leaves_the_live_model_bit_identical(measured):
    d, cfg, r = measured
    texts, ids = _texts(d)
    tok, m = make_tokenizer(), _model(d / "model")
    before = _state(m)
    noisy = NZ.variants_of(type("R", (), {"out": d / "out"})(), r["noise"])["noisy"]
    mask = {n + ".weight": torch.rand(mod.weight.shape, generator=torch.Generator().manual_seed(1)) < 0.5
            for n, mod in m.named_modules() if n.endswith("down_proj")}
    variants = {"base": None, "masked": lambda model: V.masked_weights(model, mask), "noisy": noisy}
    parents = {"masked": "base", "noisy": "base"}
    ADV.attack_variants(m, tok, ids, variants, parents, cfg.adversarial.resolved(False), r["adversarial"]["gcg"])
    NZ.sweep_variants(m, tok, ids, variants, parents, cfg.noise.resolved(False))
    AN.analyse_variants(m, tok, texts["train"], ids, variants, parents, variants, cfg.analysis.resolved(False),
                        r["analysis"]["super_weights"])
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_super_weight_status_pruned_kept_and_quantized(measured):
    """The planted super weight, zeroed by a mask (pruned), left alone by one (kept), and moved by
    4-bit RTN (quantized): each status, relative change and ablation as computed by hand."""
    from llm_compress import rtn_quantize

    d, cfg, r = measured
    texts, ids = _texts(d)
    tok, m = make_tokenizer(), _model(d / "model")
    sws = r["analysis"]["super_weights"]
    assert [(s["layer"], s["row"], s["col"]) for s in sws] == [(1, 7, 5)]  # the planted one
    name = "model.layers.1.mlp.down_proj.weight"
    W = m.get_parameter(name).detach()
    away, keep = torch.zeros_like(W, dtype=torch.bool), torch.zeros_like(W, dtype=torch.bool)
    away[7, 5] = True
    keep[0, 0] = True
    q = rtn_quantize(W.clone(), 4, cfg.analysis.quant_group).dequantize(W.dtype)
    variants = {"base": None, "pruned_away": lambda mod: V.masked_weights(mod, {name: away}),
                "kept": lambda mod: V.masked_weights(mod, {name: keep}), "quantized": {name: q}}
    parents = {n: "base" for n in variants if n != "base"}
    got = AN.analyse_variants(m, tok, texts["train"], ids, variants, parents, variants,
                              cfg.analysis.resolved(False), sws)
    st = {n: got[n]["super_weights"][0] for n in variants}
    assert st["base"]["status"] == "reference"
    assert st["pruned_away"]["status"] == "pruned" and st["pruned_away"]["value"] == 0.0
    assert st["pruned_away"]["ablation_ppl_ratio"] is None and got["pruned_away"]["super_weights_kept"] == 0
    assert st["kept"]["status"] == "intact" and st["kept"]["relative_change"] == 0.0
    assert st["quantized"]["status"] == "moved"
    assert st["quantized"]["relative_change"] == pytest.approx((float(q[7, 5]) - 40.0) / 40.0)
    # The ablation of the kept super weight on its variant: perplexity with it zeroed / without, by hand.
    from llm_perplexity import evaluate_model

    ecfg = AN.EvalConfig(seq_len=min(cfg.analysis.eval_seq_len, cfg.analysis.eval_tokens),
                         eval_tokens=cfg.analysis.eval_tokens)
    with V.masked_weights(m, {name: keep}):
        clean = evaluate_model(m, tok, ids, ecfg.scoring_only()).perplexity
        with V.masked_weights(m, {name: away}):
            zeroed = evaluate_model(m, tok, ids, ecfg.scoring_only()).perplexity
    assert st["kept"]["ablation_ppl_ratio"] == pytest.approx(zeroed / clean, rel=1e-6)
    assert zeroed / clean > 1.5  # the planted weight matters


def test_variant_patterns_choose_by_name_with_literal_brackets():
    names = ["base", "fine-tuned", "pruned[wanda,0.5,unstructured]", "pruned[sparsegpt,2:4]", "quantized", "noisy"]
    assert V.select_variants(names, ("all",), "fine-tuned") == names
    assert V.select_variants(names, ("live",), "fine-tuned") == ["fine-tuned"]
    assert V.select_variants(names, ("pruned[*]",), "base") == names[2:4]
    assert V.select_variants(names, ("noisy", "base"), "base") == ["base", "noisy"]  # the run's order
    assert V.select_variants(names, ("pruned[wanda,0.5,unstructured]",), "base") == [names[2]]
    assert V.select_variants(names, ("quanti?ed", "pruned[s*"), "base") == [names[3], "quantized"]
    with pytest.raises(UserError, match="names no variant"):
        V.select_variants(names, ("pruned[w]",), "base")  # brackets are literal: not a character class
    assert parse_variant_patterns("pruned[wanda,0.5,unstructured],quantized") == (
        "pruned[wanda,0.5,unstructured]", "quantized")
    for bad in ("pruned[wanda", "a,,b", ""):
        with pytest.raises(ValueError):
            parse_variant_patterns(bad)


def test_robustness_variants_flag_limits_what_is_measured(tiny_run_dir, tmp_path):
    import llm_main_v4 as M
    from conftest import tiny_argv

    out = tmp_path / "o"
    argv = tiny_argv(tiny_run_dir, out, "--steps", "prune,noise,analysis", "--robustness-variants", "pruned",
                     "--sweep-eps", "0.1,1", "--sweep-seeds", "2", "--sweep-tokens", "64", "--sweep-seq-len", "32",
                     "--protect-fraction", "0", "--hessian-probes", "2", "--power-iters", "2",
                     "--analysis-windows", "1", "--analysis-seq-len", "16")
    assert M.main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    assert list(r["noise"]["variants"]) == ["pruned"] and list(r["analysis"]["variants"]) == ["pruned"]
    assert "vs_parent" not in r["analysis"]["variants"]["pruned"]  # its parent was not measured


def test_matrix_marks_only_paired_differences_that_exclude_zero():
    res = {"variants": {"base": None, "a": "base"}, "perplexity": {"base": 10.0, "a": 12.0},
           "evaluation": {"a": {"perplexity_ci95": [11.0, 13.0], "vs_parent": {
               "ppl_ratio": 1.2, "ppl_ratio_ci95": [1.1, 1.3], "significant": True, "method": "m"}}},
           "noise": {"variants": {
               "base": {"parent": None, "tolerance": {"doubling_eps": 0.2, "ci95": [0.1, 0.3]}},
               "a": {"parent": "base", "tolerance": {"doubling_eps": 0.1, "ci95": [0.0, 0.2]},
                     "vs_parent": {"mean": -0.1, "ci95": [-0.3, 0.1], "significant": False, "method": "m"}}}}}
    mx = MX.robustness_matrix(res)
    cells = mx["rows"]["a"]["cells"]
    assert cells["perplexity"]["vs_parent"]["significant"] and cells["perplexity"]["relative"] == pytest.approx(1.2)
    assert not cells["noise_doubling_eps"]["vs_parent"]["significant"]
    assert cells["noise_doubling_eps"]["relative"] == pytest.approx(0.5)
    table = "\n".join(MX.matrix_markdown(mx))
    assert "12 [11, 13] †" in table and "0.1 [0, 0.2] |" in table and "0.1 [0, 0.2] †" not in table


def test_measures_over_calibration_draws_are_mean_and_std_by_the_name_without_its_seed():
    """--calib-seeds: every measure of the per-draw variants as mean ± sample std (statistics module
    by hand), grouped by the name without ',seed=K'; a single draw makes no group."""
    import statistics

    names = [f"pruned[wanda,0.5,unstructured,seed={s}]" for s in (0, 1, 2)]
    ppl = [20.0, 22.0, 27.0]
    tol = [0.1, 0.12, 0.11]
    res = {"variants": {"base": None, **{n: "base" for n in names}, "pruned[wanda,2:4,seed=0]": "base"},
           "perplexity": {"base": 10.0, **dict(zip(names, ppl)), "pruned[wanda,2:4,seed=0]": 30.0},
           "noise": {"variants": {n: {"parent": "base", "tolerance": {"doubling_eps": t}} for n, t in zip(names, tol)}}}
    mx = MX.robustness_matrix(res)
    assert list(mx["draws"]) == ["pruned[wanda,0.5,unstructured]"]
    d = mx["draws"]["pruned[wanda,0.5,unstructured]"]
    assert d["seeds"] == [0, 1, 2]
    assert d["cells"]["perplexity"] == {"mean": statistics.fmean(ppl), "std": statistics.stdev(ppl), "n": 3}
    assert d["cells"]["noise_doubling_eps"]["std"] == pytest.approx(statistics.stdev(tol))
    res["adversarial"] = {"variants": {names[0]: {"parent": "base", "table": []}}}  # a robustness step ran
    md = "\n".join(MX.report_section(res))
    assert f"| pruned\\[wanda,0.5,unstructured\\] | 0,1,2 | {statistics.fmean(ppl):.4g} ± {statistics.stdev(ppl):.4g} |" in md


def test_zero_shot_accuracy_and_flips_are_matrix_cells():
    """The zero-shot step's mean accuracy (with its McNemar test against the parent) and its flip rate
    are cells of the matrix, beside the eval step's and the safety step's; the contrast of two variants
    on the pooled questions is scipy's exact binomial test of the discordant ones."""
    from scipy.stats import binomtest

    import llm_stats as ST

    a, b = "1101100111010110", "1001101110010010"
    paired = ST.mcnemar_exact([c == "1" for c in a], [c == "1" for c in b])
    res = {"variants": {"base": None, "q": "base"}, "perplexity": {"base": 10.0, "q": 11.0},
           "zeroshot": {"mean": {"base": {"acc": a.count("1") / 16}, "q": {"acc": b.count("1") / 16}},
                        "paired": {"q": {"mean": paired}},
                        "questions": {n: {"t": {"metric": "acc", "correct": s}} for n, s in (("base", a), ("q", b))}}}
    cells = MX.robustness_matrix(res)["rows"]["q"]["cells"]
    lost = sum(x == "1" and y == "0" for x, y in zip(a, b))
    gained = sum(x == "0" and y == "1" for x, y in zip(a, b))
    assert cells["zeroshot_mean"]["value"] == b.count("1") / 16
    assert cells["zeroshot_mean"]["vs_parent"]["p_value"] == pytest.approx(binomtest(lost, lost + gained).pvalue)
    assert cells["zeroshot_flips"]["value"] == (lost + gained) / 16 and cells["zeroshot_flips"]["lost"] == lost
    t = MX.contrast(res, "base", "q")["tests"]["zeroshot_mean"]
    assert t["p_value"] == pytest.approx(binomtest(lost, lost + gained).pvalue)
