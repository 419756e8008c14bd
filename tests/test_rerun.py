"""Nothing lost on a rerun (issue 22, rows 1-5 and 11, 13): a subset of steps keeps the other
results and variants, the model folder can be the output folder, exports never delete a user's
file and are redone when removed, export failures end in one line, and the whole tree a run
writes follows one mode rule under umask 000."""
import errno
import json
import os
import shutil
from pathlib import Path

import pytest

import llm_io as IO
import llm_main_v4 as M
import llm_stats as S
from conftest import one_error, tiny_argv, without

KEPT = ("perplexity", "evaluation", "protocol", "variants", "prune", "noise")


@pytest.fixture(scope="module")
def tiny(tiny_run_dir):
    return tiny_run_dir


def cli(tiny, out, *extra):
    return tiny_argv(tiny, out, "--sweep-eps", "0.1", "--sweep-seeds", "1", "--sweep-tokens", "64", "--sweep-seq-len",
                     "32", "--noise-fisher-windows", "1", *extra)


def results(out) -> dict:
    return json.loads((Path(out) / "results.json").read_text())


def test_a_subset_of_steps_keeps_the_other_results_and_variants(tiny, tmp_path):
    """Row 1: --steps export, then --steps eval, into a finished prune,noise,eval run: every earlier
    section stays, and the later steps still see the pruned and noisy variants."""
    from tests.test_zeroshot import write_local_task

    out = tmp_path / "out"
    assert M.main(cli(tiny, out, "--steps", "prune,noise,eval")) == 0
    first = results(out)
    assert M.main(cli(tiny, out, "--steps", "export", "--export")) == 0
    second = results(out)
    for key in KEPT:
        assert second[key] == first[key], key
    assert set(second["export"]["variants"]) == {"base", "pruned", "noisy"}
    assert "pruned wanda" not in (out / "export" / "pruned" / "README.md").read_text()  # card has the metrics
    assert f"{first['perplexity']['pruned']:.4f}" in (out / "export" / "pruned" / "README.md").read_text()
    assert second["manifest"]["carried_over"] == ["prune", "noise", "eval"]
    assert set(second["steps_done"]) == {"prune", "noise", "eval", "export"}
    # Adding zero-shot later: it scores the earlier run's variants, and nothing else is dropped.
    pytest.importorskip("lm_eval")
    write_local_task(tmp_path / "tasks", n=6)
    assert M.main(cli(tiny, out, "--steps", "zeroshot", "--tasks", "tiny_qa", "--tasks-include",
                      str(tmp_path / "tasks"))) == 0
    third = results(out)
    assert set(third["zeroshot"]["tasks"]) == {"base", "pruned", "noisy"}
    # Zero-shot's tests join the run's multiple-testing family: the adjusted fields of the others move
    # (llm_stats.FAMILY_FIELDS); every number they were made from stays.
    for key in (*KEPT, "export"):
        assert without(third[key], set(S.FAMILY_FIELDS)) == without(second[key], set(S.FAMILY_FIELDS)), key
    report = (out / "report.md").read_text()
    assert "## Perplexity" in report and "## Pruning" in report and "## Exports" in report


def test_results_of_another_model_are_set_aside_not_mixed_in(tiny, tmp_path):
    from tests.conftest import make_llama, make_tokenizer

    other = tmp_path / "other"
    make_llama(seed=1).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    out = tmp_path / "out"
    assert M.main(cli(tiny, out, "--steps", "prune,eval")) == 0
    args = cli(tiny, out, "--steps", "export", "--export")
    args[1] = str(other)
    assert M.main(args) == 0
    res = results(out)
    assert "perplexity" not in res and "prune" not in res and set(res["export"]["variants"]) == {"base"}
    aside = list(out.glob("results.json.other-model-*"))
    assert len(aside) == 1 and "perplexity" in json.loads(aside[0].read_text())


