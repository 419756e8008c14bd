"""Grids of variants in one run (issue 24 item 1): a comma list on the pruning knobs (and on
--epsilon) makes one variant per point, each evaluated, reported, plotted and compared like any
other; the model is loaded once and the calibration windows are drawn once."""
import json
import statistics

import pytest
import torch

import llm_data as D
import llm_main_v4 as M
import llm_model as LM
import llm_prune_model as P
import llm_variants as V
from conftest import counting, make_llama, make_tokenizer, one_error, tiny_argv
from llm_config import PruneConfig

GRID = ["--prune-method", "magnitude,wanda", "--sparsity", "0.3,0.5,0.7"]
NAMES = {f"pruned[{m},{s},unstructured]" for m in ("magnitude", "wanda") for s in ("0.3", "0.5", "0.7")}



@pytest.fixture(scope="module")
def grid_run(tiny_run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "out"
    counts: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        counting(mp, LM, "load_model", counts)
        counting(mp, D, "calibration_windows", counts)
        counting(mp, P, "capture_block_inputs", counts)
        assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "prune,eval", *GRID)) == 0
    return out, json.loads((out / "results.json").read_text()), counts


def test_a_grid_makes_one_variant_per_point_in_results_report_and_curves(grid_run):
    out, res, _ = grid_run
    assert set(res["perplexity"]) == {"base"} | NAMES
    assert all(res["variants"][n] == "base" for n in NAMES)
    recs = {r["name"]: r for r in res["prune"]["grid"]}
    assert set(recs) == NAMES
    for name, r in recs.items():
        assert r["overall_sparsity"] == pytest.approx(float(name.split(",")[1]), abs=0.01)
        assert (out / r["checkpoint"]).is_file() and r["format"] == "mask"
    md = (out / "report.md").read_text()
    assert all(n.replace("[", "\\[").replace("]", "\\]") in md for n in NAMES)
    assert (out / "plots" / "prune_curves.png").stat().st_size > 1000 and "prune_curves.png" in md


def test_a_grid_loads_the_model_once_and_draws_calibration_once(grid_run):
    _, _, counts = grid_run
    # Wanda's three points share block 0's inputs and statistics; magnitude needs no calibration.
    assert counts == {"load_model": 1, "calibration_windows": 1, "capture_block_inputs": 1}


def test_each_grid_point_is_what_prune_model_gives_alone(sample_text):
    """The shared work changes nothing: every point's weights equal a fresh prune_model call."""
    tok = make_tokenizer()
    ids = D.tokenize_corpus(tok, sample_text[:4000])
    grid = PruneConfig(method=("wanda", "sparsegpt"), sparsity=(0.4, 0.6), calib_samples=2, calib_seq_len=32,
                       progress=False)
    model = make_llama()
    got = {}
    for point, _ in P.prune_grid(model, tok, ids, grid):
        got[point.variant_name(True)] = {n: t.clone() for n, t in V.named_tensors(model).items()}
    assert len(got) == 4
    clean = make_llama()
    assert all(torch.equal(a, b) for a, b in zip(V.named_tensors(model).values(), V.named_tensors(clean).values()))
    for point in grid.grid_points():
        alone = make_llama()
        P.prune_model(alone, tok, ids, point)
        want = V.named_tensors(alone)
        assert all(torch.equal(got[point.variant_name(True)][n], want[n]) for n in want), point
    with pytest.raises(Exception, match="grid of 4"):
        P.prune_model(make_llama(), tok, ids, grid)


