"""Issue 39 (reliability round 5): nothing outside the output folder is touched and nothing this
tool did not write is deleted; no table cell is a spreadsheet formula; one error line instead of a
traceback; nothing silently wrong; no result dropped, no flag ignored, no late refusal. Each test
stands for a kind of failure and tries several spellings of it."""
import csv
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llm_io as IO
import llm_main_v4 as M
import llm_tables as T
from conftest import one_error, tiny_argv


def _finished(d: Path, ppl: float = 20.0, **extra) -> Path:
    """A finished run's results.json, small and hand-written (no model): base and pruned."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps({
        "model": "m", "dtype": "torch.float32", "model_identity": {"label": "m"},
        "dataset": {"eval": {"source": "wiki.test.raw"}}, "protocol": {"seq_len": 32},
        "evaluation": {"base": {"tokens_scored": 100}}, "perplexity": {"base": ppl, "pruned": 2 * ppl},
        "variants": {"base": None, "pruned": "base"}, "steps_done": {"prune": "x", "eval": "y"},
        "prune": {"method": "wanda", "pattern": "unstructured", "overall_sparsity": 0.5}, **extra}))
    return d


@pytest.fixture(scope="module")
def finished_run(tiny_run_dir, tmp_path_factory):
    """A real finished run (prune, eval) of the tiny model; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("r5") / "run"
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "prune,eval")) == 0
    return out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, symlinks=True)
    return to


# --------------------------------------------------------------------------- 1. the output folder only

@pytest.mark.parametrize("linked", ["tables", "plots"])
@pytest.mark.parametrize("command", ["report-only", "compare"])
def test_an_output_folder_that_links_outside_is_refused_and_nothing_there_is_touched(tmp_path, capsys, linked,
                                                                                     command, finished_run):
    run = _copy(finished_run, tmp_path / "run")
    shutil.rmtree(run / linked)
    out = run if command == "report-only" else tmp_path / "cmp"
    out.mkdir(exist_ok=True)
    elsewhere = tmp_path / "P"
    elsewhere.mkdir()
    for name in ("results.tex", "perplexity.csv", "compare.png", "x.pdf"):
        (elsewhere / name).write_text("mine")
    (out / linked).symlink_to(elsewhere)
    argv = (["--report-only", "--output-dir", str(out)] if command == "report-only"
            else ["--compare", str(run), str(_finished(tmp_path / "run2", 30.0)), "--output-dir", str(out)])
    assert M.main(argv) == 2
    assert "symbolic link that leads out of the output folder" in one_error(capsys)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["compare.png", "perplexity.csv", "results.tex", "x.pdf"]
    assert all(p.read_text() == "mine" for p in elsewhere.iterdir())


@pytest.mark.parametrize("linked", ["checkpoints", "export", "plots", "tables", "finetuned"])
def test_a_run_into_a_folder_whose_subfolder_links_outside_is_refused_before_loading(tiny_run_dir, tmp_path, capsys,
                                                                                    linked, monkeypatch):
    import llm_model as LM

    monkeypatch.setattr(LM, "load_model", lambda *a, **k: pytest.fail("loaded before the refusal"))
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / linked).symlink_to(elsewhere)
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "prune,eval,export", "--export")) == 2
    assert "leads out of the output folder" in one_error(capsys)
    assert not list(elsewhere.iterdir())


