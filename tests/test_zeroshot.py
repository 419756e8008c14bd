"""Zero-shot accuracy through lm-evaluation-harness, on a local task written by the test."""
from __future__ import annotations

import json
import math
import random

import pytest
import scipy.stats
import torch

import llm_common as C
import llm_io as IO
import llm_variants as V
import llm_zeroshot as Z
from llm_config import ZeroShotConfig

lm_eval = pytest.importorskip("lm_eval")

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_local_task(folder, name="tiny_qa", n=24, seed=0):
    """A multiple-choice task in lm-eval's YAML format over a JSON-lines file: no download."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        choices = [str(a + b), str(a * b + 10), "seven" if a + b != 7 else "eight"]
        rng.shuffle(choices)
        rows.append({"question": f"What is {a} plus {b}?", "choices": choices, "label": choices.index(str(a + b))})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=folder / f"{name}.jsonl"))
    return rows


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    return d, write_local_task(d)


def hand_accuracy(model, tok, rows, per_question: bool = False):
    """acc and acc_norm counted by hand: the choice with the highest summed log-probability of
    ' ' + choice after the prompt wins (acc_norm divides by the choice's length in characters).
    With ``per_question`` also each question's acc (True/False), in the rows' order."""
    hits = norm_hits = 0
    each = []
    for r in rows:
        ctx = tok(f"Question: {r['question']}\nAnswer:").input_ids
        scores = []
        for c in r["choices"]:
            cont = tok(" " + c).input_ids
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = model(ids).logits[0, :-1].float().log_softmax(-1)
            targets = ids[0, 1:]
            scores.append(logp[torch.arange(len(targets)), targets][-len(cont):].sum().item())
        each.append(max(range(len(scores)), key=scores.__getitem__) == r["label"])
        hits += each[-1]
        norm = [s / len(c) for s, c in zip(scores, r["choices"])]
        norm_hits += max(range(len(norm)), key=norm.__getitem__) == r["label"]
    return (hits / len(rows), norm_hits / len(rows)) + ((each,) if per_question else ())


def test_zeroshot_equals_lm_evals_own_run_and_a_hand_count(local_task, tiny_llama, tok, tmp_path):
    """Every variant's number is lm-eval's: the pruned variant, swapped into the live model, scores
    exactly what lm-eval's own ``hf`` model class scores on that variant saved and reloaded; the
    base model's accuracy equals a count by hand. The live model and tokenizer are left as they were."""
    import llm_export as E

    folder, rows = local_task
    m = tiny_llama(seed=5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    w = m.model.layers[0].mlp.down_proj.weight
    pruned = {"model.layers.0.mlp.down_proj.weight": torch.where(w.abs() > w.abs().median(), w, 0)}
    cfg = ZeroShotConfig(enabled=True, tasks=("tiny_qa",), include_path=str(folder))
    res = Z.evaluate_zeroshot(m, tok, {"base": None, "pruned": pruned}, cfg, parents={"pruned": "base"})
    assert res.status == "ran" and res.unavailable == {}
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())

    acc, acc_norm, each = hand_accuracy(m, tok, rows, per_question=True)
    assert res.questions["base"]["tiny_qa"] == {"metric": "acc", "correct": "".join("01"[c] for c in each)}
    base = res.tasks["base"]["tiny_qa"]
    assert (base["acc"], base["acc_norm"], base["n"]) == (pytest.approx(acc, abs=1e-12), pytest.approx(acc_norm, abs=1e-12), len(rows))
    assert base["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (len(rows) - 1)))

    E.export_variants(m, tok, {"pruned": pruned}, tmp_path, E.ExportConfig(enabled=True))
    own = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(tmp_path / "pruned"), "device": "cpu",
                                                          "dtype": "float32"},
                                  tasks=["tiny_qa"], task_manager=lm_eval.tasks.TaskManager(include_path=str(folder)),
                                  log_samples=False)["results"]["tiny_qa"]
    ours = res.tasks["pruned"]["tiny_qa"]
    for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
        assert ours[k] == pytest.approx(own[f"{k},none"], abs=1e-12), k
    assert res.mean["pruned"]["acc"] == ours["acc"] and res.mean["pruned"]["tasks"] == 1

    # The paired test: the pruned variant's questions (a hand count on the pruned model) against the
    # base model's, through scipy's binomial test on the discordant ones.
    with V.applied_variant(m, pruned):
        _, _, each_pruned = hand_accuracy(m, tok, rows, per_question=True)
    a_only = sum(a and not b for a, b in zip(each, each_pruned))
    b_only = sum(b and not a for a, b in zip(each, each_pruned))
    t = res.paired["pruned"]["tiny_qa"]
    assert res.paired["pruned"]["parent"] == "base" and "base" not in res.paired
    assert (t["n"], t["a_only"], t["b_only"], t["metric"]) == (len(rows), a_only, b_only, "acc")
    p = scipy.stats.binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    assert t["p_value"] == pytest.approx(p, abs=1e-15) and t["significant"] == (p < 0.05)
    assert t["diff"] == pytest.approx(ours["acc"] - base["acc"], abs=1e-12)
    # The flip rate: the questions whose correctness changed, either way, counted over the per-question
    # outcomes, with Wilson's interval.
    flips = sum(a != b for a, b in zip(each, each_pruned))
    assert t["flip_rate"] == pytest.approx(flips / len(rows), abs=1e-15)
    assert t["flip_rate_ci95"] == pytest.approx(list(scipy.stats.binomtest(flips, len(rows)).proportion_ci(
        0.95, method="wilson")), abs=1e-12)
    assert res.paired["pruned"]["mean"] == {**{k: v for k, v in t.items() if k != "metric"}, "tasks": 1,
                                            "pooled": "the questions of every task, in one test"}


