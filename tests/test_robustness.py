"""Weight noise: exact restore, calibrated std, exact bit flips, protection, tied weights, sweeps."""
import math

import pytest
import torch

import llm_common as C
import llm_data as D
import llm_model as LM
from llm_evaluate_models import EvalConfig
from llm_robustness_test import (NoiseConfig, apply_robustness_test, doubling_epsilon, noise_sweep, noisy_weights,
                                 perturb_, select_params, sensitivity_map, top_cells)
from llm_sensitivity import protect_top_fraction


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("mode,eps", [("absolute", 0.05), ("relative", 0.3), ("multiplicative", 0.3),
                                      ("bitflip", 1e-3)])
def test_restore_is_bit_exact_even_after_exception(tiny_model, mode, eps):
    before = _snapshot(tiny_model)
    with pytest.raises(RuntimeError):
        with noisy_weights(tiny_model, NoiseConfig(mode, eps, "all", seed=3)):
            changed = [k for k, v in tiny_model.state_dict().items() if not torch.equal(v, before[k])]
            assert changed
            raise RuntimeError("boom")
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k].view(torch.uint8) if before[k].is_floating_point() else before[k],
                           after[k].view(torch.uint8) if after[k].is_floating_point() else after[k]) for k in before)


@pytest.mark.parametrize("mode,expected", [("absolute", lambda w: 0.05), ("relative", lambda w: 0.05 * w.std()),
                                           ("multiplicative", lambda w: None)])
def test_noise_std_matches_epsilon(mode, expected):
    w = torch.randn(1000, 1000) * 0.7 + 0.1
    p = {"w": w.clone()}
    perturb_(p, NoiseConfig(mode, 0.05, seed=1))
    d = p["w"] - w
    if mode == "multiplicative":
        assert (d / w).std().item() == pytest.approx(0.05, rel=0.01)
    else:
        assert d.std().item() == pytest.approx(float(expected(w)), rel=0.01)
    assert abs(d.mean().item()) < 0.002


def test_noise_is_seeded():
    w = torch.randn(50, 50)
    a, b, c = {"w": w.clone()}, {"w": w.clone()}, {"w": w.clone()}
    perturb_(a, NoiseConfig("absolute", 0.1, seed=5))
    perturb_(b, NoiseConfig("absolute", 0.1, seed=5))
    perturb_(c, NoiseConfig("absolute", 0.1, seed=6))
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitflips_hit_requested_rate_and_only_flipped_bits(dtype):
    w = torch.randn(400, 500).to(dtype)
    p = {"w": w.clone()}
    rate = 1e-3
    res = perturb_(p, NoiseConfig("bitflip", rate, seed=2))
    iv = torch.int32 if dtype == torch.float32 else torch.int16
    x = torch.bitwise_xor(w.view(iv), p["w"].view(iv)).to(torch.int64) & ((1 << (32 if iv == torch.int32 else 16)) - 1)
    popcount = sum(int(((x >> b) & 1).sum()) for b in range(32))
    flips = sum(res.bitflips.values())
    assert popcount == flips
    n_bits = w.numel() * 16
    assert abs(flips - rate * n_bits) < 5 * math.sqrt(rate * n_bits)
    if dtype == torch.float32:  # only the bf16 half (the top 16 bits) is touched
        assert int((x & 0xFFFF).sum()) == 0
    sign_flips = int(((x >> (31 if iv == torch.int32 else 15)) & 1).sum())
    assert res.bitflips["sign"] == sign_flips
    exp_bits = 5 if dtype == torch.float16 else 8
    assert res.bitflips["exponent"] == pytest.approx(flips * exp_bits / 16, rel=0.25)


@pytest.mark.parametrize("mode", ["absolute", "bitflip"])
def test_protected_weights_untouched(mode):
    w = torch.randn(100, 100)
    keep = torch.rand(100, 100) < 0.1
    p = {"w": w.clone()}
    res = perturb_(p, NoiseConfig(mode, 0.5 if mode == "absolute" else 0.05, seed=0), protect={"w": keep})
    assert torch.equal(p["w"][keep], w[keep])
    assert not torch.equal(p["w"][~keep], w[~keep])
    assert res.n_protected == int(keep.sum())


def test_tied_weights_are_perturbed_once(tiny_llama):
    m = tiny_llama(tie_word_embeddings=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    before = m.model.embed_tokens.weight.clone()
    params = select_params(m, "all")
    assert sum(1 for p in params.values() if p is m.lm_head.weight) == 1
    with noisy_weights(m, NoiseConfig("absolute", 0.05, "all", seed=0)):
        d = m.model.embed_tokens.weight - before
        assert d.std().item() == pytest.approx(0.05, rel=0.05)  # sqrt(2) * 0.05 if applied twice
    assert torch.equal(m.model.embed_tokens.weight, before)


def test_parameter_groups(tiny_llama):
    m = tiny_llama()
    assert set(select_params(m, "module:down_proj")) == {f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)}
    assert all(n.startswith("model.layers.1.") for n in select_params(m, "layer:1"))
    assert set(select_params(m, "embeddings")) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert all("norm" in n for n in select_params(m, "norms"))
    assert len(select_params(m, "linears")) == 14
    for bad in ("layer:9", "module:conv", "weird"):
        with pytest.raises(C.UserError):
            select_params(m, bad)