def test_an_edited_task_file_named_by_path_reruns_zeroshot(tiny, tmp_path):
    """Row 2: a task named by its YAML path, its data in another folder: editing the data reruns."""
    pytest.importorskip("lm_eval")
    from tests.test_zeroshot import write_local_task

    write_local_task(tmp_path / "t", n=6)
    data = tmp_path / "data"
    data.mkdir()
    shutil.move(tmp_path / "t" / "tiny_qa.jsonl", data / "tiny_qa.jsonl")
    yml = tmp_path / "t" / "tiny_qa.yaml"
    yml.write_text(yml.read_text().replace(str(tmp_path / "t" / "tiny_qa.jsonl"), str(data / "tiny_qa.jsonl")))
    out = tmp_path / "out"
    args = cli(tiny, out, "--steps", "zeroshot", "--tasks", str(yml))
    assert M.main(args) == 0 and not results(out)["manifest"]["steps"]["zeroshot"]["skipped"]
    assert M.main(args) == 0 and results(out)["manifest"]["steps"]["zeroshot"]["skipped"]
    rows = (data / "tiny_qa.jsonl").read_text().splitlines()
    (data / "tiny_qa.jsonl").write_text("\n".join(rows[:3]) + "\n")
    assert M.main(args) == 0
    res = results(out)
    assert not res["manifest"]["steps"]["zeroshot"]["skipped"]
    assert res["zeroshot"]["tasks"]["base"]["tiny_qa"]["n"] == 3


def test_output_dir_equal_to_the_model_dir_resumes(tiny, tmp_path):
    """Row 3: results.json, the report and plots in the model folder do not change its identity."""
    model = tmp_path / "model"
    shutil.copytree(tiny / "model", model)
    args = cli(tiny, model, "--steps", "prune,eval")
    args[1] = str(model)
    assert M.main(args) == 0
    assert M.main(args) == 0
    res = results(model)
    assert all(s["skipped"] for k, s in res["manifest"]["steps"].items() if k != "load")
    assert {f[0] for f in res["model_identity"]["files"]} >= {"config.json", "model.safetensors"}
    assert not {"results.json", "report.md"} & {f[0] for f in res["model_identity"]["files"]}


def test_export_never_deletes_a_users_file(tiny, tmp_path, capsys):
    """Row 4: a file of the user's inside export/<variant> stops the export; nothing changes."""
    out = tmp_path / "out"
    assert M.main(cli(tiny, out, "--steps", "export", "--export")) == 0
    notes = out / "export" / "base" / "NOTES.txt"
    notes.write_text("mine")
    before = sorted(p.name for p in notes.parent.iterdir())
    assert M.main(cli(tiny, out, "--steps", "export", "--export", "--speed-seq-len", "64")) == 2  # reruns
    assert "NOTES.txt" in one_error(capsys)
    assert notes.read_text() == "mine" and sorted(p.name for p in notes.parent.iterdir()) == before
    assert not list(out.rglob(".llm-tmp-*"))


def test_a_removed_export_is_redone(tiny, tmp_path):
    """Row 5: the same command after rm -rf export/ writes it again instead of skipping."""
    out = tmp_path / "out"
    args = cli(tiny, out, "--steps", "prune,export", "--export")
    assert M.main(args) == 0
    shutil.rmtree(out / "export")
    assert M.main(args) == 0
    res = results(out)
    assert res["manifest"]["steps"]["prune"]["skipped"] and not res["manifest"]["steps"]["export"]["skipped"]
    for name, v in res["export"]["variants"].items():
        assert all((out / "export" / name / f).is_file() for f in v["files"])