def test_paired_tests_on_planted_questions_pool_the_tasks_for_the_mean():
    """Two tasks: the variant agrees with its parent on all 100 questions of one, and is right on 30
    more of the other's 100 (none fewer). Per task: p = 1, not significant; p = binomtest(0, 30),
    significant. The mean pools the 200 questions: 30 discordant pairs of 200."""
    rng = random.Random(1)
    a1 = [rng.random() < 0.5 for _ in range(100)]
    a2 = [False] * 40 + [rng.random() < 0.5 for _ in range(60)]
    b2 = [True] * 30 + a2[30:]
    enc = lambda xs: {"metric": "acc", "correct": "".join("01"[x] for x in xs)}  # noqa: E731
    parent, variant = {"t1": enc(a1), "t2": enc(a2)}, {"t1": enc(a1), "t2": enc(b2)}
    out = Z.paired_tests(parent, variant, ["t1", "t2"], {})
    assert (out["t1"]["p_value"], out["t1"]["significant"], out["t1"]["a_only"] + out["t1"]["b_only"]) == (
        1.0, False, 0)
    assert (out["t2"]["a_only"], out["t2"]["b_only"]) == (0, 30)
    assert out["t2"]["p_value"] == scipy.stats.binomtest(0, 30, 0.5).pvalue and out["t2"]["significant"]
    assert (out["mean"]["n"], out["mean"]["b_only"], out["mean"]["tasks"]) == (200, 30, 2)
    assert out["mean"]["diff"] == pytest.approx(30 / 200)
    # A group row pairs over its subtasks; a task scored on other questions is not paired.
    grouped = Z.paired_tests(parent, variant, ["g"], {"g": ["t1", "t2"]})
    assert grouped["g"]["n"] == 200 and grouped["g"]["p_value"] == out["mean"]["p_value"]
    other = {**variant, "t2": {**variant["t2"], "doc_ids": list(range(1, 101))}}
    assert set(Z.paired_tests(parent, other, ["t1", "t2"], {})) == {"t1", "mean"}


