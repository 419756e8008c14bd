"""--compare and --report-only read other runs' results.json: every field goes through one
type-checking, escaping reader (issue 22, rows 7 and 9), and the legend tells runs apart."""
import json
import os
import re

import pytest

import llm_main_v4 as M
import llm_compare
import llm_report
import llm_results as R

LINK = "[x](javascript:alert(1))"


def good() -> dict:
    return {"model": "m", "perplexity": {"base": 10.0, "pruned": 15.0, "noisy": 12.0},
            "variants": {"base": None, "pruned": "base", "noisy": "base"},
            "prune": {"method": "wanda", "pattern": "2:4", "overall_sparsity": 0.5},
            "noise": {"variant": {"mode": "absolute", "epsilon": 0.05}},
            "zeroshot": {"mean": {"base": {"acc": 0.5}, "pruned": {"acc": 0.4}}}}


def hostile() -> dict:
    r = good()
    r["prune"] = {"method": LINK, "pattern": LINK, "overall_sparsity": LINK}
    r["noise"] = {"variant": {"mode": LINK, "epsilon": LINK}}
    r["perplexity"][LINK] = 11.0
    r["variants"][LINK] = "base"
    return r


# Each case: what a foreign results.json holds (a dict, or None for a special file).
CASES = {
    "prune_without_method": lambda r: r["prune"].pop("method"),
    "noise_variant_without_mode": lambda r: r["noise"]["variant"].pop("mode"),
    "variants_as_list": lambda r: r.update(variants=["base", "pruned"]),
    "zeroshot_mean_as_string": lambda r: r["zeroshot"]["mean"].update(base="0.5"),
    "zeroshot_as_list": lambda r: r.update(zeroshot=[1, 2]),
    "mathtext_variant_name": lambda r: r["perplexity"].update({"$\\frac{1}{$": 3.0}),
    "mathtext_model": lambda r: r.update(model="$\\frac{1}{$"),
    "parent_as_list": lambda r: r["variants"].update(pruned=["base"]),
    "perplexity_value_dict": lambda r: r["perplexity"].update(noisy={"a": 1}),
    "links_everywhere": lambda r: r.update(hostile()),
}


def _only_own_links(page: str) -> bool:
    """No link but the report's own table files and PDFs (issue 32), none made from a field's text."""
    links = re.findall(r"<a\b[^>]*>", page)
    return len(links) == page.count("href") and all(
        re.fullmatch(r'<a href="(tables|plots)/[a-z0-9_]+\.(csv|tex|pdf)">', a) for a in links)


@pytest.mark.parametrize("case", sorted(CASES))
def test_compare_survives_foreign_fields(tmp_path, capsys, case):
    a, b = tmp_path / "exp1" / "data", tmp_path / "exp2" / "data"
    for d in (a, b):
        d.mkdir(parents=True)
    (a / "results.json").write_text(json.dumps(good()))
    bad = good()
    CASES[case](bad)
    (b / "results.json").write_text(json.dumps(bad))
    out = tmp_path / "cmp"
    assert M.main(["--compare", str(a), str(b), "--output-dir", str(out)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    page = (out / "compare.html").read_text()
    assert _only_own_links(page) and "javascript:alert(1)</a>" not in page
    assert "data:image/png" in page  # the plot rendered, whatever the names


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "huge"])
def test_compare_reads_only_bounded_regular_files(tmp_path, capsys, monkeypatch, kind):
    d = tmp_path / "run"
    d.mkdir()
    if kind == "fifo":
        os.mkfifo(d / "results.json")
    elif kind == "dev_zero":
        (d / "results.json").symlink_to("/dev/zero")
    else:
        (d / "results.json").write_text(json.dumps(good()) + " " * 2048)
        monkeypatch.setattr(R.IO, "MAX_JSON_BYTES", 1024)
        monkeypatch.setattr(R.IO.read_json, "__defaults__", (1024,))
    assert M.main(["--compare", str(d), "--output-dir", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "no finished run" in err and "Traceback" not in err


@pytest.mark.parametrize("case", sorted(CASES))
def test_report_only_survives_foreign_fields(tmp_path, capsys, case):
    """--report-only on the same files: a report with the fields escaped, or one error line."""
    r = good()
    r["evaluation"] = {v: {"perplexity": p, "nll": 1.0, "bits_per_byte": 1.0, "tokens_scored": 8}
                       for v, p in r["perplexity"].items()}
    CASES[case](r)
    (tmp_path / "results.json").write_text(json.dumps(r))
    rc = M.main(["--report-only", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if rc:
        assert rc == 2 and err.count("error:") == 1
    else:
        page = (tmp_path / "report.html").read_text()
        assert _only_own_links(page)


def test_markdown_never_renders_links_of_any_scheme(tmp_path):
    md = f"{LINK} <http://x.org> [y][r]\n\n[r]: javascript:alert(2)\n\n![p](plots/p.png) ![q](file:///etc/passwd)"
    page = llm_report.markdown_to_html(md, tmp_path)
    assert "<a " not in page and "/etc/passwd\"" not in page


def test_the_legend_names_each_run_by_its_shortest_distinct_suffix():
    assert llm_compare.short_names(["exp1/data", "exp2/data"]) == ["exp1/data", "exp2/data"]
    assert llm_compare.short_names(["/a/b/run1", "/a/c/run2"]) == ["run1", "run2"]
    assert len(set(llm_compare.short_names(["x/data", "x/data"]))) == 2


def test_field_reads_by_type():
    r = {"a": {"b": "s"}, "l": [1]}
    assert R.field(r, "a", "b", kind=str) == "s" and R.field(r, "a", "b", kind=dict) is None
    assert R.field(r, "l", "x") is None and R.field("str", "x", default=3) == 3
    assert not re.search(r"(?<!\\)[\[\]()]", R.text(LINK).replace("(", "").replace(")", ""))