@pytest.mark.parametrize("fault", ["read_only", "symlink", "safetensors_full_disk"])
def test_export_failures_give_one_line_and_keep_the_previous_state(tiny, tmp_path, capsys, monkeypatch, fault):
    """Row 11: a read-only export/, export/base linked to a folder, a full disk inside safetensors."""
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("x")
    if fault == "read_only":
        real = IO.tempfile.mkdtemp

        def mkdtemp(*a, dir=None, **kw):
            if Path(dir).name == "export":
                raise OSError(errno.EROFS, "Read-only file system")
            return real(*a, dir=dir, **kw)
        monkeypatch.setattr(IO.tempfile, "mkdtemp", mkdtemp)
    elif fault == "symlink":
        (out / "export").mkdir()
        (out / "export" / "base").symlink_to(elsewhere, target_is_directory=True)
    else:
        import safetensors
        import transformers.modeling_utils as mu

        def full(*a, **kw):
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device "
                                              "(os error 28)")
        monkeypatch.setattr(mu, "safe_save_file", full)
    assert M.main(cli(tiny, out, "--steps", "export", "--export")) == 2
    line = one_error(capsys)
    assert {"read_only": "Read-only", "symlink": "symbolic link", "safetensors_full_disk": "no space left"}[fault] in line
    assert [p.name for p in elsewhere.iterdir()] == ["keep.txt"]
    assert not list(out.rglob(".llm-tmp-*"))
    if fault == "symlink":
        assert (out / "export" / "base").is_symlink()


def test_every_path_written_under_umask_000_follows_one_rule(tiny, tmp_path):
    """Row 13: output dir, checkpoints/, plots/, export/, finetuned/, tensorboard/ and event files:
    nothing writable by group or others (files at most 0644, directories at most 0755)."""
    out = tmp_path / "out"
    old = os.umask(0)
    try:
        assert M.main(cli(tiny, out, "--steps", "finetune,prune,eval,export", "--export", "--ft-steps", "2",
                          "--ft-batch-size", "2", "--ft-seq-len", "32", "--log-to", "tensorboard")) == 0
        assert os.umask(0) == 0  # the caller's umask is restored
    finally:
        os.umask(old)
    paths = [out, *out.rglob("*")]
    kinds = {p.relative_to(out).parts[0] for p in paths[1:]}
    assert {"checkpoints", "plots", "export", "finetuned", "tensorboard", "results.json"} <= kinds
    assert list(out.rglob("events.out.tfevents.*"))
    loose = [f"{p} {oct(p.stat().st_mode)}" for p in paths if p.stat().st_mode & 0o022]
    assert not loose
    assert all(p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644) for p in paths)


# --------------------------------------------- issue 33: a step's results only beside the inputs that made them


def _eval_of_fresh_run(tiny, tmp_path, *flags) -> dict:
    fresh = tmp_path / f"fresh{len(list(tmp_path.glob('fresh*')))}"
    assert M.main(cli(tiny, fresh, "--steps", "prune,eval", *flags)) == 0
    return results(fresh)["perplexity"]


@pytest.mark.parametrize("change", [("--sparsity", "0.7"), ("--prune-method", "magnitude"),
                                    ("--sparsity-pattern", "2:4"), ("--seed", "9")])
def test_a_changed_prune_never_stands_beside_the_old_evaluation(tiny, tmp_path, caplog, change):
    """--steps prune with another setting into a folder evaluated before: the old perplexities are
    left out with a warning (never shown beside the new mask); --steps eval then measures the new
    mask, equal to a fresh run's."""
    out = tmp_path / "out"
    assert M.main(cli(tiny, out, "--steps", "prune,eval")) == 0
    assert M.main(cli(tiny, out, "--steps", "prune", *change)) == 0
    res = results(out)
    assert "perplexity" not in res and "eval" not in res["steps_done"] and res["manifest"]["carried_over"] == []
    assert "step eval: its recorded results were not made on what step(s) prune now hold" in caplog.text
    assert json.loads((out / "results.json.stale").read_text())["perplexity"]  # kept aside, not lost
    assert M.main(cli(tiny, out, "--steps", "eval", *change)) == 0
    assert results(out)["perplexity"] == _eval_of_fresh_run(tiny, tmp_path, *change)


