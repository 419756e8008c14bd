"""One run, one trustworthy report: resume after SIGKILL, determinism, config changes, report-only."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import llm_compare
import llm_main_v4
import llm_results as R
from conftest import without

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"plots_s", "seconds", "tokens_per_s", "peak_memory_mb",
               "peak_rss_mib", "peak_cuda_allocated_mib", "wall_s", "bookkeeping_s", "skipped", "loaded_existing",
               "resumed_from_step", "estimate"}  # estimate: timed on the machine, as wall_s


def comparable(obj):
    """results.json minus timings and resume bookkeeping."""
    return without(obj, TIMING_KEYS)


@pytest.fixture(scope="module")
def setup(tiny_run_dir):
    return tiny_run_dir


def argv(setup, out, *extra):
    return ["--model", str(setup / "model"), "--allow-overlap", "--dataset", str(setup / "text.txt"), "--train-dataset",
            str(setup / "text.txt"), "--steps", "finetune,prune,noise,eval", "--seq-len", "32", "--eval-tokens", "128",
            "--max-new-tokens", "2", "--ft-steps", "4", "--ft-seq-len", "32", "--ft-batch-size", "2", "--lr", "1e-3",
            "--calib-samples", "2", "--calib-seq-len", "32", "--sweep-eps", "0.1,1", "--sweep-seeds", "2",
            "--sweep-tokens", "64", "--noise-map", "off", "--output-dir", str(out), "--log-level", "WARNING", *extra]


def run_cli(args, fault=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LLM_FAULT_AT", None)
    if fault:
        env["LLM_FAULT_AT"] = fault
    return subprocess.run([sys.executable, str(ROOT / "llm_main_v4.py"), *args], env=env, capture_output=True,
                          text=True, timeout=600)


def results(out):
    """results.json with the output directory's path replaced, so runs in two places compare."""
    return json.loads((Path(out) / "results.json").read_text().replace(str(out), "<OUT>"))


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    assert llm_main_v4.main(argv(setup, out)) == 0
    return results(out)


def test_same_seed_gives_identical_results(setup, reference, tmp_path):
    assert llm_main_v4.main(argv(setup, tmp_path / "again")) == 0
    assert comparable(results(tmp_path / "again")) == comparable(reference)


@pytest.mark.parametrize("fault", ["write:pruned.safetensors", "during:noise", "write:results.json",
                                   "write:finetuned"])
