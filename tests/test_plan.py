"""The whole-run plan (llm_plan): the estimate per step, its pass counts against passes counted by
hooks while the steps run, the actual-vs-estimated record, and --dry-run."""
import json
import math

import pytest
import torch

import llm_main_v4 as M
import llm_plan as P
import llm_steps
from conftest import tiny_argv

STEPS = ("prune", "noise", "eval")


def cli(tiny, out, *extra):
    return tiny_argv(tiny, out, "--steps", ",".join(STEPS), "--sweep-eps", "0.1", "--sweep-seeds", "1",
                     "--sweep-tokens", "64", "--sweep-seq-len", "32", "--noise-fisher-windows", "1", *extra)


@pytest.fixture(scope="module")
def counted_run(tiny_run_dir, tmp_path_factory):
    """One tiny prune,noise,eval run with every step's passes counted by hooks (as bench_passes
    counts them): (results.json, {step: PassCounter's counts})."""
    out, counts = tmp_path_factory.mktemp("plan") / "out", {}
    original = llm_steps.hook

    def hooked(step, name):
        fn = original(step, name)
        if name != "pipeline_step":
            return fn

        def counted(run, config):
            counter = P.PassCounter(run.model)
            try:
                return fn(run, config)
            finally:
                counts[step] = counter.close()
        return counted

    llm_steps.hook = hooked
    try:
        assert M.main(cli(tiny_run_dir, out)) == 0
    finally:
        llm_steps.hook = original
    return json.loads((out / "results.json").read_text()), counts


def test_the_estimate_of_every_step_is_positive_and_finite_and_sits_beside_the_actual_time(counted_run):
    res, _ = counted_run
    est = res["manifest"]["estimate"]
    assert list(est["steps"]) == list(STEPS)
    for step, s in est["steps"].items():
        assert isinstance(s["estimated_s"], float) and 0 < s["estimated_s"] < math.inf, step
        assert s["actual_s"] == res["manifest"]["steps"][step]["wall_s"], step  # the step ran: its wall time
        assert s["units"] and "base" in s["variants"], step
    assert est["estimated_s"] == pytest.approx(sum(s["estimated_s"] for s in est["steps"].values()))
    assert 0 < est["timing"]["fwd_s_per_token"] <= est["timing"]["fwd_bwd_s_per_token"]


def test_planned_passes_are_the_passes_counted_by_hooks(counted_run):
    """The plan counts from the configs alone what PassCounter counts while the steps run: forward
    tokens within the bench's target ratio (1.25) either way, and backward only where it runs."""
    res, counts = counted_run
    est = res["manifest"]["estimate"]["steps"]
    for step in STEPS:
        planned, got = est[step]["fwd_tokens"], counts[step]["fwd_tokens"]
        assert got > 0 and 1 / 1.25 <= planned / got <= 1.25, (step, planned, got)
        assert (est[step]["bwd_tokens"] > 0) == (counts[step]["bwd"] > 0), step


def test_eval_passes_by_hand():
    """An independent count of the eval step's plan: 128 of 300 tokens in windows of 32 is 4 windows;
    each sample prompt of 5 tokens decodes 2 new tokens with the KV cache (5 + 1 tokens); 3 variants."""
    from llm_config import EvalConfig

    c = EvalConfig(seq_len=32, eval_tokens=128, max_new_tokens=2)
    got = P.planned_passes("eval", c, {"eval_tokens": 300, "measured": 3, "prompt_tokens": [5]})
    assert got["fwd_tokens"] == 3 * (4 * 32 + 5 + 1) and got["bwd_tokens"] == 0
    assert "4 windows of 32 tokens" in got["units"]


def test_timing_leaves_the_model_as_it_was(tiny_llama):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    t = P.time_passes(model, tokens=16, repeats=2)
    assert 0 < t["fwd_s_per_token"] < math.inf and 0 < t["fwd_bwd_s_per_token"] < math.inf
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and torch.equal(rng, torch.get_rng_state())


def test_dry_run_prints_the_plan_of_every_step_and_runs_none(tiny_run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert M.main(cli(tiny_run_dir, out, "--dry-run")) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    for step in STEPS:
        assert any(line.split()[:1] == [step] and "~" in line for line in lines), (step, printed)
    assert any(line.split()[:1] == ["total"] for line in lines) and "no step was run" in printed
    assert not out.exists() or not any(out.iterdir())  # no results.json, no lock, nothing


def test_the_plan_counts_the_variants_an_earlier_run_made(tiny_run_dir, tmp_path):
    """--steps eval into a folder that holds a pruned variant: the eval step's plan measures it too
    (the variants are re-attached before the plan is made)."""
    out = tmp_path / "out"
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "prune")) == 0
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "eval")) == 0
    planned = json.loads((out / "results.json").read_text())["manifest"]["estimate"]["steps"]["eval"]["variants"]
    assert planned == ["base", "pruned"]