def test_task_questions_read_lm_evals_samples_in_doc_id_order():
    samples = [{"doc_id": i, "filter": "none", "acc": float(v), "acc_norm": 0.0} for i, v in ((2, 1), (0, 0), (1, 1))]
    assert Z.task_questions(samples) == {"metric": "acc", "correct": "011"}
    gen = [{"doc_id": i, "filter": f, "exact_match": float(i == 1)} for f in ("strict", "flexible") for i in (3, 1)]
    assert Z.task_questions(gen) == {"metric": "exact_match", "correct": "10", "doc_ids": [1, 3]}
    assert Z.task_questions([{"doc_id": 0, "filter": "none", "bleu": 0.3}]) is None


def test_unavailable_tasks_are_named_and_the_rest_still_run(local_task, tiny_llama, tok, monkeypatch):
    """Offline, a hub task is reported unavailable in one line (fast: the cache only), as is an
    unknown name; the local task still runs, and the mean covers only what ran."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder, _ = local_task
    cfg = ZeroShotConfig(enabled=True, tasks=("tiny_qa", "boolq", "no_such_task"), include_path=str(folder))
    res = Z.evaluate_zeroshot(tiny_llama(), tok, {"base": None}, cfg)
    assert res.status == "ran" and set(res.unavailable) == {"boolq", "no_such_task"}
    assert all("\n" not in why and why for why in res.unavailable.values())
    assert res.protocol["offline"] is True and res.protocol["tasks"] == ["tiny_qa"]
    assert res.mean["base"]["tasks"] == 1


def test_a_task_named_by_its_yaml_path_is_scored_and_averaged_under_its_name(local_task, tiny_llama, tok):
    folder, _ = local_task
    res = Z.evaluate_zeroshot(tiny_llama(), tok, {"base": None},
                              ZeroShotConfig(tasks=(str(folder / "tiny_qa.yaml"),)))
    assert res.protocol["tasks"] == ["tiny_qa"] and res.protocol["specs"] == [str(folder / "tiny_qa.yaml")]
    assert res.mean["base"]["tasks"] == 1 and res.mean["base"]["acc"] == res.tasks["base"]["tiny_qa"]["acc"]


def test_an_edited_local_task_changes_the_steps_fingerprint(tmp_path):
    write_local_task(tmp_path)
    cfg = ZeroShotConfig(tasks=("tiny_qa",), include_path=str(tmp_path))
    before = cfg.fingerprint_dict()
    assert before == cfg.fingerprint_dict()
    with open(tmp_path / "tiny_qa.jsonl", "a") as f:
        f.write(json.dumps({"question": "q", "choices": ["a", "b"], "label": 0}) + "\n")
    assert cfg.fingerprint_dict() != before


def test_zeroshot_is_off_on_cpu_unless_asked(tiny_llama, tok):
    assert ZeroShotConfig().resolved(gpu=True).enabled is True
    assert ZeroShotConfig().resolved(gpu=False).enabled is False
    assert ZeroShotConfig(tasks=("rte",)).resolved(gpu=False).enabled is True  # naming tasks asks for them
    assert ZeroShotConfig(enabled=False, tasks=("rte",)).resolved(gpu=True).enabled is False
    res = Z.evaluate_zeroshot(tiny_llama(), tok, {"base": None})
    assert res.status == "off" and "--zeroshot on" in res.reason and res.tasks == {}


def test_mean_and_metric_names_follow_lm_eval_rows():
    row = {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25,
           "acc_norm_stderr,none": "N/A", "exact_match,strict-match": 1.0}
    assert Z.task_metrics(row) == {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.25, "acc_norm_stderr": None,
                                   "exact_match/strict-match": 1.0}
    m = Z._task_mean({"a": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.7, "acc_norm_stderr": 0.2},
                 "b": {"acc": 0.3, "acc_stderr": 0.1}})  # b has no acc_norm: its acc stands in
    assert m["acc"] == pytest.approx(0.4) and m["acc_norm"] == pytest.approx(0.5)
    assert m["acc_stderr"] == pytest.approx(math.sqrt(0.02) / 2) and m["acc_norm_stderr"] == pytest.approx(
        math.sqrt(0.05) / 2)


def test_pipeline_scores_exports_and_compares_every_variant(tiny_run_dir, pipeline_config, tmp_path):
    """The whole chain: the pipeline scores each variant in memory; lm-eval's own run on that
    variant's export gives the same accuracy; the report tables it against the parent; a second
    run (other sparsity) and this one compare in one table; a rerun skips both steps."""
    import llm_main_v4 as M

    folder = tmp_path / "tasks"
    write_local_task(folder)
    over = dict(zeroshot={"tasks": ("tiny_qa",), "include_path": str(folder)}, export={"enabled": True})
    runs = {}
    for name, sparsity in (("a", 0.5), ("b", 0.7)):
        cfg = pipeline_config(tiny_run_dir / "model", tiny_run_dir / "text.txt", tmp_path / name,
                              steps=("finetune", "prune", "noise", "eval", "zeroshot", "export"),
                              prune={"sparsity": sparsity}, **over)
        runs[name] = M.run_pipeline(cfg, argv=["--tasks", "tiny_qa", "--export"])
    res = runs["a"]
    zs = res["zeroshot"]
    assert zs["status"] == "ran" and set(zs["tasks"]) == {"base", "fine-tuned", "pruned", "noisy"}
    assert zs["parents"]["pruned"] == "fine-tuned" and zs["protocol"]["limit"] == 100  # the CPU budget
    manager = lm_eval.tasks.TaskManager(include_path=str(folder))
    for variant in ("pruned", "noisy"):
        own = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(tmp_path / "a" / "export" / variant),
                                                              "device": "cpu", "dtype": "float32"},
                                      tasks=["tiny_qa"], task_manager=manager, limit=100,
                                      log_samples=False)["results"]["tiny_qa"]
        assert zs["tasks"][variant]["tiny_qa"]["acc"] == pytest.approx(own["acc,none"], abs=1e-12), variant
    card = (tmp_path / "a" / "export" / "pruned" / "README.md").read_text()
    assert "wanda pruning, unstructured, sparsity 0.5" in card and f"{res['perplexity']['pruned']:.4f}" in card
    assert f"| tiny_qa | {100 * zs['tasks']['pruned']['tiny_qa']['acc']:.1f}% |" in card
    assert "--tasks tiny_qa --export" in card
    report = (tmp_path / "a" / "report.md").read_text()
    assert "## Zero-shot accuracy" in report and "change vs parent" in report and "## Exports" in report
    rows = [ln for ln in report.splitlines() if ln.startswith(("| base |", "| fine-tuned |", "| pruned |",
                                                              "| noisy |")) and "±" in ln]
    assert len(rows) == 4

    assert M.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--output-dir", str(tmp_path / "c")]) == 0
    compare = (tmp_path / "c" / "compare.md").read_text()
    from llm_results import fmt

    assert "Zero-shot mean accuracy" in compare and "wanda unstructured 0.5 |" in compare
    assert f"wanda unstructured {fmt(runs['b']['prune']['overall_sparsity'])} |" in compare
    a_pruned = f"{100 * zs['mean']['pruned']['acc']:.1f}"
    assert a_pruned in compare.split("Zero-shot mean accuracy")[1]

    again = M.run_pipeline(pipeline_config(tiny_run_dir / "model", tiny_run_dir / "text.txt", tmp_path / "a",
                                           steps=("finetune", "prune", "noise", "eval", "zeroshot", "export"),
                                           prune={"sparsity": 0.5}, **over), argv=["--tasks", "tiny_qa", "--export"])
    steps = again["manifest"]["steps"]
    assert steps["zeroshot"]["skipped"] and steps["export"]["skipped"]
    assert IO.to_strict_json(again["zeroshot"]) == IO.to_strict_json(zs)


def test_without_lm_eval_the_step_says_so_and_the_report_shows_it(tiny_llama, tok, monkeypatch):
    import dataclasses
    import sys

    import llm_report

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    res = Z.evaluate_zeroshot(tiny_llama(), tok, {"base": None}, ZeroShotConfig(tasks=("rte",)))
    assert res.status == "unavailable" and "pip install lm_eval" in res.reason and res.tasks == {}
    md = llm_report.report_markdown({"zeroshot": dataclasses.asdict(res)})
    assert "## Zero-shot accuracy" in md and "**Not measured:** lm-eval is not installed" in md


def test_task_yamls_that_run_python_need_trust_remote_code(tmp_path, tiny_run_dir, capsys):
    """Row 6: a local task with !function (Python beside it) is refused in one line before the
    model loads, in the folder or named by path, and accepted with --trust-remote-code."""
    import llm_main_v4 as M

    write_local_task(tmp_path / "t")
    yml = tmp_path / "t" / "tiny_qa.yaml"
    yml.write_text(yml.read_text() + "process_docs: !function evil.process_docs\n")
    (tmp_path / "t" / "evil.py").write_text("import pathlib\npathlib.Path(__file__).with_name('RAN').touch()\n"
                                            "def process_docs(ds):\n    return ds\n")
    base = ["--model", str(tiny_run_dir / "model"), "--dataset", str(tiny_run_dir / "text.txt"), "--steps",
            "zeroshot", "--output-dir", str(tmp_path / "out"), "--log-level", "WARNING"]
    for spec in (["--tasks", "tiny_qa", "--tasks-include", str(tmp_path / "t")], ["--tasks", str(yml)]):
        assert M.main(base + spec) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "!function" in err and "--trust-remote-code" in err
        assert not (tmp_path / "t" / "RAN").exists()
    files, code = __import__("llm_tasks").local_task_files((str(yml),), None)
    assert code == [str(yml)] and str(tmp_path / "t" / "evil.py") in files  # its code is fingerprinted too
    ok = ZeroShotConfig(tasks=(str(yml),), trust_remote_code=True)
    ok.validate()


@pytest.mark.parametrize("kind", ["dangling_data", "fifo_data", "dangling_yaml", "fifo_yaml"])
def test_non_regular_files_in_the_task_folder_never_hang(tmp_path, kind):
    """Row 10: a dangling link or a FIFO in --tasks-include: skipped when it is not a task YAML,
    one error line when it is; never a traceback from the fingerprint, never a hang."""
    import os

    write_local_task(tmp_path)
    name = tmp_path / ("notes.txt" if kind.endswith("data") else "other.yaml")
    if kind.startswith("dangling"):
        name.symlink_to(tmp_path / "gone")
    else:
        os.mkfifo(name)
    cfg = ZeroShotConfig(tasks=("tiny_qa",), include_path=str(tmp_path))
    if kind.endswith("data"):
        cfg.validate()
        assert "task_files_sha256" in cfg.fingerprint_dict()
    else:
        with pytest.raises(C.UserError, match="not a regular file"):
            cfg.validate()


def test_a_misspelled_task_stops_with_one_line(local_task, tiny_llama, tok):
    """lm-eval's own CLI stops on an unknown name; so do we when no requested task could run."""
    with pytest.raises(C.UserError, match="hellaswagg.*did you mean 'hellaswag'"):
        Z.evaluate_zeroshot(tiny_llama(), tok, {"base": None}, ZeroShotConfig(enabled=True, tasks=("hellaswagg",)))


