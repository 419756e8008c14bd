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
