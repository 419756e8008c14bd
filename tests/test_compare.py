"""--compare is honest (issue 24 item 6): how each run was measured is a column group, runs
measured differently are warned about above the table and on stdout, the table is printed, and
a compared run's folder is never written into by default."""
import json

import llm_main_v4 as M
import llm_tables as T
from conftest import one_error


def _run(d, seq_len, tokens, calib, ppl, chat=None):
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({
        "model": "m", "dtype": "torch.float32", "model_identity": {"label": "m"},
        "dataset": {"eval": {"source": "wiki.test.raw"}}, "protocol": {"seq_len": seq_len},
        "evaluation": {"base": {"tokens_scored": tokens}}, "perplexity": {"base": ppl, "pruned": 2 * ppl},
        "variants": {"base": None, "pruned": "base"},
        "prune": {"method": "wanda", "pattern": "unstructured", "overall_sparsity": 0.5,
                  "calibration": {"windows": calib, "seq_len": 512, "source": "c4"}},
        **({"zeroshot": {"protocol": {"apply_chat_template": chat, "fewshot_as_multiturn": chat}}}
           if chat is not None else {})}))
    return d


def test_compare_warns_where_protocols_differ_and_prints_the_table(tmp_path, capsys):
    a = _run(tmp_path / "a" / "data", 512, 8176, 8, 20.0)
    b = _run(tmp_path / "b" / "data", 128, 1016, 128, 30.0)
    out = tmp_path / "cmp"
    assert M.main(["--compare", str(a), str(b), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    for col, values in (("window", "128, 512"), ("tokens scored", "1016, 8176"),
                        ("calibration", "prune: 128 x 512 of c4, prune: 8 x 512 of c4")):
        line = f"warning: the runs differ in {col} ({values})"
        assert line in printed and line in (out / "compare.md").read_text(), line
    assert "| a/data | wanda unstructured 0.5 | - | - | 20 | 40 (x2) |" in printed
    assert "model" not in "".join(ln for ln in printed.splitlines() if ln.startswith("warning"))  # same model


def test_identical_protocols_give_no_warning(tmp_path, capsys):
    a = _run(tmp_path / "a", 512, 8176, 8, 20.0)
    b = _run(tmp_path / "b", 512, 8176, 8, 25.0)
    assert M.main(["--compare", str(a), str(b), "--output-dir", str(tmp_path / "cmp")]) == 0
    assert "warning" not in capsys.readouterr().out


def test_compare_names_the_zero_shot_chat_template_choice(tmp_path, capsys):
    a = _run(tmp_path / "a", 512, 8176, 8, 20.0, chat=True)
    b = _run(tmp_path / "b", 512, 8176, 8, 25.0, chat=False)
    assert M.main(["--compare", str(a), str(b), "--output-dir", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    for col in ("chat template", "few-shot as turns"):
        assert f"warning: the runs differ in {col} (" in printed, col


def test_compare_refuses_to_write_into_a_compared_run_unless_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = _run(tmp_path / "data", 512, 8176, 8, 20.0)  # the default --output-dir is ./data
    b = _run(tmp_path / "other", 512, 8176, 8, 25.0)
    assert M.main(["--compare", "data", str(b)]) == 2
    assert "would write into the compared run data" in one_error(capsys)
    assert not (a / "compare.md").exists()
    assert M.main(["--compare", "data", str(b), "--output-dir", "data"]) == 0  # named on purpose
    assert (a / "compare.md").is_file()


def _windows_run(d, sha, sums, tokens, matrix=None):
    d.mkdir(parents=True)
    ppl = sum(sums) / sum(tokens)
    res = {"model": "m", "dtype": "torch.float32", "model_identity": {"label": "m"},
           "dataset": {"eval": {"source": "wiki.test.raw"}},
           "protocol": {"seq_len": 32, "stride": 32, "ids_sha256": sha},
           "evaluation": {"base": {"tokens_scored": sum(tokens), "window_nll": sums, "window_tokens": tokens}},
           "perplexity": {"base": ppl}, "variants": {"base": None}}
    if matrix:
        res["robustness"] = matrix
    (d / "results.json").write_text(json.dumps(res))
    return d


def test_runs_that_scored_the_same_windows_are_compared_paired_and_others_say_unpaired(tmp_path, capsys):
    """Each window's NLL rises by 0.1 nats in run b: paired, the ratio's interval is tight and
    excludes 1 (the window-to-window spread cancels); equals llm_stats.paired_perplexity. Run c
    scored other ids: named unpaired, no interval."""
    import llm_stats as ST

    sums = [31 * x for x in (1.0, 3.0, 2.0, 4.0, 1.5, 2.5, 3.5, 0.5)]
    tokens = [31] * 8
    shifted = [s + 31 * 0.1 for s in sums]
    a = _windows_run(tmp_path / "a", "abc", sums, tokens)
    b = _windows_run(tmp_path / "b", "abc", shifted, tokens, {
        "measures": {"hessian_trace": {"label": "Hessian trace"}},
        "rows": {"base": {"parent": None, "cells": {"hessian_trace": {"value": 12.5, "ci95": [10.0, 15.0]}}}}})
    c = _windows_run(tmp_path / "c", "other", shifted, tokens)
    assert M.main(["--compare", str(a), str(b), str(c), "--output-dir", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    d = ST.paired_perplexity(sums, tokens, shifted, tokens)
    lo, hi = d["ppl_ratio_ci95"]
    assert lo > 1 and f"| b | base | x{d['ppl_ratio']:.4g} [{lo:.4g}, {hi:.4g}] † |" in md
    assert "| c | base | unpaired: the runs did not score the same windows" in md
    assert "| b | base | - | - | 12.5 [10, 15] |" in md  # b's robustness matrix, its cells as recorded
    # Issue 32: each table of the comparison as CSV and LaTeX, named under it; the figure's PDF, caption
    cmp = tmp_path / "cmp"
    for t in T.find_tables(md):
        assert f"[CSV](tables/{t.name}.csv)" in md and (cmp / "tables" / f"{t.name}.tex").is_file()
        assert len((cmp / "tables" / f"{t.name}.csv").read_text().splitlines()) >= 2
    assert (cmp / "plots" / "compare.pdf").is_file() and "*Figure: Runs: a = " in md


def test_zero_shot_of_runs_on_the_same_questions_is_compared_by_mcnemar(tmp_path):
    """Run b answers 12 of the same 40 questions right that run a got wrong and none the other way:
    McNemar's p is scipy's binomial test of 0 of 12; run c asked other questions: unpaired."""
    from scipy.stats import binomtest

    a_bits = "0" * 20 + "1" * 20
    b_bits = "1" * 12 + "0" * 8 + "1" * 20
    runs = []
    for name, bits, ids in (("a", a_bits, None), ("b", b_bits, None), ("c", b_bits, list(range(1, 41)))):
        d = _windows_run(tmp_path / name, "abc", [31.0] * 2, [31] * 2)
        res = json.loads((d / "results.json").read_text())
        q = {"metric": "acc", "correct": bits, **({"doc_ids": ids} if ids else {})}
        res["zeroshot"] = {"questions": {"base": {"qa": q}}, "mean": {"base": {"acc": bits.count("1") / 40}}}
        (d / "results.json").write_text(json.dumps(res))
        runs.append(str(d))
    assert M.main(["--compare", *runs, "--output-dir", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    p = binomtest(0, 12, 0.5).pvalue
    assert f"| b | base | qa | +30.0 [" in md and f"| {p:.2g} † |" in md
    assert "| c | base | qa | unpaired: not the same questions | - |" in md


def test_compare_takes_runs_without_an_eval_step_and_fills_every_protocol_cell(tmp_path, capsys):
    """Issue 32: an attack-only run is compared on what it has; calibration, the grid's settings and
    the bits per weight are filled; a step that did not run says so instead of a blank."""
    a = _run(tmp_path / "a", 512, 8176, 8, 20.0)
    b = tmp_path / "b"
    b.mkdir()
    (b / "results.json").write_text(json.dumps({
        "model": "m", "seed": 3, "variants": {"base": None},
        "robustness": {"measures": {"pgd_delta_nll": {}}, "rows": {"base": {"parent": None, "cells": {
            "pgd_delta_nll": {"value": 0.5}}}}},
        "prune": {"grid": [{"name": f"pruned[wanda,{s},unstructured]", "method": "wanda", "pattern": "unstructured",
                            "target_sparsity": s, "overall_sparsity": s, "calibration_seed": 3,
                            "calibration": {"windows": 4, "seq_len": 64, "source": "c4"}} for s in (0.3, 0.6)]}}))
    assert M.main(["--compare", str(a), str(b), "--output-dir", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| b | m |"))
    assert "prune: 4 x 64 of c4, seed 3" in row and "prune: target\\_sparsity 0.3,0.6" in row
    assert row.count("not run") == 4  # tasks, limit, chat template, few-shot as turns
    bits = md.split("Bits per weight")[1]
    assert "| a | 16 | 9 | - | - |" in bits and "| b | 16 | - | 12.2 | 7.4 |" in bits  # 16 x 0.7 / 0.4 + a 1-bit mask
    assert "| b | base | - | - | 0.5 |" in md.split("Robustness matrix")[1]