def test_grids_rerun_into_one_folder_never_mix(tiny, tmp_path):
    """0.3,0.5 then 0.5,0.7 (prune only) then a single point then --steps eval: the perplexities
    are always those of the prune section now recorded, no more and no less."""
    out = tmp_path / "out"
    assert M.main(cli(tiny, out, "--steps", "prune,eval", "--sparsity", "0.3,0.5")) == 0
    assert M.main(cli(tiny, out, "--steps", "prune", "--sparsity", "0.5,0.7")) == 0
    assert "perplexity" not in results(out)
    assert M.main(cli(tiny, out, "--steps", "eval", "--sparsity", "0.5,0.7")) == 0
    assert set(results(out)["perplexity"]) == {"base", "pruned[wanda,0.5,unstructured]",
                                               "pruned[wanda,0.7,unstructured]"}
    assert M.main(cli(tiny, out, "--steps", "prune", "--sparsity", "0.6")) == 0
    assert M.main(cli(tiny, out, "--steps", "eval", "--sparsity", "0.6")) == 0
    assert results(out)["perplexity"] == _eval_of_fresh_run(tiny, tmp_path, "--sparsity", "0.6")


def test_a_step_run_alone_after_a_changed_prune_reruns(tiny, tmp_path):
    """--steps eval after the prune changed (the eval's own flags unchanged) measures again: its
    fingerprint chains on the prune it evaluates, not on the model alone."""
    out = tmp_path / "out"
    assert M.main(cli(tiny, out, "--steps", "prune,eval")) == 0
    assert M.main(cli(tiny, out, "--steps", "eval")) == 0
    assert results(out)["manifest"]["steps"]["eval"]["skipped"] is True
    assert M.main(cli(tiny, out, "--steps", "prune", "--sparsity", "0.3")) == 0
    assert M.main(cli(tiny, out, "--steps", "eval", "--sparsity", "0.3")) == 0
    assert results(out)["manifest"]["steps"]["eval"]["skipped"] is False


@pytest.mark.parametrize("subset", [("--steps", "export", "--export"), ("--steps", "noise"),
                                    ("--steps", "eval", "--prompt", "Other")])
def test_config_yaml_reproduces_results_json_after_a_subset_rerun(tiny, tmp_path, subset):
    """A subset run into a finished folder: config.yaml still names the carried-over steps with
    their settings, and --config on it into a fresh folder gives the same perplexities."""
    out = tmp_path / "out"
    assert M.main(cli(tiny, out, "--steps", "prune,eval", "--sparsity", "0.6", "--prune-method", "magnitude")) == 0
    assert M.main(cli(tiny, out, *subset)) == 0
    again = tmp_path / "again"
    assert M.main(["--config", str(out / "config.yaml"), "--output-dir", str(again), "--log-level", "WARNING"]) == 0
    a, b = results(out), results(again)
    assert set(a["steps_done"]) == set(b["steps_done"]) and a["prune"]["overall_sparsity"] == b["prune"]["overall_sparsity"]
    # A new noisy variant (issue 39): the old eval is kept; the fresh run measures the noisy one too.
    assert a["perplexity"] == {k: v for k, v in b["perplexity"].items() if k in a["perplexity"]}
    assert set(b["perplexity"]) - set(a["perplexity"]) == ({"noisy"} if subset[1] == "noise" else set())


def test_a_full_disk_on_a_rerun_keeps_results_and_config_as_they_were(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert M.main(cli(tiny, out, "--steps", "prune,eval")) == 0
    before = {n: (out / n).read_bytes() for n in ("results.json", "config.yaml")}
    real = Path.write_text

    def full(self, *a, **k):
        if self.name in ("results.json", "config.yaml"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    for change in (("--sparsity", "0.4"), ("--seq-len", "16")):
        assert M.main(cli(tiny, out, "--steps", "prune,eval", *change)) == 2
        assert "no space left" in one_error(capsys)
        assert {n: (out / n).read_bytes() for n in before} == before
        assert not list(out.glob(".llm-tmp-*"))