def test_check_inside_follows_links_at_any_depth_and_allows_links_that_stay_inside(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    (out / "real").mkdir(parents=True)
    outside.mkdir()
    (out / "export").symlink_to(outside)
    (out / "checkpoints").symlink_to(out / "real")  # a link that stays inside is fine
    (out / "real" / "deep").symlink_to(outside)
    for bad in (out / "export" / "pruned" / "model.safetensors", out / "real" / "deep" / "x" / "y.png",
                out / "checkpoints" / "deep" / "z.pt"):
        with pytest.raises(IO.UserError, match="leads out of the output folder"):
            IO.check_inside(bad, out)
        with IO.writing_into(out), pytest.raises(IO.UserError, match="leads out of the output folder"):
            IO.write_text(bad, "x")
    IO.check_inside(out / "checkpoints" / "a.pt", out)
    assert not list(outside.rglob("*"))
    (out / "real" / "dangling").symlink_to(tmp_path / "nowhere")  # a link to nothing yet: where would it lead?
    with pytest.raises(IO.UserError, match="leads out of the output folder"):
        IO.check_inside(out / "real" / "dangling" / "x.csv", out)
    fresh = tmp_path / "fresh" / "deeper"  # an output folder not made yet: nothing to follow, written fine
    with IO.writing_into(fresh):
        IO.write_text(fresh / "tables" / "a.csv", "x")
    assert IO.written(fresh) == {"tables/a.csv"}


def test_a_rebuilt_report_deletes_only_the_tables_it_wrote(tmp_path):
    out = tmp_path / "out"
    (out / "tables").mkdir(parents=True)
    for name in ("mine.csv", "mine.tex", "perplexity_old.csv"):  # the user's, whatever their names
        (out / "tables" / name).write_text("mine")
    md_two = "## A\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n## Gone\n\n| c |\n|---|\n| 3 |\n"
    T.with_tables(md_two, out)
    assert (out / "tables" / "gone.csv").is_file()
    T.with_tables("## A\n\n| a | b |\n|---|---|\n| 1 | 2 |\n", out)  # a report with fewer tables
    assert not (out / "tables" / "gone.csv").exists() and not (out / "tables" / "gone.tex").exists()
    assert {p.name for p in (out / "tables").iterdir()} == {"a.csv", "a.tex", "mine.csv", "mine.tex",
                                                              "perplexity_old.csv"}
    assert "tables/a.csv" in IO.written(out) and "tables/gone.csv" not in IO.written(out)


def test_an_edited_manifest_never_reaches_outside_the_folder(tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim.csv"
    (out / "tables").mkdir(parents=True)
    victim.write_text("mine")
    (out / IO.WRITTEN).write_text(json.dumps(["tables/../../victim.csv", str(victim), "tables/./../../victim.csv"]))
    T.with_tables("## A\n\n| a |\n|---|\n| 1 |\n", out)
    assert victim.read_text() == "mine"
    assert not IO.remove_written(out, "../victim.csv") and victim.is_file()


def test_report_only_keeps_the_users_own_tables(tmp_path, capsys, finished_run):
    run = _copy(finished_run, tmp_path / "run")
    (run / "tables" / "mine.csv").write_text("a,b\n")
    (run / "tables" / "mine.tex").write_text("x")
    assert M.main(["--report-only", "--output-dir", str(run)]) == 0
    assert M.main(["--report-only", "--output-dir", str(run)]) == 0
    assert (run / "tables" / "mine.csv").read_text() == "a,b\n" and (run / "tables" / "mine.tex").is_file()
    assert (run / "tables" / "perplexity.csv").is_file()


@pytest.mark.parametrize("command", ["report-only", "compare"])
def test_every_command_that_writes_into_a_folder_holds_its_lock(tmp_path, capsys, command):
    run = _finished(tmp_path / "run")
    out = run if command == "report-only" else tmp_path / "cmp"
    out.mkdir(exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".llm-lock").write_text(str(holder.pid))  # a pipeline runs there
        argv = (["--report-only", "--output-dir", str(out)] if command == "report-only"
                else ["--compare", str(run), str(_finished(tmp_path / "b", 30.0)), "--output-dir", str(out)])
        assert M.main(argv) == 2
        assert f"in use by the run with PID {holder.pid}" in one_error(capsys)
        assert not (out / "tables").exists()
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- 2. no formula in a table

FORMULAS = ["=cmd|' /C calc'!A0", '=HYPERLINK("http://evil.example/x","open")', "+1+1", "-2+3", "@SUM(A1)",
            "\tx", "\r=1", " =1", "-inf", "'quoted"]


def test_no_csv_cell_starts_a_formula_and_every_value_comes_back():
    rows = [[f, "-0.5", "+3", "1,234", "-", "1e-05"] for f in FORMULAS if f == f.strip()]  # Markdown strips
    md = "| a | b | c | d | e | f |\n|---|---|---|---|---|---|\n" + "\n".join(
        "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)
    table = T.find_tables(md)[0]
    got = list(csv.reader(io.StringIO(T.csv_text(table))))[1:]
    for cells, want in zip(got, rows):
        assert cells[0].startswith("'"), cells  # a spreadsheet reads it as text
        assert cells[1:] == want[1:]  # plain numbers and the missing mark stay as they are
        assert T.csv_value(cells[0]) == T.plain(want[0].replace("|", "\\|"))
    for f in FORMULAS:
        assert T.csv_value(T.csv_cell(f)) == f


# --------------------------------------------------------------------------- 3. one error line

@pytest.mark.parametrize("measure", ["nosuch_measure", "perplexity_v9"])
def test_compare_shows_measures_it_does_not_know(tmp_path, capsys, measure):
    rob = {"measures": {measure: {"label": "From the future", "unit": "", "worse": "higher", "compare": "ratio"},
                        "perplexity": {"label": "perplexity"}},
           "rows": {"base": {"parent": None, "cells": {measure: {"value": 1.5}}}}}
    a = _finished(tmp_path / "a", robustness=rob)
    b = _finished(tmp_path / "b", 30.0, robustness={"measures": {"zz": {}}, "rows": {}})
    assert M.main(["--compare", str(a), str(b), "--output-dir", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "From the future" in md and "| zz |" in md


@pytest.mark.parametrize("measure", [{"label": "Future", "unit": "", "worse": "higher", "compare": "ratio"},
                                     {"label": "Future"}, {}])
def test_report_only_of_a_newer_results_json_shows_its_measures(finished_run, tmp_path, capsys, measure):
    run = _copy(finished_run, tmp_path / "run")
    res = json.loads((run / "results.json").read_text())
    res["robustness"]["measures"]["from_future"] = measure
    for row in res["robustness"]["rows"].values():
        row["cells"]["from_future"] = {"value": 1.5, "relative": 2.0}
    (run / "results.json").write_text(json.dumps(res))
    assert M.main(["--report-only", "--output-dir", str(run)]) == 0
    # (a measure without a label: llm_matrix's report section heads it by its key, escaped for Markdown;
    # shown, never a crash)
    assert measure.get("label", "from\\_future") in (run / "report.md").read_text()
    assert (run / "plots" / "robustness_heatmap.png").is_file()


@pytest.mark.parametrize("values", [(0.0, 0.0), (-1.0, 0.0), ("inf", "nan"), (0.0, None)])
def test_compare_of_an_unfinished_run_plots_what_it_can(tmp_path, capsys, values):
    a = _finished(tmp_path / "a")
    b = _finished(tmp_path / "b")
    res = json.loads((b / "results.json").read_text())
    res["perplexity"] = {"base": values[0], "pruned": values[1]}
    (b / "results.json").write_text(json.dumps(res))
    out = tmp_path / "cmp"
    assert M.main(["--compare", str(a), str(b), "--output-dir", str(out)]) == 0
    assert (out / "plots" / "compare.png").is_file()
    only = tmp_path / "only"
    assert M.main(["--compare", str(b), str(b), "--output-dir", str(only)]) == 0  # nothing drawable at all
    assert (only / "compare.md").is_file()


@pytest.mark.parametrize("command", ["report-only", "compare"])
@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES])
def test_a_read_only_output_folder_is_one_error_line(tmp_path, capsys, monkeypatch, command, err, finished_run):
    run = _copy(finished_run, tmp_path / "run")
    out = run if command == "report-only" else tmp_path / "cmp"
    out.mkdir(exist_ok=True)
    real_open = os.open

    def read_only(path, flags, *a, **k):  # the folder is on a read-only mount (tests run as root)
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    argv = (["--report-only", "--output-dir", str(out)] if command == "report-only"
            else ["--compare", str(run), str(_finished(tmp_path / "b", 30.0)), "--output-dir", str(out)])
    assert M.main(argv) == 2
    assert "cannot write into" in one_error(capsys)


# --------------------------------------------------------------------------- 4. nothing silently wrong

@pytest.fixture(scope="module", params=[4, 3])
def ct_export(tmp_path_factory, tok, request):
    """A compressed-tensors (pack-quantized, 4- and 3-bit, group 32) export of a tiny Llama."""
    import functools

    import llm_compress as LC
    import llm_export as E
    from test_export import _quantized_variant, make_llama_of

    d = tmp_path_factory.mktemp("ct")
    m = make_llama_of(64)
    recs, ckpt, bits_of = _quantized_variant(m, d, request.param, 32)
    E.export_variants(m, tok, {"quantized": functools.partial(LC.coded_weights, path=ckpt)}, d / "x",
                      E.ExportConfig(enabled=True, quant_format="compressed-tensors"),
                      codes={"quantized": (ckpt, bits_of)})
    return d / "x" / "quantized"


def _tampered(path: Path, to: Path, key_end: str, change) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(path, to)
    state = load_file(str(to / "model.safetensors"))
    key = next(k for k in sorted(state) if k.endswith(key_end))
    state[key] = change(state[key])
    save_file(state, str(to / "model.safetensors"), metadata={"format": "pt"})
    return to


@pytest.mark.parametrize("key,change", [
    ("q_proj.weight_scale", lambda t: t[:, :1].contiguous()),            # one scale per row: broadcast
    ("q_proj.weight_scale", lambda t: t.repeat(1, 2)),                   # twice the groups
    ("q_proj.weight_scale", lambda t: t.to(torch.int32)),                # not a float
    ("up_proj.weight_zero_point", lambda t: t[:1].contiguous()),         # zero points of too few rows
    ("k_proj.weight_packed", lambda t: t[:, :-1].contiguous()),          # codes cut short
    ("down_proj.weight_shape", lambda t: t.flip(0).contiguous()),        # the shape, transposed
    ("embed_tokens.weight", lambda t: t[:-1].contiguous()),              # a dense tensor of the wrong shape
    ("norm.weight", lambda t: t.to(torch.int32)),                        # a dense tensor that is not float
])
def test_a_compressed_tensors_export_with_a_wrong_tensor_is_refused(ct_export, tmp_path, key, change):
    import llm_export as E

    E.load_compressed_tensors(ct_export)  # the export as written loads
    bad = _tampered(ct_export, tmp_path / "bad", key, change)
    with pytest.raises(ValueError, match=key.split(".")[-1]):
        E.load_compressed_tensors(bad)


def test_no_figure_uses_offset_or_scientific_tick_notation(tmp_path):
    """Every figure make_plots draws, from results whose values invite matplotlib's offset and
    multiplier (sparsities 0.5000000 and 0.5000046, losses of 1e-7, traces of 1e9): every tick
    label is a plain number, with no offset or multiplier text beside the axis."""
    import re

    import llm_plots as P
    from test_figures import fixture_results

    res = fixture_results()
    for k, g in enumerate(res["prune"]["grid"]):  # three methods at 0.5, 0.5000023 and 0.5000046
        g["overall_sparsity"] = g["target_sparsity"] = 0.5 + 2.3e-6 * (k % 3)
    res["finetune"]["train_losses"] = [1e-7 * (1 + k / 10) for k in range(4)]
    res["analysis"]["activation_profile"]["down_out_max"] = [1e9 + k for k in range(4)]
    figures = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P.plt, "close", lambda fig=None: figures.append(fig))  # kept open to be read back
        drawn = P.make_plots(res, tmp_path)
    assert {"prune_curves", "finetune", "activations", "noise_sweep"} <= set(drawn)
    sci = re.compile(r"\d[eE][-+−]?\d|×|\$|\^")
    for fig in (f for f in figures if f is not None):
        fig.canvas.draw()
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                assert axis.get_offset_text().get_text() == "", (fig, axis.get_offset_text().get_text())
                for t in axis.get_ticklabels():
                    assert not sci.search(t.get_text()), (ax.get_xlabel(), ax.get_ylabel(), t.get_text())
        P.plt.close(fig)


def test_the_report_states_what_this_run_measured_and_names_its_memory(finished_run, tmp_path):
    """No fact of another measurement (the embedded model's "29.19 -> 40.60") in any report; the
    memory lines say what they measure, and the run's peak RSS is getrusage's, as the OS reports."""
    import resource

    import llm_model as LM
    import llm_report as RP

    res = json.loads((finished_run / "results.json").read_text())
    peak = res["manifest"]["peak_rss_mib"]
    assert 0 < peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + 1
    assert all("peak_rss_mib" in st for st in res["manifest"]["steps"].values())
    md = RP.report_markdown({**res, "model": LM.EMBEDDED_NAME, "dataset": {"eval": {"source": "my.txt"}}})
    assert "29.19" not in md and "40.60" not in md
    assert "max RSS, as the OS reports it" in md and "peak RSS so far (MiB)" in md
    assert "peak memory (MiB)" not in md


# --------------------------------------------------------------------------- 5. results kept, flags checked early

# A noise step in seconds: one sweep point, one seed, a small Fisher, no map.
NOISE_FAST = ("--sweep-eps", "0.1", "--sweep-seeds", "1", "--sweep-tokens", "64", "--sweep-seq-len", "32",
              "--noise-fisher-windows", "1", "--noise-fisher-seq-len", "32", "--noise-map", "off")


@pytest.fixture
def no_loading(monkeypatch):
    """A run that would load the model fails the test: these refusals come before any loading."""
    import llm_model as LM

    def load(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(LM, "load_model", load)


@pytest.mark.parametrize("flags,words", [
    (("--steps", "prune,noise", "--robustness-variants", "nosuch[*]"), "'nosuch[*]' names no variant"),
    (("--steps", "prune,noise", "--robustness-variants", "quantized"), "'quantized' names no variant"),
    (("--steps", "prune,noise", "--robustness-variants", "ALL"), "lower case"),
    (("--steps", "prune,noise", "--robustness-variants", "noisy,pruned[x]"), "'pruned[x]' names no variant"),
    (("--steps", "prune,noise", "--robustness-variants", "pruned,pruned"), "pruned given twice"),
    (("--steps", "prune,noise", "--robustness-variants", "live, noisy ,noisy"), "noisy given twice"),
    (("--steps", "prune,quantize", "--quant-method", "rtn", "--quantize-from", "nosuch[*]"),
     "--quantize-from: 'nosuch[*]' names no variant"),
    (("--steps", "prune,quantize", "--quant-method", "rtn", "--quantize-from", "quantized"),
     "--quantize-from: 'quantized' names no variant"),
    (("--steps", "quantize", "--quant-method", "rtn", "--quantize-from", "pruned"), "'pruned' names no variant"),
    (("--steps", "prune,quantize", "--quant-method", "rtn", "--quantize-from", "ALL"), "lower case"),
    (("--steps", "prune,quantize", "--quant-method", "rtn", "--quantize-from", "live,live"), "live given twice"),
    (("--steps", "prune,adversarial", "--robustness-variants", "quantized*"), "'quantized*' names no variant"),
    (("--steps", "prune", "--prune-from", "fine-tuned"), "--prune-from fine-tuned: this run will have no such model"),
])
def test_variant_patterns_are_checked_before_loading(tiny_run_dir, tmp_path, capsys, no_loading, flags, words):
    assert M.main(tiny_argv(tiny_run_dir, tmp_path / "out", *flags)) == 2
    assert words in one_error(capsys)


@pytest.mark.parametrize("flags", [
    ("--steps", "prune,quantize,noise", "--quant-method", "rtn", "--quantize-from", "live,pruned",
     "--robustness-variants", "pruned+quantized,noisy,live"),
    ("--steps", "prune,quantize", "--quant-method", "rtn", "--quantize-from", "pruned[*]", "--sparsity", "0.3,0.5"),
    ("--steps", "noise", "--robustness-variants", "pruned"),  # a variant an earlier run in the folder made
])
def test_patterns_that_the_planned_variants_satisfy_reach_the_model(tiny_run_dir, finished_run, tmp_path, capsys,
                                                                    no_loading, flags):
    out = _copy(finished_run, tmp_path / "out")
    with pytest.raises(AssertionError, match="loaded"):
        M.main(tiny_argv(tiny_run_dir, out, *flags))


def test_a_flag_typed_at_its_default_that_has_no_effect_is_named(tiny_run_dir, tmp_path, caplog, no_loading):
    with pytest.raises(AssertionError, match="loaded"):
        M.main(tiny_argv(tiny_run_dir, tmp_path / "out", "--steps", "quantize,eval", "--quant-method", "none",
                         "--quantize-from", "live"))
    assert "--quantize-from has no effect here: --quant-method none makes no quantized variant" in caplog.text


@pytest.mark.parametrize("content", [b"\xff\xfeh\x00i\x00\n\x00" * 50, "caf\u00e9 ok\n".encode("utf-16"),
                                     bytes(range(256)) * 4, b"", b" \n\n\t\n", b"text\x00with a NUL\n" * 20])
@pytest.mark.parametrize("where", ["data-dir", "file"])
def test_a_corpus_that_is_not_text_is_one_error_line_before_loading(tiny_run_dir, tmp_path, capsys, no_loading,
                                                                   content, where):
    raw = tmp_path / "d" / "wikitext-2-raw" / "wiki.test.raw"
    raw.parent.mkdir(parents=True)
    raw.write_bytes(content)
    flags = (("--dataset", "wikitext2", "--data-dir", str(tmp_path / "d")) if where == "data-dir"
             else ("--dataset", str(raw)))
    argv = tiny_argv(tiny_run_dir, tmp_path / "out", "--steps", "eval")
    argv[argv.index("--dataset"):argv.index("--dataset") + 2] = flags
    assert M.main(argv) == 2
    assert "corpus" in one_error(capsys)


def test_a_chat_template_the_tokenizer_lacks_is_refused_before_loading(tiny_run_dir, tmp_path, capsys, no_loading):
    for flags, words in ((("--apply-chat-template",), "has no chat template"),
                         (("--apply-chat-template", "--fewshot-as-multiturn", "on"), "has no chat template"),
                         (("--fewshot-as-multiturn", "on"), "needs --apply-chat-template"),
                         (("--fewshot-as-multiturn", "on", "--num-fewshot", "2"), "needs --apply-chat-template")):
        argv = tiny_argv(tiny_run_dir, tmp_path / "out", "--steps", "zeroshot", "--zeroshot", "on", "--tasks", "x",
                         *flags)
        assert M.main(argv) == 2
        assert words in one_error(capsys)


def test_a_tokenizer_without_chat_template_is_refused_right_after_loading(tok):
    """A hub model or a GGUF file cannot be looked into before loading: the loaded tokenizer is."""
    import llm_config as K
    import llm_zeroshot as Z

    cfg = K.ZeroShotConfig(enabled=True, apply_chat_template=True)
    with pytest.raises(IO.UserError, match="no chat template"):
        Z.check_tokenizer(tok, cfg)
    Z.check_tokenizer(tok, K.ZeroShotConfig(enabled=True))  # not asked for: nothing to refuse
    assert Z.prepare(cfg, cfg, K.RunConfig(model="HuggingFaceTB/SmolLM2-135M"), {}) == cfg  # cannot tell yet


def test_adding_a_variant_step_keeps_the_other_steps_results(tiny_run_dir, finished_run, tmp_path):
    """--steps noise into a finished run keeps eval's perplexities of base and pruned (the new noisy
    variant just has none yet); --steps eval then adds the noisy one and keeps the others' values."""
    out = _copy(finished_run, tmp_path / "out")
    before = json.loads((out / "results.json").read_text())["perplexity"]
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "noise", *NOISE_FAST)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["perplexity"] == before and "eval" in res["steps_done"] and "eval" in res["manifest"]["carried_over"]
    assert not (out / "results.json.stale").exists()
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "eval")) == 0
    after = json.loads((out / "results.json").read_text())["perplexity"]
    assert set(after) == {*before, "noisy"} and all(after[k] == pytest.approx(v) for k, v in before.items())


