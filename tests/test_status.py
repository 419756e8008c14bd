"""A run says where it stands (issue 24 item 8): an end-of-run table on stdout, a banner on the
report of an unfinished run, and switched-off steps recorded as "off", never as run."""
import json

import llm_main_v4 as M
from conftest import tiny_argv


def test_the_end_table_and_off_steps(tiny_run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "prune,quantize,zeroshot,eval,export")) == 0
    res = json.loads((out / "results.json").read_text())
    skipped = {s: v["skipped"] for s, v in res["manifest"]["steps"].items() if s != "load"}
    # --quant-method none, zero-shot off on CPU without --tasks, no --export: off; the others ran.
    assert skipped == {"prune": False, "quantize": "off", "zeroshot": "off", "eval": False, "export": "off"}
    printed = capsys.readouterr().out.splitlines()
    head = printed.index(next(ln for ln in printed if ln.startswith("variant")))
    assert printed[head].split() == ["variant", "parent", "perplexity", "95%", "interval", "x", "parent", "zero-shot",
                                     "mean"]
    pruned = next(ln for ln in printed if ln.startswith("pruned")).split()
    ratio = res["perplexity"]["pruned"] / res["perplexity"]["base"]
    lo, hi = res["evaluation"]["pruned"]["perplexity_ci95"]
    assert pruned[1] == "base" and pruned[3:5] == [f"[{lo:.4g},", f"{hi:.4g}]"]
    assert abs(float(pruned[5]) - ratio) < 1e-3 * ratio
    assert any("windows of 32 tokens" in ln for ln in printed) and printed[-1] == f"report: {out / 'report.html'}"


def test_a_report_of_an_unfinished_run_names_the_steps_that_never_ran(tiny_run_dir, tmp_path):
    out = tmp_path / "out"
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "prune,eval")) == 0
    assert "did not finish" not in (out / "report.md").read_text()
    res = json.loads((out / "results.json").read_text())
    res["steps"] = ["prune", "eval", "adversarial", "analysis"]  # as a run killed after eval leaves it
    (out / "results.json").write_text(json.dumps(res))
    assert M.main(["--report-only", "--output-dir", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "This run did not finish: steps adversarial, analysis never ran." in md
