"""The pipeline is a thin layer: each step's function, called directly with the config that
results.json records, gives the same numbers; a changed config field or text reruns the step;
--report-only loads no step module."""
import dataclasses
import json
import re
import subprocess
import sys
import typing
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

import llm_config as K
import llm_data as D
import llm_io as IO
import llm_main_v4
import llm_resume
import llm_run
import llm_model as LM
import llm_stats as S
import llm_variants as V
from conftest import planted_model_dir, without

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"seconds", "tokens_per_s", "peak_memory_mb",
          "peak_rss_mib", "peak_cuda_allocated_mib", "loaded_existing", "resumed_from_step", "model_dir", "config",
          "checkpoint", "parent", "n_tensors", "batch_size", "format", "recipe"}


def numbers(obj):
    """A result as results.json holds it, minus timings, paths and the recorded config, and minus what
    the run's multiple-testing family sets in each test (``llm_stats.FAMILY_FIELDS``: a step called
    alone cannot know the rest of the run's tests; ``llm_matrix.finalize`` adds them)."""
    return without(IO.to_strict_json(obj), TIMING | set(S.FAMILY_FIELDS))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sample_text):
    return planted_model_dir(tmp_path_factory.mktemp("pipe"), sample_text[:4000])


@pytest.fixture(scope="module")
def pipeline(setup, pipeline_config):
    out = setup / "out"
    llm_main_v4.run_pipeline(pipeline_config(setup / "model", setup / "text.txt", out), argv=[])
    return out, json.loads((out / "results.json").read_text())


def test_each_step_function_alone_gives_the_pipelines_numbers(setup, pipeline, tmp_path):
    import llm_adversarial_test as ADV
    import llm_evaluate_models as E
    import llm_finetune as FT
    import llm_integrated_analysis as A
    import llm_prune_model as P
    import llm_robustness_test as R

    out, res = pipeline
    model, tok, _ = LM.load_model(LM.LoadConfig(model=str(setup / "model")))
    corpus = D.load_corpus(str(setup / "text.txt"), "test")
    ids = D.tokenize_corpus(tok, corpus)
    scramble = lambda: torch.manual_seed(987654)  # noqa: E731  no step may lean on the global RNG state

    scramble()
    cfg = K.FinetuneConfig.from_dict({**res["finetune"]["config"], "output_dir": str(tmp_path / "ft")})
    model, ft = FT.load_or_train_model(model, tok, ids, cfg)
    assert numbers(asdict(ft)) | {"manifest": None} == numbers(res["finetune"]) | {"manifest": None}

    names = [n + ".weight" for n in LM.decoder_linears(model)]
    scramble()
    with V.restored_on_exit(model, names):
        pr = P.prune_model(model, tok, ids, K.PruneConfig.from_dict(res["prune"]["config"]))
        saved = V.load_masks(out / res["prune"]["checkpoint"])  # Wanda only zeroes: a 1-bit mask
        assert res["prune"]["format"] == "mask" and set(saved) == set(pr.pruned_names)
        assert all(torch.equal(model.get_parameter(n) == 0, saved[n]) for n in pr.pruned_names)
    assert numbers({k: v for k, v in asdict(pr).items() if k != "pruned_names"}) == numbers(res["prune"]) | {
        "calibration": {k: v for k, v in res["prune"]["calibration"].items() if k not in ("source", "per_document")}}

    scramble()
    ncfg = K.NoiseConfig.from_dict(res["noise"]["config"])
    with V.restored_on_exit(model, list(R.select_params(model, ncfg.group))):
        nz = R.apply_robustness_test(model, tok, ncfg, ids, ids)
        noisy = {n: model.get_parameter(n).detach().clone() for n in nz.variant.tensors}
    # No copy was stored: the recorded recipe regenerates the very same weights.
    assert res["noise"]["checkpoint"] is None and res["noise"]["recipe"]["seed"] == ncfg.seed
    with R.noisy_weights(model, K.NoiseConfig(**res["noise"]["recipe"])):
        assert all(torch.equal(model.get_parameter(n), w) for n, w in noisy.items())
    variants = {"base": setup / "model", "fine-tuned": None,
                "pruned": lambda m: V.masked_weights(m, out / res["prune"]["checkpoint"]),
                "noisy": lambda m: R.noisy_weights(m, K.NoiseConfig(**res["noise"]["recipe"]))}
    d = numbers(asdict(nz))
    d["variant"].pop("tensors")
    # every variant's sweep, the noisy one included (the live model's own sweep serves its row)
    d["variants"] = numbers(R.sweep_variants(model, tok, ids, variants, res["variants"], ncfg, {"fine-tuned": nz.sweep}))
    assert d == numbers(res["noise"])

    scramble()
    ev = E.evaluate_variants(model, tok, ids, variants, K.EvalConfig.from_dict(res["protocol"]["config"]),
                             res["variants"])
    assert ev.perplexity == res["perplexity"]
    assert numbers({n: asdict(r) for n, r in ev.variants.items()}) == numbers(res["evaluation"])

    scramble()
    adv = ADV.test_adversarial_robustness(model, tok, ids, K.AdversarialConfig.from_dict(res["adversarial"]["config"]),
                                          variants=variants, parents=res["variants"])
    assert numbers(asdict(adv)) == numbers(res["adversarial"])

    scramble()
    an = A.run_integrated_analysis(model, tok, ids, ids, K.AnalysisConfig.from_dict(res["analysis"]["config"]),
                                   res["noise"]["map"], variants=variants, parents=res["variants"])
    assert numbers(asdict(an)) == numbers(res["analysis"])