def test_figures_and_exports_of_dropped_results_go_where_stale_results_go(tiny_run_dir, tmp_path):
    out = tmp_path / "out"
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "prune,noise,eval,export", "--export", *NOISE_FAST)) == 0
    (out / "plots" / "mine.png").write_text("mine")
    (out / "export" / "mine").mkdir()
    drawn = {p.name for p in (out / "plots").iterdir()}
    assert {"noise_sweep.png", "robustness_heatmap.pdf", "pareto.caption.txt"} <= drawn
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "prune", "--sparsity", "0.7")) == 0  # drops the rest
    res = json.loads((out / "results.json").read_text())
    assert "noise" not in res and "export" not in res and (out / "results.json.stale").is_file()
    left = {p.name for p in (out / "plots").iterdir()}
    assert not {n for n in left if n.startswith(("noise_sweep", "robustness_heatmap", "pareto"))}
    assert {"mine.png", "prune_sparsity_per_layer.png"} <= left
    stale = {p.name for p in (out / "stale" / "plots").iterdir()}
    assert {"noise_sweep.png", "noise_sweep.pdf", "noise_sweep.caption.txt", "pareto.png"} <= stale
    assert sorted(p.name for p in (out / "export").iterdir()) == ["mine"]
    assert {"base", "pruned", "noisy"} <= {p.name for p in (out / "stale" / "export").iterdir()}