def test_a_grid_resumes_and_compares_like_any_variant(grid_run, tiny_run_dir, tmp_path, capsys):
    out, res, _ = grid_run
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "prune,eval", *GRID)) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["perplexity"] == res["perplexity"]
    assert again["manifest"]["steps"]["prune"]["skipped"] is True
    capsys.readouterr()
    assert M.main(["--compare", str(out), str(out), "--output-dir", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert all(n.replace("[", "\\[").replace("]", "\\]") in printed for n in NAMES)


def test_an_epsilon_list_makes_one_noisy_variant_each(tiny_run_dir, tmp_path):
    out = tmp_path / "out"
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "noise,eval", "--epsilon", "0.01,0.3", "--sweep-eps",
                            "0.1", "--sweep-seeds", "1", "--sweep-tokens", "64", "--sweep-seq-len", "32",
                            "--noise-fisher-windows", "1")) == 0
    res = json.loads((out / "results.json").read_text())
    small, large = res["perplexity"]["noisy[absolute,0.01]"], res["perplexity"]["noisy[absolute,0.3]"]
    assert set(res["perplexity"]) == {"base", "noisy[absolute,0.01]", "noisy[absolute,0.3]"}
    assert small < large  # more noise, a worse model (eps 0.3 absolute on a tiny random model)
    assert [r["recipe"]["epsilon"] for r in res["noise"]["grid"]] == [0.01, 0.3]


def test_calibration_seeds_draw_their_own_windows_and_name_their_variants(sample_text):
    """A different seed draws different windows, the same seed the same ones; a point pruned with
    calib_seed=K equals prune_model seeded K; names carry the seed only when several are given."""
    tok = make_tokenizer()
    ids = D.tokenize_corpus(tok, sample_text[:4000])
    draw = {s: D.calibration_windows(tok, ids, 4, 32, s) for s in (0, 1)}
    assert torch.equal(draw[0], D.calibration_windows(tok, ids, 4, 32, 0))
    assert not torch.equal(draw[0], draw[1])

    grid = PruneConfig(calib_seed=(0, 1), calib_samples=4, calib_seq_len=32, progress=False)
    points = grid.grid_points()
    assert [p.variant_name(True) for p in points] == ["pruned[wanda,0.5,unstructured,seed=0]",
                                                      "pruned[wanda,0.5,unstructured,seed=1]"]
    one = PruneConfig(method=("wanda", "magnitude"), calib_seed=1).grid_points()
    assert [p.variant_name(True) for p in one] == ["pruned[wanda,0.5,unstructured]",
                                                   "pruned[magnitude,0.5,unstructured]"]
    assert PruneConfig(calib_seed=1).variant_name(False) == "pruned"

    model, got = make_llama(), {}
    for point, res in P.prune_grid(model, tok, ids, grid):
        assert res.calibration["seed"] == point.calib_seed
        got[point.calib_seed] = {n: t.clone() for n, t in V.named_tensors(model).items()}
    assert any(not torch.equal(got[0][n], got[1][n]) for n in got[0])  # other windows, other masks
    for seed in (0, 1):
        alone = make_llama()
        P.prune_model(alone, tok, draw[seed], PruneConfig(calib_seed=seed, calib_samples=4, calib_seq_len=32,
                                                          progress=False))
        assert all(torch.equal(got[seed][n], t) for n, t in V.named_tensors(alone).items()), seed


def test_calib_seeds_on_the_command_line_give_one_variant_per_draw_and_the_spread(tiny_run_dir, tmp_path):
    out = tmp_path / "out"
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "prune,eval", "--calib-seeds", "3,4,5")) == 0
    res = json.loads((out / "results.json").read_text())
    names = [f"pruned[wanda,0.5,unstructured,seed={s}]" for s in (3, 4, 5)]
    assert set(res["perplexity"]) == {"base", *names}
    assert [r["calibration"]["seed"] for r in res["prune"]["grid"]] == [3, 4, 5]
    ppl = [res["perplexity"][n] for n in names]
    assert len(set(ppl)) == 3
    md = (out / "report.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| pruned\\[wanda,0.5,unstructured\\] | 3 |"))
    assert f"{statistics.fmean(ppl):.4g} ± {statistics.stdev(ppl):.4g}" in row
    lo, hi = res["evaluation"][names[0]]["perplexity_ci95"]
    assert f"seed=3: {ppl[0]:.4g} [{lo:.4g}, {hi:.4g}]" in row


