"""The command line and config files (issue 24 item 4, issue 23 item 4): budgets live on their
fields, a config file says what flags say, and a run's config.yaml reruns it exactly."""
import dataclasses
import json
import re

import pytest

import llm_cli as CLI
import llm_config as K
import llm_main_v4 as M
from conftest import one_error, tiny_argv
from llm_knobs import budget, knob


def _parse(*argv):
    return CLI.from_args(M.build_parser().parse_args(list(argv)))


def test_every_none_default_is_a_budget_or_says_what_it_means():
    """None means one thing per field: a (CPU, GPU) budget, or an "auto"/"none" that --help explains."""
    for cls in (K.RunConfig, *K.STEP_CONFIGS.values()):
        for f in dataclasses.fields(cls):
            if f.default is None:
                m = f.metadata
                assert m.get("budget") or m.get("shown") or re.search(r"\(auto: ", m["help"]), (cls.step, f.name)
            else:
                assert f.metadata.get("budget") is None, (cls.step, f.name)


def test_a_budget_is_declared_on_its_field_and_resolved_from_it():
    @dataclasses.dataclass
    class Demo(K.StepConfig):
        step = "demo"
        windows: int = budget(3, 30, "windows")
        plain: int = knob(1, "not a budget")

    assert (Demo().resolved(False).windows, Demo().resolved(True).windows) == (3, 30)
    assert Demo(windows=7).resolved(True).windows == 7  # a value given is never replaced
    with pytest.raises(TypeError):
        knob(5, "a budget with a default is a contradiction", budget=(1, 2))


def test_config_yaml_round_trips_every_field(tmp_path):
    cfg = _parse("--sparsity", "0.6", "--prune-method", "sparsegpt", "--protect-super-weights", "model.layers.1.mlp:7:5",
                 "--sweep-eps", "0.1,0.3", "--prompt", "one", "--prompt", "two", "--max-memory", "0=20GiB,cpu=64GiB",
                 "--noise-map", "off", "--steps", "prune,eval", "--seed", "3")
    path = tmp_path / "config.yaml"
    CLI.write_config(cfg, path)
    back = _parse("--config", str(path))
    assert back == cfg
    assert back.prune.protect == (("model.layers.1.mlp", 7, 5),) and back.noise.map is False


def test_flags_override_the_file_and_flat_flag_names_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prune-method: magnitude\nsparsity: 0.7\nnoise:\n  epsilon: 0.01\nrun:\n  seed: 5\n")
    cfg = _parse("--config", str(path), "--sparsity", "0.4")
    assert (cfg.prune.method, cfg.prune.sparsity, cfg.noise.epsilon, cfg.run.seed) == ("magnitude", 0.4, 0.01, 5)
    assert cfg.quantize.method == "none"  # untouched sections keep their defaults