@pytest.mark.parametrize("cfg,msg", [(NoiseConfig(epsilon=-0.1), "--epsilon"), (NoiseConfig(mode="uniform"), "--noise-mode"),
                                     (NoiseConfig(epsilon=float("nan")), "--epsilon"),
                                     (NoiseConfig(mode="bitflip", epsilon=2), "bit-error rate")])
def test_bad_noise_config(cfg, msg, tiny_llama):
    with pytest.raises(C.UserError, match=msg):
        apply_robustness_test(tiny_llama(), None, cfg)


def test_sweep_curve_and_protection(tok, sample_text, tiny_llama):
    m = tiny_llama()
    ids = D.tokenize_corpus(tok, sample_text[:400])
    cfg = EvalConfig(seq_len=64, eval_tokens=256)
    scores = {n: p.detach().abs() for n, p in select_params(m, "linears").items()}
    protect = protect_top_fraction(scores, 0.5)
    before = _snapshot(m)
    res = noise_sweep(m, tok, ids, [0.0, 0.5, 2.0], [0, 1], mode="relative", group="linears", eval_config=cfg,
                      protect=protect, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    s = res.summary["unprotected"]
    assert s["kl"]["0.0"]["mean"] == pytest.approx(0, abs=1e-9) and s["top1"]["0.0"]["mean"] == 1.0
    assert s["perplexity"]["0.0"]["mean"] == pytest.approx(res.clean["perplexity"])
    assert s["kl"]["2.0"]["mean"] > s["kl"]["0.5"]["mean"] > 0
    # Keeping the larger half of each weight matrix clean must reduce the damage.
    assert res.summary["protected"]["kl"]["2.0"]["mean"] < s["kl"]["2.0"]["mean"]
    assert res.saturation == 257 and len(res.points) == 12


def test_doubling_epsilon_interpolates():
    summ = {"0.01": {"mean": 10.0}, "0.1": {"mean": 40.0}}
    # log-linear between (0.01, 10) and (0.1, 40): 2x clean (20) at 10^(-2 + 0.5)
    assert doubling_epsilon(summ, 10.0) == pytest.approx(10 ** -1.5)
    assert doubling_epsilon({"0.1": {"mean": 11.0}}, 10.0) is None


def test_sensitivity_map_finds_the_fragile_cell(tok, sample_text, tiny_llama):
    m = tiny_llama()
    with torch.no_grad():  # make layer 1's v_proj dominate the output
        m.model.layers[1].self_attn.v_proj.weight.mul_(30)
    ids = D.tokenize_corpus(tok, sample_text[:200])
    smap = sensitivity_map(m, tok, ids, epsilon=0.5, eval_config=EvalConfig(seq_len=64, eval_tokens=128),
                           progress=False)
    assert len(smap["delta_nll"]) == 2 and len(smap["modules"]) == 7
    assert top_cells(smap, 1)[0]["layer"] == 1


def test_dense_bitflips_are_drawn_without_replacement():
    """At rate 0.5, drawing positions with replacement would flip only 1 - e^-0.5 = 39% of
    the bits; distinct positions flip 50%."""
    w = torch.randn(64, 64).to(torch.bfloat16)
    p = {"w": w.clone()}
    res = perturb_(p, NoiseConfig("bitflip", 0.5, seed=4))
    x = torch.bitwise_xor(w.view(torch.int16), p["w"].view(torch.int16)).to(torch.int64) & 0xFFFF
    flipped = sum(int(((x >> b) & 1).sum()) for b in range(16))
    n_bits = w.numel() * 16
    assert flipped == sum(res.bitflips.values())
    assert abs(flipped - 0.5 * n_bits) < 5 * math.sqrt(0.25 * n_bits)


def test_a_nan_seed_shows_up_in_the_sweep_summary():
    """Seeds [nan, 20, 30] do not average to 25: the mean is nan, the count says why, and the
    doubling eps treats a non-finite point as broken."""
    from llm_robustness_test import _per_eps_stats

    pts = [{"eps": 0.1, "perplexity": float("nan")}, {"eps": 0.1, "perplexity": 20.0},
           {"eps": 0.1, "perplexity": 30.0}, {"eps": 0.2, "perplexity": float("inf")},
           {"eps": 0.2, "perplexity": 30.0}]
    s = _per_eps_stats(pts, "perplexity")
    assert math.isnan(s["0.1"]["mean"]) and s["0.1"]["nonfinite"] == 1 and s["0.1"]["n"] == 3
    assert s["0.2"]["mean"] == float("inf") and s["0.2"]["nonfinite"] == 1
    assert doubling_epsilon(s, 20.0) == 0.1


def test_additive_noise_protection_ranks_by_fisher_times_sigma_squared(tok, sample_text, tiny_llama):
    """Relative noise has sigma = eps * std(W) whatever w is, so the expected loss increase
    0.5 F sigma^2 ranks weights by F * std(W)^2, not by OBD's w^2 F. The masks equal an
    independent top-k of that product over per-window squared gradients."""
    from llm_robustness_test import protection_masks
    from llm_config import NoiseConfig as NC

    m = tiny_llama(hidden=32)
    ids = D.tokenize_corpus(tok, sample_text[:3000])
    cfg = NC(sweep_mode="relative", protect_fraction=0.02, fisher_windows=3, fisher_seq_len=32, seed=1,
             progress=False)
    masks = protection_masks(m, None, ids, cfg, ())
    windows = D.sample_windows(ids, 3, 32, seed=1)
    lin = LM.decoder_linears(m)
    scores = {}
    for name, mod in lin.items():  # per-window gradients, by hand
        g2 = torch.zeros_like(mod.weight)
        for w in windows:
            m.zero_grad()
            with LM.trainable_only(m, [mod.weight]):
                m(input_ids=w[None], labels=w[None]).loss.backward()
                g2 += mod.weight.grad.pow(2) / len(windows)
        scores[name + ".weight"] = g2 * mod.weight.detach().std().pow(2)
    flat = torch.cat([s.flatten() for s in scores.values()])
    thresh = torch.topk(flat, int(flat.numel() * 0.02)).values[-1]
    for name, s in scores.items():
        assert torch.equal(masks[name], s >= thresh), name
    obd = protection_masks(m, None, ids, NC(**{**cfg.__dict__, "protect_score": "obd"}), ())
    assert any(not torch.equal(obd[n], masks[n]) for n in masks)  # a different ranking


def test_sweep_seeds_follow_the_run_seed(tok, sample_text, tiny_llama):
    ids = D.tokenize_corpus(tok, sample_text[:2000])
    from llm_config import NoiseConfig as NC

    def points(seed):
        cfg = NC(sweep_eps=(0.5,), sweep_seeds=2, sweep_tokens=128, sweep_seq_len=64, protect_fraction=0.0,
                 seed=seed, progress=False)
        with noisy_weights(m := tiny_llama(), NoiseConfig("absolute", 0.0)):
            return apply_robustness_test(m, tok, cfg, ids).sweep["points"]

    a, b = points(0), points(5)
    assert [p["seed"] for p in a] == [0, 1] and [p["seed"] for p in b] == [5, 6]
    assert a[0]["perplexity"] != b[0]["perplexity"]


@pytest.mark.parametrize("mode,memory", [("relative", "plenty"), ("absolute", "plenty"), ("multiplicative", "plenty"),
                                         ("relative", "none")])
def test_sweep_points_equal_one_noisy_model_at_a_time(tok, sample_text, tiny_llama, mode, memory, monkeypatch):
    """The sweep keeps one spare copy, the clean stds and (when memory allows) each seed's normal
    draw for all its points; each point must be what ``noisy_weights`` (a copy, a std and a draw
    per point) gives, bit for bit, protected or not, with the draws shared or not."""
    if memory == "none":
        monkeypatch.setattr(LM, "free_memory_bytes", lambda device: 0)
    m = tiny_llama()
    ids = D.tokenize_corpus(tok, sample_text[:400])
    cfg = EvalConfig(seq_len=64, eval_tokens=128)
    protect = protect_top_fraction({n: p.detach().abs() for n, p in select_params(m, "linears").items()}, 0.3)
    res = noise_sweep(m, tok, ids, [0.1, 0.4], [0, 5], mode=mode, group="linears", eval_config=cfg,
                      protect=protect, progress=False)
    from llm_perplexity import evaluate_model
    for p in res.points:
        with noisy_weights(m, NoiseConfig(mode, p["eps"], "linears", p["seed"]),
                           protect if p["curve"] == "protected" else None):
            assert evaluate_model(m, tok, ids, cfg).nll == p["nll"]


def test_a_sweep_point_that_fails_leaves_the_model_clean(tok, sample_text, tiny_llama, monkeypatch):
    import llm_robustness_test as R
    m = tiny_llama()
    ids = D.tokenize_corpus(tok, sample_text[:400])
    before = _snapshot(m)
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second point: the first was perturbed and restored already
            raise RuntimeError("out of memory")
        return real(*a, **k)
    real = R.evaluate_model
    monkeypatch.setattr(R, "evaluate_model", failing)
    with pytest.raises(RuntimeError):
        noise_sweep(m, tok, ids, [0.5], [0, 1], group="linears", eval_config=EvalConfig(seq_len=64, eval_tokens=128),
                    progress=False)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