def test_a_run_with_fine_tuning_reports_base_and_fine_tuned(pipeline):
    _, res = pipeline
    assert {"base", "fine-tuned"} <= set(res["perplexity"])
    assert res["variants"]["pruned"] == res["variants"]["noisy"] == "fine-tuned"
    assert res["evaluation"]["base"]["kl"] is None and res["evaluation"]["pruned"]["kl"] > 0


def _changed(value, hint):
    """A different value of the same type, for any field."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.5
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return value + value[:1] if value else ("x",)
    args = set(typing.get_args(hint)) - {type(None)}
    return {bool: True, int: 7, float: 0.5, str: "x", dict: {"0": "1GiB"}}.get(next(iter(args)), ("x",))


@pytest.mark.parametrize("step", K.ALL_STEPS)
def test_every_config_field_enters_its_steps_fingerprint(step, pipeline, setup, pipeline_config):
    out, _ = pipeline
    text = D.load_corpus(str(setup / "text.txt"), "test")
    run = llm_run.Run(cfg=pipeline_config(setup / "model", setup / "text.txt", out), out=out,
                          texts={"eval": text, "train": text})
    run.results.update(device="cpu", dtype="torch.float32", model_identity={"label": "m"})
    cls = K.STEP_CONFIGS[step]
    base = cls()
    fp0 = llm_resume.step_fingerprint(run, step, base, "prev")
    assert fp0 == llm_resume.step_fingerprint(run, step, cls(), "prev")
    assert fp0 != llm_resume.step_fingerprint(run, step, base, "other previous step")
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        other = dataclasses.replace(base, **{f.name: _changed(getattr(base, f.name), hints[f.name])})
        changed = llm_resume.step_fingerprint(run, step, other, "prev") != fp0
        # Only fields that cannot change a number (progress bars, log cadence, paths) may be left out.
        assert changed == f.metadata.get("results", True), f.name


def test_changed_text_behind_the_same_flags_reruns_the_step(setup, tmp_path, pipeline_config):
    text = tmp_path / "text.txt"
    text.write_text((setup / "text.txt").read_text())
    cfg = pipeline_config(setup / "model", text, tmp_path / "out", steps=("eval",))
    first = llm_main_v4.run_pipeline(cfg, argv=[])
    again = llm_main_v4.run_pipeline(cfg, argv=[])
    assert again["manifest"]["steps"]["eval"]["skipped"]
    text.write_text(text.read_text()[::-1])  # same path, same flags, other text
    third = llm_main_v4.run_pipeline(cfg, argv=[])
    assert not third["manifest"]["steps"]["eval"]["skipped"]
    assert third["perplexity"]["base"] != first["perplexity"]["base"]
    assert third["dataset"]["eval"]["sha256"] != first["dataset"]["eval"]["sha256"]


def test_report_only_imports_no_step_module(pipeline):
    out, _ = pipeline
    code = ("import sys, llm_main_v4; rc = llm_main_v4.main(['--report-only', '--output-dir', sys.argv[1]]); "
            "print(rc, sorted(m for m in sys.modules if m.startswith('llm_')))")
    got = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1].split(" ", 1)
    steps = {llm_main_v4.STEPS[s].module for s in llm_main_v4.STEPS}
    assert got[0] == "0" and not set(eval(got[1])) & steps
    sys.path.insert(0, str(ROOT / "bench"))
    import render_report

    # The super-weight table keeps its 8 columns: "|in|" and "|out|" are cells, not separators.
    rows = render_report.super_weight_table((out / "report.html").read_text())
    assert rows[0][5:7] == ["|in|", "|out|"] and len(rows) >= 2 and render_report.table_filled(rows)
    assert rows[1][:4] == ["1", "model.layers.1.mlp.down_proj", "7", "5"]  # the planted super weight


def test_every_clean_perplexity_names_its_token_set(pipeline):
    out, res = pipeline
    # Spread across the text, stratified and seeded: which windows, said in words.
    assert re.fullmatch(r"62 tokens in 2 of the text's \d+ windows, drawn at random \(seed \d+\), "
                        r"windows of 32 tokens", res["noise"]["sweep"]["clean"]["token_set"])
    assert re.fullmatch(r"124 tokens in 4 of the text's \d+ windows, drawn at random two in each of 2 equal "
                        r"stretches of it \(stratified, seed \d+\), windows of 32 tokens",
                        res["analysis"]["clean_token_set"])
    n_hold = res["finetune"]["heldout_token_set"]
    assert n_hold.endswith("tokens held out at the end of the training text, windows of 32")
    md = (out / "report.md").read_text()
    for label in (res["noise"]["sweep"]["clean"]["token_set"], res["analysis"]["clean_token_set"], n_hold):
        assert label in md
    assert res["evaluation"]["base"]["tokens_scored"] == 8 * 31  # 256 tokens, windows of 32


def test_variants_are_stored_as_a_mask_and_a_recipe_with_the_same_numbers(setup, tmp_path, pipeline_config):
    """Wanda's variant is a 1-bit mask and the noisy one a recipe (nothing stored); full copies
    (--save-variants) take up to 32x more disk for the pruned one and give the very same perplexities."""
    runs = {}
    for save in (False, True):
        cfg = pipeline_config(setup / "model", setup / "text.txt", tmp_path / str(save),
                              steps=("prune", "noise", "eval"), run={"save_variants": save},
                              prune={"protect": ()}, noise={"map": False, "sweep_eps": (0.5,), "sweep_seeds": 1})
        runs[save] = llm_main_v4.run_pipeline(cfg, argv=[])
    ckpt = tmp_path / "False" / "checkpoints"
    n_weights = sum(m.numel() for m in V.load_masks(ckpt / "pruned.safetensors").values())
    assert (ckpt / "pruned.safetensors").stat().st_size < n_weights / 8 + 64 * 1024
    assert not (ckpt / "noisy.safetensors").exists() and runs[False]["noise"]["recipe"]
    full = tmp_path / "True" / "checkpoints"
    small, large = (ckpt / "pruned.safetensors").stat().st_size, (full / "pruned.safetensors").stat().st_size
    assert large > 10 * small  # 32x less the headers, which weigh on a tiny model
    assert (full / "noisy.safetensors").is_file() and runs[True]["noise"]["format"] == "tensors"
    assert runs[False]["perplexity"] == runs[True]["perplexity"]
