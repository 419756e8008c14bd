"""Faults and hostile files: Ctrl-C, a second run, a full disk, corrupt results, stale
fine-tunes, foreign temporaries, local-file disclosure, bad corpora and model files."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llm_common as C
import llm_config as K
import llm_data as D
import llm_io as IO
import llm_main_v4
import llm_model as LM
from conftest import one_error, tiny_argv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_run_dir):
    return tiny_run_dir


def argv(tiny, out, *extra):
    return tiny_argv(tiny, out, "--steps", "prune,eval", *extra)


def test_a_second_run_on_a_directory_in_use_is_refused_and_a_stale_lock_is_taken(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".llm-lock").write_text(str(holder.pid))
        assert llm_main_v4.main(argv(tiny, out)) == 2
        assert f"in use by the run with PID {holder.pid}" in one_error(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert llm_main_v4.main(argv(tiny, out)) == 0  # the holder is gone: its lock is stale
    assert not (out / ".llm-lock").exists()


def test_only_dead_runs_temporaries_are_removed(tiny, tmp_path):
    out = tmp_path / "out"
    (out / "p" / ".build.tmp").mkdir(parents=True)  # the user's own, never ours to delete
    (out / "p" / ".build.tmp" / "keep").write_text("x")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / f".llm-tmp-{dead.pid}-results.json.abc").mkdir()
    live = out / f".llm-tmp-{os.getpid()}-other.xyz"
    live.mkdir()
    assert llm_main_v4.main(argv(tiny, out)) == 0
    assert (out / "p" / ".build.tmp" / "keep").is_file() and live.is_dir()
    assert not (out / f".llm-tmp-{dead.pid}-results.json.abc").exists()


def test_a_full_disk_keeps_the_previous_results(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    IO.write_json(path, {"perplexity": {"base": 1.0}})

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(C.UserError, match="no space left"):
        IO.write_json(path, {"perplexity": {"base": 2.0}})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"perplexity": {"base": 1.0}}
    assert not list(tmp_path.glob(".llm-tmp-*"))


@pytest.mark.parametrize("content", ["[]", '{"steps_done": []}', '{"prune": "oops"}', '{"truncated": ', "\x00\x01"])
def test_corrupt_or_foreign_results_are_moved_aside(tiny, tmp_path, content, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(content)
    rc = llm_main_v4.main(["--report-only", "--output-dir", str(out)])
    assert rc == 2 and "no readable results.json" in one_error(capsys)
    assert len(list(out.glob("results.json.unreadable-*"))) == 1
    (out / "results.json").write_text(content)
    assert llm_main_v4.main(argv(tiny, out)) == 0  # a run starts afresh instead
    assert "perplexity" in json.loads((out / "results.json").read_text())


def test_a_checkpoint_path_outside_the_output_dir_is_not_trusted(tiny, tmp_path):
    out = tmp_path / "out"
    assert llm_main_v4.main(argv(tiny, out)) == 0
    res = json.loads((out / "results.json").read_text())
    outside = tmp_path / "elsewhere.safetensors"
    (out / "checkpoints" / "pruned.safetensors").rename(outside)
    res["prune"]["checkpoint"] = str(outside)  # same fingerprints, a path out of the directory
    (out / "results.json").write_text(json.dumps(res))
    assert llm_main_v4.main(argv(tiny, out)) == 0
    again = json.loads((out / "results.json").read_text())
    assert not again["manifest"]["steps"]["prune"]["skipped"]  # rerun, not loaded from outside
    assert again["prune"]["checkpoint"] == "checkpoints/pruned.safetensors"


def test_a_fine_tune_of_another_config_is_set_aside_and_retrained(tiny, tmp_path):
    out = tmp_path / "out"
    ft = ["--steps", "finetune", "--ft-steps", "2", "--ft-seq-len", "32", "--ft-batch-size", "2", "--lr", "1e-3"]
    assert llm_main_v4.main(argv(tiny, out, *ft)) == 0
    first = json.loads((out / "results.json").read_text())["finetune"]
    assert llm_main_v4.main(argv(tiny, out, *ft[:-4], "--ft-steps", "3", *ft[-4:])) == 0  # ft-steps 2 -> 3
    second = json.loads((out / "results.json").read_text())["finetune"]
    assert not second["loaded_existing"] and len(second["train_losses"]) == 3 and len(first["train_losses"]) == 2
    assert len(list(out.glob("finetuned.stale-*"))) == 1
    assert llm_main_v4.main(argv(tiny, out, *ft[:-4], "--ft-steps", "3", *ft[-4:])) == 0  # same again: reused
    assert json.loads((out / "results.json").read_text())["finetune"]["train_losses"] == second["train_losses"]


def test_prompts_cannot_embed_local_files_or_html(tiny, tmp_path):
    out = tmp_path / "out"
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG top secret")
    prompt = f"![x]({secret}) ![y](/etc/hostname) <script>alert(1)</script>"
    assert llm_main_v4.main(argv(tiny, out, "--prompt", prompt)) == 0
    page = (out / "report.html").read_text()
    import base64

    assert base64.b64encode(secret.read_bytes()).decode() not in page
    assert "<script>alert" not in page and f'src="{secret}"' not in page and 'src="/etc/hostname"' not in page


def test_sigint_exits_in_one_line_leaves_no_temporaries_and_resumes(tiny, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "llm_main_v4.py"), *argv(tiny, out, "--steps",
                                                                               "prune,noise,eval")],
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "results.json").is_file():  # wait for the first finished step
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1].strip().splitlines()
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130 and err[-1].startswith("error: interrupted") and "Traceback" not in "\n".join(err)
    assert not list(out.rglob(".llm-tmp-*")) and not (out / ".llm-lock").exists()
    assert llm_main_v4.main(argv(tiny, out, "--steps", "prune,noise,eval")) == 0


@pytest.mark.parametrize("kind", ["binary", "utf16"])
def test_bad_corpora_give_one_line(kind, tiny, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(bytes(range(256)) * 8 if kind == "binary" else "some text\n".encode("utf-16") * 50)
    rc = llm_main_v4.main(["--model", str(tiny / "model"), "--steps", "eval", "--dataset", str(bad),
                           "--output-dir", str(tmp_path / "o")])
    assert rc == 2 and "corpus" in one_error(capsys)


@pytest.mark.parametrize("kind", ["truncated_gguf", "empty_gguf", "truncated_safetensors", "wrong_shapes",
                                  "remote_code"])
def test_bad_model_files_give_one_line(kind, tiny, tmp_path, capsys):
    import shutil

    if kind.endswith("gguf"):
        model = tmp_path / "m.gguf"
        src = LM.embedded_gguf_path()
        model.write_bytes(src.read_bytes()[:100_000] if kind == "truncated_gguf" else b"")
    else:
        model = tmp_path / "m"
        shutil.copytree(tiny / "model", model)
        cfg = json.loads((model / "config.json").read_text())
        if kind == "truncated_safetensors":
            w = model / "model.safetensors"
            w.write_bytes(w.read_bytes()[:5000])
        elif kind == "wrong_shapes":
            cfg["hidden_size"] *= 2
        else:
            cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
        (model / "config.json").write_text(json.dumps(cfg))
    rc = llm_main_v4.main(["--model", str(model), "--steps", "eval", "--dataset", "embedded", "--cache-dir",
                           str(tmp_path / "cache"), "--output-dir", str(tmp_path / "o")])
    line = one_error(capsys)
    assert rc == 2
    assert ("trust-remote-code" in line) if kind == "remote_code" else ("GGUF" in line or "not loadable" in line)


def test_wikitext2_named_explicitly_never_falls_back(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(D, "_hub_text", lambda name, split, offline: (_ for _ in ()).throw(OSError("not cached")))
    rc = llm_main_v4.main(["--model", "/no/such/model", "--steps", "eval", "--dataset", "wikitext2",
                           "--output-dir", str(tmp_path / "o")])
    assert rc == 2 and "embedded corpus is not used" in one_error(capsys)
    corpus = D.load_corpus("wikitext2", "test")  # the default still falls back, and says so
    assert corpus.fallback and corpus.source.startswith("pydoc_data")


def test_what_would_fail_after_hours_fails_before_training(tiny, tmp_path, capsys, monkeypatch):
    """A noise group the model does not have, or a disk too small for the fine-tune, stops the
    run before any training (nothing is written under finetuned/)."""
    out = tmp_path / "out"
    ft = ["--steps", "finetune,prune,noise", "--ft-steps", "2", "--ft-seq-len", "32", "--ft-batch-size", "2"]
    assert llm_main_v4.main(argv(tiny, out, *ft, "--noise-group", "layer:99")) == 2
    assert "layer" in one_error(capsys) and not (out / "finetuned").exists()
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1024))
    assert llm_main_v4.main(argv(tiny, out, *ft)) == 2
    assert "not enough free disk" in one_error(capsys) and not (out / "finetuned").exists()


def test_eval_tokens_beyond_the_text_are_clamped_and_recorded(tiny, tmp_path):
    out = tmp_path / "out"
    assert llm_main_v4.main(argv(tiny, out, "--steps", "eval", "--eval-tokens", "100000")) == 0
    proto = json.loads((out / "results.json").read_text())["protocol"]
    assert proto["eval_tokens"] == 100000 and proto["tokens_used"] == proto["tokens_available"] < 100000


def test_no_file_written_is_writable_by_others(tiny, tmp_path):
    out = tmp_path / "out"
    old = os.umask(0)  # even a permissive umask must not make results writable by others
    try:
        assert llm_main_v4.main(argv(tiny, out)) == 0
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and not [p for p in files if p.stat().st_mode & 0o022]
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (out / "checkpoints").iterdir())  # one rule, see README


def test_every_free_text_in_the_report_stays_text(tmp_path):
    """Model outputs, GCG suffixes, dataset names, file names and the model label reach the
    report escaped: no HTML, no image, no link comes out of them."""
    import llm_report

    evil = "<script>alert(1)</script> ![x](/etc/hostname) [y](javascript:z) `code` | cell"
    results = {"model": evil, "dataset": {"eval": {"source": evil, "chars": 1, "name": "x"}},
               "evaluation": {"base": {"perplexity": 2.0, "nll": 0.7, "bits_per_byte": 1.0, "tokens_scored": 8,
                                       "generations": {evil: evil}}},
               "perplexity": {"base": 2.0}}
    (tmp_path / "plots").mkdir()
    _, page = llm_report.write_report(results, tmp_path)
    html = page.read_text()
    body = html[html.index("<body>"):]
    assert "<script>alert" not in body and "<img" not in body
    # The only links are the report's own files (issue 32: each table's CSV and LaTeX), none from the text
    links = re.findall(r"<a [^>]*>", body)
    assert links and all(re.fullmatch(r'<a href="tables/[a-z0-9_]+\.(csv|tex)">', a) for a in links)
    assert body.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3  # shown as text, each time


def test_c4_and_ptb_follow_the_pruning_papers_loaders(monkeypatch):
    """C4: one train shard kept as documents for calibration (not joined), the first 1,100
    documents of one validation shard joined by spaces for evaluation, of which 256 windows are
    scored, the exact files recorded; PTB as get_ptb_new: the test split, sentences joined by
    spaces. (A stand-in for datasets.load_dataset records what is asked for: no download.)"""
    import datasets

    calls = []

    class Fake(dict):
        info = type("Info", (), {"version": "1.0.0"})()
        cache_files = [{"filename": "/cache/allenai___c4/default-abc/0.0.0/1588ec45/c4-train.arrow"}]

    def load_dataset(repo, config=None, data_files=None, split=None):
        calls.append((repo, config, data_files, split))
        column = "sentence" if repo == "ptb_text_only" else "text"
        return Fake({column: [f"{split}-doc{i}" for i in range(2000)]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(C, "hub_reachable", lambda: True)
    ev = D.load_corpus("c4", "test")
    assert calls[-1] == ("allenai/c4", None, {"test": "en/c4-validation.00000-of-00008.json.gz"}, "test")
    assert ev.text == " ".join(f"test-doc{i}" for i in range(1100)) and ev.fallback is None
    assert ev.source == ("allenai/c4/en/c4-validation.00000-of-00008.json.gz[:1100 documents] "
                         "(version 1.0.0, hub commit 1588ec45)")
    assert ev.eval_windows == 256 and ev.docs is None
    tr = D.load_corpus("c4", "train")
    assert calls[-1][2] == {"train": "en/c4-train.00000-of-01024.json.gz"}
    assert tr.text == "" and len(tr.docs) == 2000 and tr.docs[7] == "train-doc7" and tr.describe()["documents"] == 2000
    assert "get_c4" in tr.protocol and len(tr.sha256) == 64
    ptb = D.load_corpus("ptb", "test")
    assert calls[-1] == ("ptb_text_only", "penn_treebank", None, "test")  # get_ptb_new scores the test split
    assert ptb.text.startswith("test-doc0 test-doc1 ") and "get_ptb_new" in ptb.describe()["protocol"]
    assert D.load_corpus("ptb", "train").text.startswith("train-doc0 train-doc1 ")
    D.check_corpus_spec("c4")  # a known name, not a path


def test_gpu_default_calibration_is_c4_falling_back_to_wikitext_train(monkeypatch, tmp_path):
    """On GPU an unset --train-dataset is c4, as the pruning papers calibrate; where c4 cannot be
    had, WikiText-2's train split, and the text's record says why. CPU keeps WikiText-2."""
    def hub_text(name, split, offline):
        if name == "c4" and not available:
            raise OSError("not cached")
        return D.Corpus(name, split, f"{name} {split} text " * 50, f"{name}[{split}]")

    monkeypatch.setattr(D, "_hub_text", hub_text)
    available = True
    texts, described = D.load_texts(None, None, {"train"}, default_train="c4")
    assert texts["train"].name == "c4" and described["train"]["replaced"] is None
    available = False
    texts, described = D.load_texts(None, None, {"train"}, default_train="c4")
    assert texts["train"].text.startswith("wikitext2 train") and texts["train"].fallback is None
    assert described["train"]["replaced"].startswith("c4 unavailable (") and "WikiText-2 train" in described["train"][
        "replaced"]
    assert D.load_texts(None, None, {"train"})[0]["train"].name == "wikitext2"  # the CPU default
    seen = {}
    monkeypatch.setattr(D, "load_texts", lambda *a, **k: seen.update(k) or ({}, {}))
    cfg = K.PipelineConfig(run=K.RunConfig(budget="gpu", steps=("eval",)))
    llm_main_v4._check_before_loading(cfg, tmp_path)
    assert seen["default_train"] == "c4"


def test_blank_texts_are_refused_from_python_too():
    """Configs built in a notebook get the same check as flags: a blank prompt, target or name."""
    import llm_config as K

    for cfg, flag in ((K.AdversarialConfig(target=" "), "--attack-target"), (K.EvalConfig(prompts=("a", "")), "--prompt"),
                      (K.PruneConfig(super_weight_prompt=""), "--super-weight-prompt"),
                      (K.NoiseConfig(group=""), "--noise-group")):
        with pytest.raises(C.UserError, match=f"{flag} must not be empty"):
            cfg.validate()
    K.FinetuneConfig(base_model="").validate()  # blank by default: allowed



def _probe_many(path: str, n: int) -> int:
    failures = 0
    for _ in range(n):
        try:
            IO.ensure_writable_dir(path, "--output-dir")
        except C.UserError:
            failures += 1
    return failures


@pytest.mark.parametrize("workers", [2, 4])
def test_ranks_probing_one_folder_at_once_never_see_it_unwritable(tmp_path, workers):
    """Issue 33: torchrun's ranks each prove the output folder writable at the same moment; no
    rank's probe is another's, and none is left behind."""
    import multiprocessing as mp
    from concurrent.futures import ThreadPoolExecutor

    with mp.get_context("spawn").Pool(workers) as pool:
        assert pool.starmap(_probe_many, [(str(tmp_path), 300)] * workers) == [0] * workers
    with ThreadPoolExecutor(workers) as ex:  # threads of one process share its PID
        assert list(ex.map(_probe_many, [str(tmp_path)] * workers, [300] * workers)) == [0] * workers
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make", ["llama_100", "llama_256", "gpt2_200", "added_tokens"])
def test_a_tokenizer_with_more_ids_than_embedding_rows_is_one_error_line(tmp_path, sample_text, capsys, make):
    """Issue 33: never an IndexError deep in a step."""
    from conftest import make_gpt2, make_llama, make_tokenizer

    tok = make_tokenizer()
    if make == "added_tokens":
        model = make_llama()
        tok.add_tokens(["<extra_a>", "<extra_b>"])
    else:
        kind, vocab = make.split("_")
        model = (make_llama if kind == "llama" else make_gpt2)(vocab=int(vocab))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text(sample_text[:3000])
    from conftest import tiny_argv

    assert llm_main_v4.main(tiny_argv(tmp_path, tmp_path / "out", "--steps", "eval")) == 2
    err = one_error(capsys)
    assert f"has {len(tok)} token ids but the model's embedding has {model.get_input_embeddings().num_embeddings} " \
           "rows" in err


def _nan_weight_model(d: Path, sample_text: str, value: float):
    from conftest import make_llama, make_tokenizer

    m = make_llama()
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[3, 4] = value
    m.save_pretrained(d / "model")
    make_tokenizer().save_pretrained(d / "model")
    (d / "text.txt").write_text(sample_text[:3000])
    return d


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_through_analysis_and_report_only_never_crash_the_plots(tmp_path, sample_text, value):
    """Issue 33: the analysis step finishes, the plots it can draw are drawn (non-finite cells
    blank), and --report-only rebuilds them, with no traceback."""
    from conftest import tiny_argv

    d = _nan_weight_model(tmp_path, sample_text, value)
    out = tmp_path / "out"
    flags = ("--steps", "analysis", "--analysis-windows", "1", "--analysis-seq-len", "16", "--analysis-fisher-windows",
             "1", "--hessian-probes", "2", "--power-iters", "2", "--analysis-quant-bits", "4", "--analysis-eval-tokens", "64",
             "--analysis-eval-seq-len", "32")
    assert llm_main_v4.main(tiny_argv(d, out, *flags)) == 0
    assert (out / "report.md").is_file()
    assert llm_main_v4.main(["--report-only", "--output-dir", str(out)]) == 0