def test_a_pattern_grid_runs_and_each_of_its_patterns_is_checked_before_calibration(tiny_run_dir, tmp_path, capsys):
    """--sparsity-pattern unstructured,2:4 (a documented grid) makes one variant per pattern; a grid
    holding a pattern the model's widths cannot take fails in one line, before any pruning."""
    import json

    import llm_main_v4 as M
    from conftest import one_error, tiny_argv

    out = tmp_path / "o"
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "prune", "--sparsity-pattern", "unstructured,2:4")) == 0
    grid = json.loads((out / "results.json").read_text())["prune"]["grid"]
    assert [g["name"] for g in grid] == ["pruned[wanda,0.5,unstructured]", "pruned[wanda,2:4]"]
    bad = tmp_path / "bad"
    assert M.main(tiny_argv(tiny_run_dir, bad, "--steps", "prune", "--sparsity-pattern", "2:4,3:7")) == 2
    assert "--sparsity-pattern 3:7" in one_error(capsys) and not (bad / "checkpoints").exists()


# ------------------------------------------------------------ issue 33: grid names unique by construction


@pytest.mark.parametrize("values", [(0.5000001, 0.5000002), (0.1 + 0.2, 0.3), (1 / 3, 0.3333333),
                                    (1e-07, 1.0000001e-07), (0.25, 0.2500000000000001)])
def test_distinct_grid_values_get_distinct_names_and_files(values):
    import llm_config as K

    for points in (K.PruneConfig(sparsity=values).grid_points(), K.NoiseConfig(epsilon=values).grid_points()):
        names = [p.variant_name(True) for p in points]
        assert len(names) == len(set(names)) == 2 and len({V.file_stem(n) for n in names}) == 2
        assert [float(n.split(",")[-2 if n.startswith("pruned") else -1].rstrip("]")) for n in names] == list(values)


def test_equal_values_spelled_twice_are_one_error_line(tiny_run_dir, tmp_path, capsys):
    for spelled in ("0.5,0.50", "0.5,.5", "0.5,5e-1"):
        assert M.main(tiny_argv(tiny_run_dir, tmp_path / "o", "--steps", "prune", "--sparsity", spelled)) == 2
        assert "--sparsity names a value twice" in one_error(capsys)


def test_two_close_sparsities_are_two_variants(tiny_run_dir, tmp_path):
    out = tmp_path / "out"
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "prune,eval", "--prune-method", "magnitude",
                            "--sparsity", "0.5000001,0.5000002")) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["perplexity"]) == {"base", "pruned[magnitude,0.5000001,unstructured]",
                                      "pruned[magnitude,0.5000002,unstructured]"}
    assert len(list((out / "checkpoints").glob("pruned*"))) == 2


@pytest.mark.parametrize("single", [("--prune-method", "wanda", "--sparsity", "0.5"),
                                    ("--prune-method", "magnitude", "--sparsity", "0.3")])
def test_a_grid_compared_with_a_single_run_shares_its_protocol_and_names_its_points(grid_run, tiny_run_dir,
                                                                                     tmp_path, capsys, single):
    """Issue 33: the same calibration gives no protocol warning, and the grid's pruning cell names
    every point (it was empty)."""
    out, res, _ = grid_run
    one = tmp_path / "single"
    assert M.main(tiny_argv(tiny_run_dir, one, "--steps", "prune,eval", *single)) == 0
    capsys.readouterr()
    assert M.main(["--compare", str(out), str(one), "--output-dir", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "warning: the runs differ" not in printed
    grid_line = next(ln for ln in printed.splitlines() if ln.startswith("| out |") and "unstructured" in ln)
    assert all(f"{m} unstructured" in grid_line for m in ("magnitude", "wanda")) and grid_line.count(";") == 5