def test_sigkill_then_resume_gives_identical_results(setup, reference, tmp_path, fault):
    out = tmp_path / "out"
    killed = run_cli(argv(setup, out), fault=fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(argv(setup, out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = results(out)
    assert comparable(got) == comparable(reference)
    assert not list(out.rglob(".llm-tmp-*")) and not list(out.rglob(".*.tmp"))  # no half-written leftovers


def test_changed_config_reruns_that_step_and_later_ones(setup, reference, tmp_path):
    out = tmp_path / "out"
    assert llm_main_v4.main(argv(setup, out)) == 0
    assert llm_main_v4.main(argv(setup, out, "--epsilon", "0.2")) == 0
    steps = results(out)["manifest"]["steps"]
    assert steps["prune"]["skipped"] and not steps["noise"]["skipped"] and not steps["eval"]["skipped"]
    new = results(out)
    assert new["perplexity"]["pruned"] == reference["perplexity"]["pruned"]
    assert new["perplexity"]["noisy"] != reference["perplexity"]["noisy"]


def test_report_only_rebuilds_without_a_model(setup, reference, tmp_path):
    out = tmp_path / "out"
    assert llm_main_v4.main(argv(setup, out)) == 0
    for f in (out / "plots").iterdir():
        f.unlink()
    (out / "report.html").unlink()
    rc = llm_main_v4.main(["--report-only", "--output-dir", str(out), "--model", "/no/such/model"])
    assert rc == 0
    assert {p.name for p in (out / "plots").iterdir()} >= {"finetune_loss.png", "prune_sparsity_per_layer.png",
                                                          "noise_sweep.png"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "missing plot" not in html
    md = (out / "report.md").read_text()
    assert "## Findings" in md and "| noisy |" in md


def test_report_only_without_results_is_a_clear_error(tmp_path, capsys):
    assert llm_main_v4.main(["--report-only", "--output-dir", str(tmp_path)]) == 2
    assert "no readable results.json" in capsys.readouterr().err


def test_bookkeeping_is_cheap(reference):
    m = reference["manifest"]
    total = sum(s["wall_s"] for s in m["steps"].values())
    # Fingerprints and atomic results.json writes, against steps that take ~1 s on a tiny model;
    # on the real model the ratio is far smaller (bench/bench_resume.py).
    assert m["bookkeeping_s"] < 0.05 * total


@pytest.mark.skipif(not any(__import__("shutil").which(c) for c in ("chromium", "chromium-browser")),
                    reason="headless Chromium is not installed (apt-get install chromium)")
def test_report_html_renders_in_chromium(setup, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import render_report

    out = tmp_path / "out"
    assert llm_main_v4.main(argv(setup, out)) == 0
    ok, n, shot = render_report.check(out)
    assert ok and n >= 3
    assert shot.read_bytes()[:4] == b"\x89PNG"


def test_twenty_random_kills_resume_to_identical_results(setup, reference, tmp_path):
    """SIGKILL at 20 random moments (seeded) of one short run, each time started again; the
    finished run equals an uninterrupted one, with no temporaries and no lock left behind."""
    import random

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LLM_FAULT_AT", None)
    cmd = [sys.executable, str(ROOT / "llm_main_v4.py"), *argv(setup, out)]
    t0 = time.perf_counter()
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode == 0  # how long a run takes
    whole = time.perf_counter() - t0
    shutil.rmtree(out)
    rng, kills = random.Random(20), 0
    while kills < 20:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.3, whole))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0
        shutil.rmtree(out)  # it finished before the kill: start over, so that every kill lands mid-run
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert comparable(results(out)) == comparable(reference)
    assert not list(out.rglob(".llm-tmp-*")) and not (out / ".llm-lock").exists()


def test_compare_runs_reads_only_their_results(tmp_path, capsys):
    """--compare writes one table and one plot across runs from their results.json alone (no
    model); each cell is the run's perplexity and its ratio to the variant's parent."""
    runs = []
    for name, ppl in (("a", {"base": 10.0, "pruned": 15.0}), ("b", {"base": 10.0, "pruned": 30.0, "noisy": "inf"})):
        d = tmp_path / name
        d.mkdir()
        variants = {"base": None, "pruned": "base", "noisy": "base"}
        quant = {"status": "ran", "method": "gptq", "bit_allocation": "hessian", "budget_bits": 3.5, "group": 128,
                 "avg_bits": 3.64} if name == "b" else {}
        (d / "results.json").write_text(json.dumps({"model": "m", "perplexity": ppl, "variants": variants,
                                                    "prune": {"method": "wanda", "pattern": "2:4",
                                                              "overall_sparsity": 0.5}, "quantize": quant}))
        runs.append(str(d))
    out = tmp_path / "cmp"
    code = ("import sys, llm_main_v4; rc = llm_main_v4.main(['--compare', *sys.argv[2:], '--output-dir', sys.argv[1]]);"
            " print(rc, sorted(m for m in sys.modules if m.startswith('llm_')))")
    got = subprocess.run([sys.executable, "-c", code, str(out), *runs], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1].split(" ", 1)
    steps = {s.module for s in llm_main_v4.STEPS.values()}
    assert got[0] == "0" and not set(eval(got[1])) & steps
    md = (out / "compare.md").read_text()
    labels = llm_compare.short_names(runs)
    assert f"| {R.esc(labels[0])} | wanda 2:4 0.5 | - | - | 10 | 15 (x1.5) | - |" in md
    assert f"| {R.esc(labels[1])} | wanda 2:4 0.5 | - | gptq hessian mixed precision at 3.5 code bits per weight " \
           "g128 (3.64 bits) | 10 | 30 (x3) | inf (xinf) |" in md
    assert (out / "plots" / "compare.png").stat().st_size > 1000 and "data:image/png" in (out / "compare.html").read_text()
    assert llm_main_v4.main(["--compare", str(tmp_path / "nothing"), "--output-dir", str(out)]) == 2
    assert "no finished run" in capsys.readouterr().err