@pytest.mark.parametrize("text, words", [
    ("prune:\n  sparsityy: 0.5\n", "prune.sparsityy is not a field"),
    ("nonsense: 1\n", "neither a step section nor a flag"),
    ("sparsity: [0.5\n", "not valid YAML"),
    ("stride: 0\n", "--stride must be [1,1000000]"),
    ("seq-len: many\n", "--seq-len must be an integer"),
    ("- a list\n", "expected a mapping"),
    # switches that are neither on nor off (issue 33)
    ("no-fallback: maybe\n", "--no-fallback must be true or false"),
    ("eval: {kl: 2}\n", "--kl must be true or false"),
    ("eval: {kl: [true]}\n", "one value is expected, not a list"),
    ("zeroshot: 2\n", "--zeroshot must be on, off or auto, got '2'"),
    ("zeroshot: enable\n", "--zeroshot must be on, off or auto, got 'enable'"),
    ("noise: {map: -1}\n", "--noise-map must be on, off or auto"),
    ("ft-gradient-checkpointing: sometimes\n", "must be on, off or auto"),
    ("analysis: {per_block: yes please}\n", "--per-block must be on, off or auto"),
    # a field set twice in one file (issue 33)
    ("seed: 1\nrun:\n  seed: 2\n", "run.seed is set twice, by seed and by run.seed"),
    ("prune-method: wanda\nprune_method: magnitude\n", "prune.method is set twice"),
    ("prune:\n  sparsity: 0.5\n  sparsity: 0.6\n", "'sparsity' is given twice"),
    ("eval: {kl: true}\neval: {seq_len: 8}\n", "'eval' is given twice"),
])
def test_a_bad_config_file_is_one_error_line(tiny_run_dir, tmp_path, capsys, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert M.main(tiny_argv(tiny_run_dir, tmp_path / "out", "--steps", "eval", "--config", str(path))) == 2
    assert words in one_error(capsys)


def test_missing_config_file_is_one_error_line(tiny_run_dir, tmp_path, capsys):
    assert M.main(tiny_argv(tiny_run_dir, tmp_path / "out", "--config", str(tmp_path / "nope.yaml"))) == 2
    assert "is not a file" in one_error(capsys)


def test_a_runs_config_yaml_reruns_it_exactly(tiny_run_dir, tmp_path):
    """--config DIR/config.yaml into a fresh folder recomputes every perplexity to the bit."""
    first = tmp_path / "first"
    assert M.main(tiny_argv(tiny_run_dir, first, "--steps", "prune,noise,eval", "--sparsity", "0.6",
                            "--sweep-eps", "0.1", "--sweep-seeds", "1", "--sweep-tokens", "64",
                            "--sweep-seq-len", "32", "--noise-fisher-windows", "1")) == 0
    again = tmp_path / "again"
    assert M.main(["--config", str(first / "config.yaml"), "--output-dir", str(again)]) == 0
    a, b = (json.loads((d / "results.json").read_text()) for d in (first, again))
    assert a["perplexity"] == b["perplexity"] and set(a["perplexity"]) == {"base", "pruned", "noisy"}
    assert a["prune"]["overall_sparsity"] == pytest.approx(0.6, abs=0.01)


# ------------------------------------------------------------------ issue 33: values read through the field types


def _from_file(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return _parse("--config", str(path))


@pytest.mark.parametrize("spelling, want", [
    ('"False"', False), ("'OFF'", False), ("No", False), ('"0"', False), ("0", False), ("fAlSe", False),
    ('"TRUE"', True), ("on", True), ("Yes", True), ("'1'", True)])
def test_a_switch_in_a_config_file_reads_as_written_quoted_or_not(tmp_path, spelling, want):
    cfg = _from_file(tmp_path, f"no-fallback: {spelling}\neval:\n  kl: {spelling}\n")
    assert cfg.run.no_fallback is want and cfg.eval.kl is want


@pytest.mark.parametrize("spelling, want", [("'on'", True), ("OFF", False), ("Auto", None), ('"no"', False),
                                            ("1", True)])
def test_a_tristate_in_a_config_file_reads_on_off_auto(tmp_path, spelling, want):
    assert _from_file(tmp_path, f"zeroshot: {spelling}\n").zeroshot.enabled is want


def test_a_switch_given_from_python_as_text_is_refused():
    with pytest.raises(K.UserError, match="--kl must be on or off"):
        K.EvalConfig(kl="false").validate()
    with pytest.raises(K.UserError, match="--zeroshot must be on, off or auto"):
        K.ZeroShotConfig(enabled="auto").validate()


@pytest.mark.parametrize("text, section, name, want", [
    ("prune: {pattern: 8:16}\n", "prune", "pattern", "8:16"),       # YAML 1.1: base-60 496
    ("sparsity-pattern: 1:2\n", "prune", "pattern", "1:2"),         # YAML 1.1: 62
    ("prompt: on\n", "eval", "prompts", ("on",)),                    # YAML 1.1: True
    ("super-weight-prompt: no\n", "analysis", "super_weight_prompt", "no"),  # YAML 1.1: False
    ("attack-target: 0755\n", "adversarial", "target", "0755"),    # YAML 1.1: octal 493
    ("seed: 010\n", "run", "seed", 10),                              # YAML 1.1: octal 8
])
def test_yaml_1_1_guesses_never_reach_a_field(tmp_path, section, name, text, want):
    assert getattr(getattr(_from_file(tmp_path, text), section), name) == want


@pytest.mark.parametrize("text, want", [
    ("prompt: Hi there\n", ("Hi there",)), ("prompt: [one, two]\n", ("one", "two")), ("prompt: 'x'\n", ("x",)),
    ("adversarial: {prompts: Why}\n", None)])
def test_one_text_for_a_repeatable_flag_is_one_item(tmp_path, text, want):
    cfg = _from_file(tmp_path, text)
    if want is None:
        assert cfg.adversarial.prompts == ("Why",) and cfg.eval.prompts == K.EvalConfig().prompts
    else:
        assert cfg.eval.prompts == want and cfg.adversarial.prompts == want


def test_the_same_value_twice_is_no_conflict(tmp_path):
    assert _from_file(tmp_path, "seed: 4\nrun: {seed: 4}\n").run.seed == 4


BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n" \
       "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nprompt: [*e,*e,*e,*e,*e,*e,*e]\n"


@pytest.mark.parametrize("text, words", [
    (BOMB, "anchors and aliases"),
    ("base: &b {sparsity: 0.5}\nprune: *b\n", "anchors and aliases"),
    ("prune:\n  <<: {sparsity: 0.5}\n", "prune.<< is not a field"),
    ("[" * 5000 + "]" * 5000 + "\n", "not valid YAML"),
    ("eval: {prompts: [[a, b]]}\n", "not nested lists"),
    ("sparsity: {a: 1}\n", "a value is expected, not a mapping"),
])
def test_hostile_yaml_is_one_error_line_in_a_second(tiny_run_dir, tmp_path, capsys, text, words):
    import time

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    t = time.perf_counter()
    assert M.main(tiny_argv(tiny_run_dir, tmp_path / "out", "--steps", "eval", "--config", str(path))) == 2
    assert words in one_error(capsys) and time.perf_counter() - t < 5
