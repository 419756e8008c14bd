"""Hessian, Fisher, super weights and quantization against exact computations."""
import math

import pytest
import torch
from torch.func import functional_call

import llm_data as D
import llm_io as IO
import llm_model as LM
from conftest import make_super_weight_matter, plant_super_weight
import llm_integrated_analysis as A
import llm_plots
from llm_evaluate_models import EvalConfig


def _setup(seed=0):
    from conftest import make_llama as tiny_llama

    m = tiny_llama(seed=seed, hidden=16, layers=2)
    m.set_attn_implementation("eager")
    windows = torch.randint(0, 257, (1, 10), generator=torch.Generator().manual_seed(seed))
    names = ["model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
    return m, windows, names


def _exact_hessian(m, windows, names):
    params = {n: p.detach().clone() for n, p in m.named_parameters()}
    sizes = [params[n].numel() for n in names]

    def loss_of(flat):
        ps = dict(params)
        off = 0
        for n, s in zip(names, sizes):
            ps[n] = flat[off:off + s].view_as(params[n])
            off += s
        total = 0
        for w in windows:
            total = total + functional_call(m, ps, (), {"input_ids": w[None], "labels": w[None]}).loss
        return total / len(windows)

    flat = torch.cat([params[n].flatten() for n in names])
    return torch.autograd.functional.hessian(loss_of, flat), sizes


def test_hutchinson_matches_exact_trace_within_stderr():
    m, windows, names = _setup()
    H, sizes = _exact_hessian(m, windows, names)
    params = {n: dict(m.named_parameters())[n] for n in names}
    with LM.trainable_only(m, list(params.values())):
        tr = A.hutchinson_trace(A.lm_loss_fn(m, windows), params, max_probes=120, tol=0.0, progress=False)
    assert tr.probes == 120 and not tr.converged
    exact_total = float(torch.diagonal(H).sum())
    assert abs(tr.total - exact_total) < 3 * tr.total_stderr + 1e-6
    off = 0
    for n, s in zip(names, sizes):
        exact = float(torch.diagonal(H)[off:off + s].sum())
        assert abs(tr.trace[n] - exact) < 3.5 * tr.stderr[n] + 1e-6, n
        off += s
    assert tr.total_stderr < abs(exact_total)  # the estimate is informative, not noise


def test_hutchinson_stops_on_tolerance():
    m, windows, names = _setup()
    params = {n: dict(m.named_parameters())[n] for n in names}
    with LM.trainable_only(m, list(params.values())):
        tr = A.hutchinson_trace(A.lm_loss_fn(m, windows), params, max_probes=50, tol=0.5, progress=False)
    assert tr.converged and 3 <= tr.probes < 50


def test_adaptive_probing_stops_when_every_group_is_precise_and_reports_it():
    """With groups and a relative-standard-error target, probing stops once every group's
    summed trace is that precise; the reported per-probe samples give the stopping rule back."""
    m, windows, names = _setup()
    params = {n: dict(m.named_parameters())[n] for n in names}
    groups = {n: i for i, n in enumerate(names)}
    with LM.trainable_only(m, list(params.values())):
        loose = A.hutchinson_trace(A.lm_loss_fn(m, windows), params, max_probes=200, progress=False, groups=groups,
                                   rel_stderr=0.5)
        tight = A.hutchinson_trace(A.lm_loss_fn(m, windows), params, max_probes=8, progress=False, groups=groups,
                                   rel_stderr=1e-6)
    assert loose.converged and 3 <= loose.probes < 200
    rel = [A._rel_stderr(loose.samples[n]) for n in names]
    assert max(rel) <= 0.5  # independently recomputed from the samples
    before = [A._rel_stderr(loose.samples[n][:-1]) for n in names]
    assert loose.probes == 3 or max(before) > 0.5  # and it did not stop later than needed
    assert not tight.converged and tight.probes == 8


def test_interval_ranking_ties_overlapping_layers():
    means, half = [10.0, 9.0, 5.0, 4.9, 1.0], [0.6, 0.6, 0.2, 0.2, 5.0]
    # 10 and 9 overlap ([9.4, 10.6] and [8.4, 9.6]); 5 and 4.9 overlap; 1 +- 5 overlaps 4.9 +- 0.2.
    assert A.interval_ranking(means, half) == [[0, 1], [2, 3, 4]]
    assert A.interval_ranking([3.0, 2.0, 1.0], [0.1, 0.1, 0.1]) == [[0], [1], [2]]


def test_power_iteration_matches_eigvalsh():
    m, windows, names = _setup(seed=1)
    H, _ = _exact_hessian(m, windows, names[:1])
    evals = torch.linalg.eigvalsh(H.double())
    top = float(evals[evals.abs().argmax()])
    p = dict(m.named_parameters())[names[0]]
    with LM.trainable_only(m, [p]):
        eig, iters = A.top_eigenvalue(A.lm_loss_fn(m, windows), [p], iters=300, tol=1e-7, progress=False)
    assert eig == pytest.approx(top, rel=1e-2)


def test_fisher_equals_squared_per_sample_gradients(tiny_llama):
    m = tiny_llama()
    windows = torch.randint(0, 257, (3, 10), generator=torch.Generator().manual_seed(0))
    mod_name = "model.layers.0.mlp.up_proj"
    fisher = A.fisher_diagonal(m, windows, {mod_name: m.get_submodule(mod_name)}, progress=False)[mod_name]
    w = m.get_submodule(mod_name).weight
    sq = []
    for win in windows:
        g, = torch.autograd.grad(m(input_ids=win[None], labels=win[None]).loss, w)
        sq.append(g.pow(2))
    assert torch.allclose(fisher, torch.stack(sq).mean(0), rtol=1e-4, atol=1e-12)
    assert not w.requires_grad or w.grad is None


def test_planted_super_weight_is_found_at_exact_coordinates(tok, tiny_llama):
    m = tiny_llama(layers=4, hidden=32)
    layer, row, col = plant_super_weight(m, layer=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    found, profile = A.detect_super_weights(m, tok, "Apple Inc. is a worldwide tech company.", max_weights=3)
    assert (found[0].layer, found[0].row, found[0].col) == (layer, row, col)
    assert found[0].value == pytest.approx(40.0)
    assert found[0].module == f"model.layers.{layer}.mlp.down_proj"
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # zeroing undone
    assert len(profile["down_out_max"]) == 4 and profile["down_out_max"][layer] == max(profile["down_out_max"])
    ids = D.tokenize_corpus(tok, "the quick brown fox jumps over the lazy dog " * 8)
    A.verify_super_weights(m, tok, ids, found[:1], EvalConfig(seq_len=32))
    assert found[0].ppl_ratio is not None and found[0].ppl_ratio != 1.0


def test_no_spike_no_super_weight(tok, tiny_llama):
    found, _ = A.detect_super_weights(tiny_llama(layers=4), tok, "hello world", spike_factor=1e6)
    assert found == []


def test_rtn_quantization_levels_and_kept_weights():
    torch.manual_seed(0)
    W = torch.randn(8, 256)
    W[3, 17] = 25.0  # an outlier
    keep = torch.zeros_like(W, dtype=torch.bool)
    keep[3, 17] = True
    q = W.clone()
    A.quantize_rtn_(q, 3, group_size=128)
    for r in range(8):
        for g in range(2):
            assert len(torch.unique(q[r, g * 128:(g + 1) * 128])) <= 8
    qk = W.clone()
    A.quantize_rtn_(qk, 3, group_size=128, keep=keep)
    assert qk[3, 17] == 25.0
    # Keeping the outlier out of its group's range shrinks that group's error.
    err = lambda x: (x - W)[3, :128].pow(2).sum().item()
    assert err(qk) < 0.5 * err(q)
    q8 = W.clone()
    A.quantize_rtn_(q8, 8, group_size=128, keep=keep)
    assert (q8 - W).abs().max() < 0.05


def test_late_spike_is_a_candidate_but_rejected_by_ablation(tok, sample_text, tiny_llama):
    """Yu et al.: the super weight is where the spike first appears. A later, larger spike whose
    named weight does nothing when zeroed (the spike comes from another input channel) is
    listed as a rejected candidate, not as a super weight, and not protected in quantization."""
    m = tiny_llama(layers=6, hidden=32)
    ids = D.tokenize_corpus(tok, sample_text[:3000])
    plant_super_weight(m, layer=1, row=7, col=5)
    make_super_weight_matter(m, ids, row=7)
    with torch.no_grad():
        mlp = m.model.layers[5].mlp
        mlp.gate_proj.weight[11] = mlp.up_proj.weight[11] = 3.0   # the largest input channel ...
        mlp.down_proj.weight[:, 11] = 0.0                          # ... feeds no output
        mlp.gate_proj.weight[12] = mlp.up_proj.weight[12] = 2.0
        mlp.down_proj.weight[20, 12] = 200.0                       # the spike on output 20 comes from 12
    found, _ = A.detect_super_weights(m, tok, C_PROMPT, max_weights=3)
    assert [(f.layer, f.row, f.col) for f in found][:2] == [(1, 7, 5), (5, 20, 11)]
    assert found[1].output_abs > found[0].output_abs  # the late spike is the largest output
    # The toy's real super weight multiplies perplexity by ~1.6 (Llama-7B's: by 100s), so the
    # threshold sits between that and the no-op's exact 1.0.
    cfg = A.AnalysisConfig(calib_windows=1, calib_seq_len=16, fisher_windows=1, max_probes=2, power_iters=1,
                           quant_bits=(4,), quant_group=32, eval_seq_len=32, eval_tokens=128,
                           super_weight_min_ratio=1.2, progress=False)
    res = A.run_integrated_analysis(m, tok, ids, ids, cfg)
    assert [(s["layer"], s["row"], s["col"]) for s in res.super_weights] == [(1, 7, 5)]
    assert res.super_weights[0]["ppl_ratio"] > 1.2  # zeroing the real one hurts
    late = [s for s in res.super_weights_rejected if s["layer"] == 5]
    assert late and late[0]["ppl_ratio"] == pytest.approx(1.0)  # zeroing a weight that is already 0
    assert res.super_weight_layers == [1]


C_PROMPT = "Apple Inc. is a worldwide tech company."


def _hand_rtn(row: list, bits: int) -> list:
    """Asymmetric round-to-nearest of one group, written out scalar by scalar."""
    lo, hi = min(min(row), 0.0), max(max(row), 0.0)
    scale = max((hi - lo) / (2 ** bits - 1), 1e-10)
    zero = round(-lo / scale)
    return [(min(max(round(w / scale) + zero, 0), 2 ** bits - 1) - zero) * scale for w in row]


def test_rtn_groups_have_a_tail_group_like_a_hand_quantized_matrix():
    """576 = 4 x 128 + 64 (SmolLM2's width): 5 groups per row, the last 64 wide, each with its
    own range; a matrix quantized group by group by hand gives the same values."""
    assert A.rtn_groups(576, 128) == [(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]
    torch.manual_seed(1)
    W = torch.randn(3, 10, dtype=torch.float64)
    W[1, 9] = 8.0  # an outlier in the tail group only
    q = W.clone()
    A.quantize_rtn_(q, 3, group_size=4)
    want = [sum((_hand_rtn(W[r, a:b].tolist(), 3) for a, b in A.rtn_groups(10, 4)), []) for r in range(3)]
    assert torch.allclose(q, torch.tensor(want, dtype=torch.float64), atol=1e-12)
    # One group per row (what a width that is not a multiple used to get) is a different, coarser
    # quantization: the outlier's range would swallow the whole row.
    whole = torch.tensor(_hand_rtn(W[1].tolist(), 3), dtype=torch.float64)
    assert (whole - W[1])[:8].abs().sum() > 2 * (q[1] - W[1])[:8].abs().sum()


def test_spearman():
    assert A.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert A.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(A.spearman([1, 2], [1, 2]))


def test_integrated_analysis_end_to_end_leaves_model_unchanged(tok, sample_text, tmp_path, tiny_llama):
    m = tiny_llama(layers=3, hidden=32)
    plant_super_weight(m, layer=1)
    make_super_weight_matter(m, D.tokenize_corpus(tok, sample_text[:3000]))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ids = D.tokenize_corpus(tok, sample_text[:3000])
    cfg = A.AnalysisConfig(calib_windows=1, calib_seq_len=16, fisher_windows=2, max_probes=3, power_iters=3,
                           quant_group=32, eval_seq_len=32, eval_tokens=128, progress=False)
    res = A.run_integrated_analysis(m, tok, ids, ids, cfg)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m.config._attn_implementation == "sdpa"
    assert len(res.hessian_trace) == 21 and res.hutchinson_probes == 3
    assert (res.super_weights[0]["layer"], res.super_weights[0]["row"], res.super_weights[0]["col"]) == (1, 7, 5)
    assert {r["bits"] for r in res.quantization} == {4, 3} and len(res.quantization) == 6
    assert res.top_salient[0]["saliency"] >= res.top_salient[-1]["saliency"]
    d = IO.to_strict_json(res.__dict__)
    llm_plots.plot_heatmaps(d, tmp_path / "h.png")
    llm_plots.plot_activation_profile(d["activation_profile"], tmp_path / "a.png", [1])
    assert (tmp_path / "h.png").stat().st_size > 1000
    # Layer-wise sums are the module values added up by block, computed here independently.
    for i in range(3):
        want = sum(v for n, v in res.hessian_trace.items() if f"layers.{i}." in n)
        assert res.layer_totals["hessian_trace"][i] == pytest.approx(want)
    assert res.super_weight_layers == [1] and res.config["per_block"] is False
    for i in range(3):  # trace per weight of a layer: its modules' traces over their weight count
        names = [n for n in res.hessian_trace if f"layers.{i}." in n]
        numel = sum(m.get_submodule(n).weight.numel() for n in names)
        assert res.hessian_layer_per_param[i] == pytest.approx(sum(res.hessian_trace[n] for n in names) / numel)


def test_obd_saliency_from_hutchinson_diagonal(tok, sample_text, tiny_gpt2):
    m = tiny_gpt2()
    ids = D.tokenize_corpus(tok, sample_text[:2000])
    cfg = A.AnalysisConfig(calib_windows=1, calib_seq_len=16, fisher_windows=1, max_probes=2, power_iters=1,
                           saliency="hutchinson", quant_bits=(4,), quant_group=32, max_super_weights=1,
                           eval_seq_len=32, eval_tokens=64, progress=False)
    res = A.run_integrated_analysis(m, tok, ids, ids, cfg)
    # Conv1D weights are stored [in, out]: the diagonal is transposed to [out, in] like the Fisher.
    assert set(res.obd_saliency_sum) == set(res.fisher_sum)
    assert all(math.isfinite(v) for v in res.obd_saliency_sum.values())


def test_hessian_heatmap_shows_sign_and_marks_unreliable_cells(monkeypatch, tmp_path):
    """A negative Hutchinson trace keeps its sign on the plot, and a module whose standard
    error is above target is dotted (marked, its colour still shown, issue 32); the Fisher panel
    stays on a log scale."""
    figures = []
    monkeypatch.setattr(llm_plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    mods = {"l0.q": (0, "q"), "l0.v": (0, "v"), "l1.q": (1, "q"), "l1.v": (1, "v")}
    result = {"module_layer": {n: i for n, (i, _) in mods.items()}, "module_type": {n: t for n, (_, t) in mods.items()},
              "hessian_trace": {"l0.q": 5.0, "l0.v": -3.0, "l1.q": 40.0, "l1.v": 0.5},
              "fisher_sum": {n: 1.0 for n in mods},
              "hessian_module_reliable": {"l0.q": True, "l0.v": False, "l1.q": True, "l1.v": True}}
    llm_plots.plot_heatmaps(result, tmp_path / "h.png")
    ax = figures[0].axes[0]
    data = ax.images[0].get_array()
    assert data[0][1] == -3.0 and data[1][0] == 40.0  # signed values, not log10|x|
    marks = [(p.get_xy(), p.get_hatch(), p.get_fill()) for p in ax.patches]
    assert marks == [((0.5, -0.5), "..", False)] and not ax.texts  # layer 0, module v (columns sorted: q, v)
    assert figures[0].axes[1].images[0].norm.__class__.__name__ == "LogNorm"