# ------------------------------------------- issue 33: the check is made on what lm-eval's loader constructs

EVIL = "import pathlib\npathlib.Path(__file__).with_name('RAN').touch()\ndef process_docs(ds):\n    return ds\n"
SPELLINGS = {  # every one resolves to the tag !function in YAML's own grammar
    "verbatim": "process_docs: !<!function> evil.process_docs\n",
    "escaped_f": "process_docs: !%66unction evil.process_docs\n",
    "escaped_tail": "process_docs: !functio%6E evil.process_docs\n",
    "tag_handle": "%TAG !x! !fun\n---\nprocess_docs: !x!ction evil.process_docs\n",
    "secondary_handle": "%TAG !! !\n---\nprocess_docs: !!function evil.process_docs\n",
    "as_a_key": "? !function evil.process_docs\n: 1\n",
    "nested": "filter_list:\n  - filter:\n      - function: !function evil.process_docs\n",
    "flow": "{process_docs: !function evil.process_docs}\n",
}


def _evil_task(folder, body: str, encoding="utf-8"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evil.py").write_text(EVIL)
    path = folder / "evil_task.yaml"
    path.write_bytes(body.encode(encoding))
    return path


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_every_spelling_of_the_function_tag_is_caught_as_lm_eval_reads_it(tmp_path, name):
    """Each spelling really runs code under lm-eval's own loader (the fact checked first), and the
    check refuses it without importing anything."""
    from lm_eval.tasks._yaml_loader import load_yaml

    import llm_tasks as T

    path = _evil_task(tmp_path / "t", SPELLINGS[name])
    assert T.local_task_files((str(path),), None)[1] == [str(path)] and not (tmp_path / "t" / "RAN").exists()
    with pytest.raises(C.UserError, match="--trust-remote-code"):
        ZeroShotConfig(tasks=(str(path),)).validate()
    load_yaml(path, resolve_func=True)
    assert (tmp_path / "t" / "RAN").exists()  # lm-eval would have imported it


@pytest.mark.parametrize("how", ["utf-16", "utf-8-sig", "include", "include_list", "link", "linked_folder",
                                 "include_through_link"])
def test_a_function_tag_reached_through_another_file_or_encoding_is_caught(tmp_path, how):
    import os

    import llm_tasks as T

    body = "task: evil\nprocess_docs: !function evil.process_docs\n"
    real = tmp_path / "real"
    if how.startswith("utf"):
        top = _evil_task(real, body, encoding=how)
    elif how.startswith("include"):
        _evil_task(real, body)
        inc = "include: evil_task.yaml\n" if how != "include_list" else "include:\n  - evil_task.yaml\n"
        (real / "top.yaml").write_text(inc + "task: top\n")
        top = real / "top.yaml"
        if how == "include_through_link":  # the include is relative to the real file, as lm-eval resolves it
            (tmp_path / "links").mkdir()
            (tmp_path / "links" / "top.yaml").symlink_to(top)
            top = tmp_path / "links" / "top.yaml"
    else:
        _evil_task(real, body)
        (tmp_path / "links").mkdir()
        if how == "link":
            os.symlink(real / "evil_task.yaml", tmp_path / "links" / "x.yaml")
        else:
            os.symlink(real, tmp_path / "links" / "sub")
    spec = dict(tasks=("top",), include_path=str(tmp_path / "links")) if how in ("link", "linked_folder") else \
        dict(tasks=(str(top),))
    assert T.local_task_files(spec["tasks"], spec.get("include_path"))[1], how
    with pytest.raises(C.UserError, match="--trust-remote-code"):
        ZeroShotConfig(**spec).validate()
    assert not (real / "RAN").exists()


def test_a_linked_task_whose_data_comes_through_include_is_fingerprinted(tmp_path):
    """The task YAML is a link; its include and the data that names are found beside the real file
    (as lm-eval resolves them): editing either reruns the step."""
    real = tmp_path / "real"
    write_local_task(real)
    body = (real / "tiny_qa.yaml").read_text()
    (real / "_base.yaml").write_text(body.replace("task: tiny_qa\n", ""))
    (real / "tiny_qa.yaml").write_text("include: _base.yaml\ntask: tiny_qa\n")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "tiny_qa.yaml").symlink_to(real / "tiny_qa.yaml")
    for spec in (dict(tasks=("tiny_qa",), include_path=str(tmp_path / "links")),
                 dict(tasks=(str(tmp_path / "links" / "tiny_qa.yaml"),))):
        cfg = ZeroShotConfig(**spec)
        before = cfg.fingerprint_dict()
        with open(real / "tiny_qa.jsonl", "a") as f:
            f.write(json.dumps({"question": "q", "choices": ["a", "b"], "label": 0}) + "\n")
        after_data = cfg.fingerprint_dict()
        (real / "_base.yaml").write_text((real / "_base.yaml").read_text() + "# edited\n")
        assert len({json.dumps(d, sort_keys=True) for d in (before, after_data, cfg.fingerprint_dict())}) == 3


