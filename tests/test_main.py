"""The orchestrator end to end on a tiny saved model, and its bad-input handling."""
import dataclasses
import json
import math
import re
import typing

import pytest

import llm_common as C
import llm_config as K
from llm_knobs import flag_of
import llm_data as D
import llm_main_v4
import llm_variants as V


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, byte_tokenizer, tiny_llama):
    d = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, sample_text):
    p = tmp_path_factory.mktemp("corpus") / "text.txt"
    p.write_text(sample_text[:3000])
    return p


def test_eval_only_run_writes_strict_results_and_report(tiny_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = llm_main_v4.main(["--model", str(tiny_dir), "--steps", "eval", "--dataset", str(corpus_file),
                           "--train-dataset", str(corpus_file), "--seq-len", "32", "--eval-tokens", "256",
                           "--max-new-tokens", "4", "--output-dir", str(out), "--seed", "7"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["model"] == str(tiny_dir) and res["seed"] == 7
    proto = {k: v for k, v in res["protocol"].items() if k != "config"}
    assert re.fullmatch(r"[0-9a-f]{64}", proto.pop("ids_sha256"))  # what --compare pairs runs by
    design = proto.pop("sampling")  # which windows scored the budget: spread across the text by default
    assert proto == {"seq_len": 32, "stride": 32, "eval_tokens": 256, "tokens_available": proto["tokens_available"],
                     "tokens_used": 256}
    assert design["design"] == "spread" and design["windows"] == 8 and len(design["window_starts"]) == 8
    assert res["protocol"]["config"]["seq_len"] == 32 and res["protocol"]["config"]["max_new_tokens"] == 4
    assert res["dataset"]["eval"]["source"] == str(corpus_file)
    assert res["perplexity"]["base"] > 1
    assert res["evaluation"]["base"]["tokens_scored"] == 8 * 31
    assert "torch" in res["versions"]
    report = (out / "report.md").read_text()
    assert "| base |" in report and "What movie is" in report
    printed = capsys.readouterr().out  # the end-of-run table
    assert printed.startswith("variant") and re.search(rf"^base +- +{res['perplexity']['base']:.4g} ", printed, re.M)


BAD = [
    (["--steps", "bogus"], "unknown step"),
    (["--seq-len", "1"], "--seq-len"),
    (["--seq-len", "16", "--stride", "17"], "--stride"),
    (["--eval-tokens", "-5"], "--eval-tokens"),
    (["--batch-size", "0"], "--batch-size"),
    (["--dtype", "float8"], "--dtype"),
    (["--device", "tpu"], "--device"),
    (["--dataset", "/no/such/corpus.txt"], "corpus not found"),
    (["--model", "/no/such/model"], "model not found"),
    (["--model", "/no/such/model.gguf"], "model not found"),
    (["--max-memory", "0:10GiB"], "--max-memory"),
    (["--sparsity", "1.0"], "--sparsity"),
    (["--sparsity", "-0.2"], "--sparsity"),
    (["--prune-method", "random"], "--prune-method"),
    (["--sparsity-pattern", "3:2"], "N < M"),
    (["--lr", "0"], "--lr"),
    (["--finetune", "qlora"], "--finetune"),
    (["--ft-steps", "0"], "--ft-steps"),
    (["--calib-samples", "0"], "--calib-samples"),
    (["--epsilon", "-0.05"], "--epsilon"),
    (["--noise-mode", "uniform"], "--noise-mode"),
    (["--sweep-eps", "0.1,x"], "--sweep-eps"),
    (["--protect-fraction", "1.5"], "--protect-fraction"),
    (["--analysis-quant-bits", "4,1"], "--analysis-quant-bits"),
    (["--attack-eps", "-1"], "--attack-eps"),
    (["--attack-norm", "l1"], "--attack-norm"),
    (["--hessian-probes", "0"], "--hessian-probes"),
    (["--protect-super-weights", "layer:1"], "module:row:col"),
    (["--seed", "abc"], "--seed must be an integer"),
    (["--seed", "99999999999999999999"], "--seed"),
    (["--ft-steps", "99999999999999999999"], "--ft-steps must be at most"),
    (["--attack-steps", "99999999999999999999"], "--attack-steps"),
    (["--attack-eps", "1e308"], "--attack-eps"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lora-r", "1000000000"], "--lora-r"),
    (["--max-shard-size", "garbage"], "--max-shard-size"),
    (["--max-shard-size", "0"], "--max-shard-size"),
    (["--steps", "eval,eval"], "repeated"),
    (["--steps", ""], "--steps"),
    (["--log-level", "bogus"], "--log-level"),
    (["--attack-target", " "], "--attack-target"),
    (["--prompt", ""], "--prompt"),
    (["--noise-map", "maybe"], "--noise-map"),
    (["--bogus-flag", "1"], "unrecognized arguments"),
]


@pytest.mark.parametrize("argv,msg", BAD, ids=[m for _, m in BAD])
def test_bad_input_gets_one_clear_line(argv, msg, tmp_path, capsys):
    rc = llm_main_v4.main(argv + ["--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error:") and msg in err[0]
    assert not (tmp_path / "o" / "results.json").exists()


def _flags(numeric: bool) -> list:
    """Every flag generated from the configs: (flag, bounds, type) of the numeric ones, or the
    text-valued ones."""
    out = {}
    for cls in (K.RunConfig, *K.STEP_CONFIGS.values()):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", True) or hints[f.name] in (bool,):
                continue
            if numeric and f.metadata.get("bounds"):
                out[flag_of(cls, f)] = (f.metadata["bounds"], "int" if "int" in str(hints[f.name]) or
                                          f.metadata.get("parse") is K.parse_ints else "float")
            elif not numeric and not f.metadata.get("bounds"):
                out[flag_of(cls, f)] = None
    return sorted(out.items())


HOSTILE = ["-1", "0", "nan", "inf", "1e308", str(10 ** 20)]
QUICK = ["--model", "/no/such/model", "--dataset", "embedded", "--train-dataset", "embedded"]


def _within(text: str, bounds: str, kind: str) -> bool:
    """An independent reading of a knob's bounds: does the flag text parse and lie inside?"""
    try:
        x = int(text) if kind == "int" else float(text)
    except ValueError:
        return False
    if not math.isfinite(x):
        return False
    lo, hi = (float(v) for v in bounds[1:-1].split(","))
    return (x >= lo if bounds[0] == "[" else x > lo) and (x <= hi if bounds[-1] == "]" else x < hi)


@pytest.mark.parametrize("flag,spec", _flags(numeric=True), ids=[f for f, _ in _flags(numeric=True)])
def test_hostile_numbers_end_in_one_line_and_exit_2(flag, spec, tmp_path, capsys):
    """-1, 0, nan, inf, 1e308 and 10^20 for every numeric flag: refused in one line naming the
    flag, or accepted (then the run stops at the missing model, before any work) exactly when
    the value lies inside the knob's documented bounds."""
    bounds, kind = spec
    for v in HOSTILE:
        rc = llm_main_v4.main([flag, v, *QUICK, "--output-dir", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error:"), (flag, v, err)
        accepted = err[0].startswith("error: model not found")
        assert accepted == _within(v, bounds, kind), (flag, v, err[0])
        assert accepted or flag in err[0], (flag, v, err[0])


@pytest.mark.parametrize("flag", [f for f, _ in _flags(numeric=False)])
def test_empty_text_is_refused_in_one_line(flag, tmp_path, capsys):
    rc = llm_main_v4.main([*QUICK, "--output-dir", str(tmp_path / "o"), flag, ""])  # last wins: ours
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    # A flag with choices gets argparse's own line ("invalid choice: ''"), every other one ours.
    assert err[0] in (f"error: {flag} must not be empty", f"error: argument {flag}: invalid choice: '' "
                      f"(choose from {err[0].split('(choose from ', 1)[-1]}")


def test_help_shows_real_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as e:
        llm_main_v4.main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "(default: None)" not in text
    # Budgets show both columns, choices are listed, every step has its group.
    assert "--ft-steps STEPS" in text and "(default: 8 CPU, 500 GPU)" in text
    assert "{magnitude,wanda,sparsegpt,taylor}" in text and "--taylor-score {taylor,fisher}" in text
    assert all(f"step {s}:" in text for s in llm_main_v4.STEPS)


def test_calibration_text_that_holds_the_evaluation_text_is_refused(corpus_file, tmp_path, capsys):
    """The same file for calibration and evaluation is refused before the model is loaded
    (the model path does not even exist); --allow-overlap lets it through and records it."""
    rc = llm_main_v4.main(["--model", "/no/such/model", "--dataset", str(corpus_file), "--train-dataset",
                           str(corpus_file), "--steps", "prune,eval", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "evaluation paragraphs" in err[0] and "same text" in err[0]
    # Units are blank-line paragraphs (blank lines may hold spaces) and long single lines, of at
    # least 200 characters; here 3 evaluation units, 1 of them repeated in another text.
    p1, p2, p3 = ("alpha " * 40).strip(), ("beta " * 50).strip(), ("gamma " * 40).strip()
    (ev := tmp_path / "ev.txt").write_text(f" = Title = \n \n {p1} \n \n {p2}\n{p3}\nshort line\n")
    (tr := tmp_path / "tr.txt").write_text(f"An unrelated first paragraph.\n\n{p2}\n")
    ov = D.corpus_overlap(D.load_corpus(str(tr), "train"), D.load_corpus(str(ev), "test"), allow=True)
    assert ov["eval_paragraphs"] == 3 and ov["shared"] == 1 and not ov["same_text"]
    with pytest.raises(C.UserError, match="holds 1 of the 3"):
        D.corpus_overlap(D.load_corpus(str(tr), "train"), D.load_corpus(str(ev), "test"))


def test_corpus_shorter_than_a_window(tiny_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    rc = llm_main_v4.main(["--model", str(tiny_dir), "--steps", "eval", "--dataset", str(short),
                           "--seq-len", "64", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "shorter than one window" in errors[0]
    assert "Traceback" not in err


def test_not_a_model_directory(tmp_path, capsys):
    rc = llm_main_v4.main(["--model", str(tmp_path), "--steps", "eval", "--output-dir", str(tmp_path / "o")])
    assert rc == 2 and "no config.json" in capsys.readouterr().err


def test_read_only_output_dir_fails_before_loading(tmp_path, capsys):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits; use a path under a file instead
            target = tmp_path / "afile"
            target.write_text("")
            out = str(target / "out")
        else:
            out = str(ro / "out")
        rc = llm_main_v4.main(["--model", "/no/such/model", "--output-dir", out])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: --output-dir")  # checked before the model
    finally:
        os.chmod(ro, 0o700)


def test_full_pipeline_on_tiny_model(tiny_dir, corpus_file, tmp_path):
    out = tmp_path / "out"
    argv = ["--model", str(tiny_dir), "--steps", "finetune,prune,noise,eval,adversarial,analysis",
            "--attack-steps", "2", "--attack-windows", "2", "--gcg-steps", "2", "--defence-steps", "2",
            "--hessian-probes", "2", "--power-iters", "2", "--analysis-seq-len", "16", "--analysis-quant-group", "16",
            "--protect-super-weights", "auto", "--dataset", str(corpus_file),
            "--train-dataset", str(corpus_file), "--allow-overlap", "--seq-len", "32", "--eval-tokens", "256",
            "--max-new-tokens", "3",
            "--ft-steps", "3", "--ft-seq-len", "32", "--ft-batch-size", "2", "--lr", "1e-3",
            "--calib-samples", "4", "--calib-seq-len", "32", "--kl", "--output-dir", str(out),
            "--sweep-eps", "0.1,1", "--sweep-seeds", "2", "--sweep-tokens", "64", "--protect-fraction", "0.05",
            "--noise-map", "on"]
    assert llm_main_v4.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["perplexity"]) == {"base", "fine-tuned", "pruned", "noisy"}
    assert res["variants"] == {"base": None, "fine-tuned": "base", "pruned": "fine-tuned", "noisy": "fine-tuned"}
    assert res["perplexity"]["base"] != res["perplexity"]["fine-tuned"]
    assert res["perplexity"]["noisy"] > res["perplexity"]["fine-tuned"]
    sweep = res["noise"]["sweep"]
    assert set(sweep["summary"]) == {"unprotected", "protected"} and len(sweep["points"]) == 8
    assert len(res["noise"]["top_cells"]) == 5 and (out / "plots" / "noise_map.png").is_file()
    assert len(res["adversarial"]["table"]) == 6 and (out / "plots" / "attack_sweep.png").is_file()
    an = res["analysis"]
    assert len(an["hessian_trace"]) == 14 and len(an["quantization"]) == 6
    assert set(an["rank_correlation"]) == {"hessian_vs_fisher", "hessian_vs_noise", "fisher_vs_noise"}
    assert (out / "plots" / "sensitivity_heatmaps.png").is_file() and "## Sensitivity analysis" in (
        out / "report.md").read_text()
    assert res["prune"]["overall_sparsity"] == pytest.approx(0.5, abs=0.02)
    # --kl: every variant against its parent (the fine-tuned model against the base it was tuned from)
    assert res["evaluation"]["pruned"]["kl"] > 0 and res["evaluation"]["fine-tuned"]["kl"] > 0
    assert res["evaluation"]["base"]["kl"] is None
    assert res["finetune"]["heldout_loss_after"] < res["finetune"]["heldout_loss_before"]
    assert (out / "finetuned" / "manifest.json").is_file()
    assert (out / "plots" / "finetune_loss.png").is_file() and (out / "plots" / "prune_sparsity_per_layer.png").is_file()
    # The live model is restored after pruning: the fine-tuned variant is dense.
    pruned = V.load_masks(out / "checkpoints" / "pruned.safetensors")  # 1 bit per weight: True = pruned
    assert all(float(t.float().mean()) >= 0.45 for t in pruned.values())
    # A second run loads the finished fine-tune instead of training again.
    assert llm_main_v4.main(argv) == 0
    res2 = json.loads((out / "results.json").read_text())
    assert res2["finetune"]["loaded_existing"] is False  # the record of the training run is kept
    steps = res2["manifest"]["steps"]
    assert all(steps[s]["skipped"] for s in ("prune", "noise", "eval", "adversarial", "analysis"))
    assert res2["perplexity"] == res["perplexity"]


def test_the_recorded_command_is_shell_quoted_and_python_calls_record_their_config(tiny_run_dir, tmp_path,
                                                                                    pipeline_config):
    """Row 8: a path with spaces and a hostile --tasks come back as one argument each; from a
    notebook (no argv) the record says it came from Python and holds the config, not the kernel's argv."""
    import shlex
    import sys

    import llm_main_v4 as M

    out = tmp_path / "with space; touch x"
    args = ["--model", str(tiny_run_dir / "model"), "--dataset", str(tiny_run_dir / "text.txt"), "--steps", "eval",
            "--seq-len", "32", "--eval-tokens", "64", "--max-new-tokens", "1", "--output-dir", str(out),
            "--log-level", "WARNING"]
    assert M.main(args) == 0
    cmd = json.loads((out / "results.json").read_text())["manifest"]["command"]
    assert shlex.split(cmd) == ["python", "llm_main_v4.py", *args]
    old = sys.argv
    sys.argv = ["ipykernel_launcher.py", "-f", "/tmp/kernel-1234.json"]
    try:
        res = M.run_pipeline(pipeline_config(tiny_run_dir / "model", tiny_run_dir / "text.txt", tmp_path / "nb",
                                             steps=("eval",), eval={"seq_len": 16}))
    finally:
        sys.argv = old
    cmd = res["manifest"]["command"]
    assert "kernel-1234" not in cmd and "from Python" in cmd and '"seq_len": 16' in cmd


def test_a_hub_id_offline_fails_fast_in_one_line(tmp_path, capsys, monkeypatch):
    import time

    import llm_common as C
    import llm_main_v4 as M

    monkeypatch.setattr(C, "hub_reachable", lambda timeout=3.0: False)
    t = time.perf_counter()
    assert M.main(["--model", "no-such-org/no-such-model", "--dataset", "embedded", "--steps", "eval",
                   "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "offline" in err and "Traceback" not in err
    assert time.perf_counter() - t < 20