def test_truncated_requests_are_counted_per_task_and_warned(tmp_path, tiny_llama, tok, caplog):
    """A model of 64 positions and questions of 20 to 120 bytes (the test tokenizer is one token
    per byte): lm-eval cuts every request whose context + continuation exceed 64 + 1 tokens, and
    the count per task equals a count of those requests by hand; a task that fits counts 0."""
    rows = write_local_task(tmp_path, "long_qa", n=16, seed=3)
    rng = random.Random(4)
    for r in rows:
        r["question"] += " Think." * rng.randint(0, 14)
    (tmp_path / "long_qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    short = write_local_task(tmp_path, "short_qa", n=8, seed=5)
    limit = 64
    by_hand = sum(len(f"Question: {r['question']}\nAnswer:".encode()) + len(f" {c}".encode()) > limit + 1
                  for r in rows for c in r["choices"])
    assert 0 < by_hand < 3 * len(rows)  # some cut, some not: the count is not all or nothing
    assert all(len(f"Question: {r['question']}\nAnswer: {c}".encode()) <= limit + 1 for r in short for c in r["choices"])
    m = tiny_llama(seed=2, max_position_embeddings=limit)
    cfg = ZeroShotConfig(enabled=True, tasks=("long_qa", "short_qa"), include_path=str(tmp_path), limit=0)
    with caplog.at_level("WARNING", logger="llm.zeroshot"):
        res = Z.evaluate_zeroshot(m, tok, {"base": None, "half": {}}, cfg)
    assert res.truncated == {v: {"long_qa": by_hand, "short_qa": 0} for v in ("base", "half")}
    assert res.protocol["max_length"] == limit and res.protocol["truncated_requests"] == 2 * by_hand
    assert any(f"{by_hand} requests of long_qa" in r.getMessage() for r in caplog.records)


CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


@pytest.mark.parametrize("chat,multiturn,want", [(False, None, False), (True, None, True), (True, False, False)])
def test_the_chat_template_choice_reaches_lm_eval_and_is_recorded(local_task, tiny_llama, tok, monkeypatch, chat,
                                                                   multiturn, want):
    folder, rows = local_task
    seen = {}
    real = lm_eval.simple_evaluate

    def spy(**kw):
        out = real(**kw)
        seen.update(kw, prompts=[s["arguments"][0][0] for s in out["samples"]["tiny_qa"]])
        return out

    monkeypatch.setattr(lm_eval, "simple_evaluate", spy)
    chat_tok = __import__("copy").deepcopy(tok)  # the session's tokenizer stays as it is
    chat_tok.chat_template = CHAT
    cfg = ZeroShotConfig(enabled=True, tasks=("tiny_qa",), include_path=str(folder), apply_chat_template=chat,
                         fewshot_as_multiturn=multiturn, limit=4)
    res = Z.evaluate_zeroshot(tiny_llama(seed=1), chat_tok, {"base": None}, cfg)
    assert (seen["apply_chat_template"], seen["fewshot_as_multiturn"]) == (chat, want)
    assert (res.protocol["apply_chat_template"], res.protocol["fewshot_as_multiturn"]) == (chat, want)
    q = f"Question: {rows[0]['question']}\nAnswer:"
    assert seen["prompts"][0] == (f"<|user|>{q}\n<|assistant|>" if chat else q)


def test_fewshot_as_multiturn_without_the_chat_template_is_named_as_ignored():
    assert ZeroShotConfig(fewshot_as_multiturn=True).ignored() == [("--fewshot-as-multiturn",
                                                                    "only --apply-chat-template reads it")]
