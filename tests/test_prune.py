"""prune_model: exact sparsity, N:M structure, the published error ordering, protection."""
import copy

import pytest
import torch

import llm_common as C
import llm_model as LM
from llm_prune_model import PruneConfig, mask_from_scores, prune_model, sparsegpt_prune


def _calib(n=4, seq=24, vocab=257, seed=0):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _outlier_llama(seed=0):
    """Tiny Llama whose embeddings have a few massive channels, as real LLMs do."""
    from conftest import make_llama as tiny_llama

    m = tiny_llama(seed=seed, hidden=64)
    with torch.no_grad():
        m.model.embed_tokens.weight[:, :4] *= 20
        for layer in m.model.layers:
            layer.input_layernorm.weight.uniform_(0.2, 3.0)
    return m


def _linears(model):
    return {n: m for n, m in model.named_modules() if LM.is_linear(m) and "lm_head" not in n}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "taylor"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_exact_sparsity(arch, method, pattern, tiny_gpt2, tiny_llama):
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    head_before = model.get_output_embeddings().weight.clone()
    res = prune_model(model, None, _calib(), PruneConfig(method=method, sparsity=0.3, pattern=pattern,
                                                         progress=False))
    total = pruned = 0
    for name, mod in _linears(model).items():
        W = LM.weight_view(mod)
        zero = W == 0
        total, pruned = total + W.numel(), pruned + int(zero.sum())
        if pattern != "unstructured":
            n, m = map(int, pattern.split(":"))
            groups = zero.reshape(W.shape[0], -1, m).sum(-1)
            assert (groups == m - n).all(), name
        elif method in ("wanda", "taylor"):  # compared within rows: rows lose the same count, +-1
            assert int(zero.sum(1).max() - zero.sum(1).min()) <= 1, name
        if pattern == "unstructured":  # every matrix loses its share of the global count, to one weight
            assert abs(int(zero.sum()) - 0.3 * W.numel()) <= 1, name
    if pattern == "unstructured":  # exact globally, counted in weights
        assert pruned == round(0.3 * total) == res.target_weights == res.pruned_weights
    expected = 0.3 if pattern == "unstructured" else 1 - int(pattern[0]) / int(pattern[2])
    assert res.overall_sparsity == pytest.approx(expected, abs=0.02)  # int() per row of 32-64
    assert len(res.per_layer) == 2
    assert torch.equal(model.get_output_embeddings().weight, head_before)  # lm_head left alone


def _layer0_inputs(model, windows):
    """Dense inputs X [tokens, in] of every linear in block 0."""
    xs, hs = {}, []
    for name, mod in LM.block_linears(model.model.layers[0]).items():
        hs.append(mod.register_forward_hook(
            lambda m, a, o, name=name: xs.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None])
    for h in hs:
        h.remove()
    return {k: torch.cat(v) for k, v in xs.items()}


def test_reconstruction_error_ordering_sparsegpt_wanda_magnitude():
    dense = _outlier_llama()
    windows = _calib(n=8, seq=32)
    X = _layer0_inputs(dense, windows)
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        m = copy.deepcopy(dense)
        prune_model(m, None, windows, PruneConfig(method=method, sparsity=0.5, progress=False))
        errs[method] = sum(
            torch.linalg.norm(X[n] @ (LM.weight_view(dense.model.layers[0].get_submodule(n))
                                      - LM.weight_view(m.model.layers[0].get_submodule(n))).t()).item()
            for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"))
    assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"], errs


def test_wanda_mask_matches_hand_computation():
    dense = _outlier_llama()
    windows = _calib(n=3, seq=16)
    X = _layer0_inputs(dense, windows)
    W = dense.model.layers[0].self_attn.q_proj.weight.detach().clone()
    score = W.abs() * X["self_attn.q_proj"].norm(dim=0)[None, :]
    k = int(W.shape[1] * 0.5)
    expect = torch.zeros_like(W, dtype=torch.bool)
    for r in range(W.shape[0]):
        expect[r, score[r].argsort()[:k]] = True
    m = copy.deepcopy(dense)
    prune_model(m, None, windows, PruneConfig(method="wanda", sparsity=0.5, progress=False))
    assert torch.equal(m.model.layers[0].self_attn.q_proj.weight == 0, expect)


def test_sparsegpt_at_zero_sparsity_changes_nothing():
    torch.manual_seed(0)
    W = torch.randn(16, 32)
    X = torch.randn(200, 32)
    W2 = W.clone()
    sparsegpt_prune(W2, 2 * X.t() @ X / 200, 0.0)
    assert torch.allclose(W, W2, atol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "taylor"])
def test_protected_coordinates_survive(method, tiny_llama):
    model = tiny_llama()
    name = "model.layers.1.mlp.down_proj"
    W = model.get_submodule(name).weight.detach()
    # Protect the smallest-magnitude weights of two rows: the first to go otherwise.
    coords = [(r, int(W[r].abs().argmin())) for r in (0, 5)]
    prune_model(model, None, _calib(), PruneConfig(method=method, sparsity=0.6, progress=False,
                                                   protect=tuple((name, r, c) for r, c in coords)))
    for r, c in coords:
        assert model.get_submodule(name).weight[r, c] != 0


def test_mask_from_scores_keeps_high_scores():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.1, 0.4, 0.3, 0.2]])
    assert mask_from_scores(s, 0.5, None, per_row=True).tolist() == [[False, True, False, True],
                                                                             [True, False, False, True]]
    assert mask_from_scores(s, 0.5, None, per_row=False).tolist() == [[False, False, False, False],
                                                                              [True, True, True, True]]


@pytest.mark.parametrize("kw,msg", [(dict(sparsity=1.0), "--sparsity"), (dict(sparsity=-0.1), "--sparsity"),
                                    (dict(method="obc"), "--prune-method"), (dict(pattern="4:2"), "N < M"),
                                    (dict(pattern="dense"), "N:M")])
def test_bad_prune_config(kw, msg, tiny_llama):
    with pytest.raises(C.UserError, match=msg):
        prune_model(tiny_llama(), None, _calib(), PruneConfig(progress=False, **kw))


def test_block_inputs_carry_no_cache_and_protection_names_must_exist(tiny_llama, tok):
    from llm_prune_model import capture_block_inputs

    m = tiny_llama()
    _, kwargs = capture_block_inputs(m, torch.randint(0, 256, (2, 16)))
    assert not {"cache", "past_key_values", "past_key_value"} & set(kwargs) and kwargs["use_cache"] is False
    # A misspelled module name protects nothing silently no more: it is an error.
    with pytest.raises(C.UserError, match="not a linear module"):
        prune_model(m, tok, torch.randint(0, 256, (2, 16)),
                    PruneConfig(protect=(("model.layers.0.mlp.down_projj", 1, 2),), progress=False))
    with pytest.raises(C.UserError, match="outside"):
        prune_model(m, tok, torch.randint(0, 256, (2, 16)),
                    PruneConfig(protect=(("model.layers.0.mlp.down_proj", 10_000, 2),), progress=False))


# Every accepted combination of SparseGPT's flags with N:M patterns and block sizes (issue 22,
# row 12): it is refused before loading (validate) or after loading but before calibration
# (check_pattern_fits), or it runs to the requested sparsity. 1 calibration window of 8
# tokens gives a rank-deficient Hessian, so percdamp 0 needs the dampening retry.
SPARSEGPT_PATTERNS = ("unstructured", "1:2", "2:4", "4:8", "1:32", "3:6", "2:5", "2:1024")
SPARSEGPT_BLOCKS = (1, 3, 4, 7, 64, 65536)
SPARSEGPT_DAMPS = (0.0, 1e-12, 0.01, 10.0)


def test_every_sparsegpt_flag_combination_runs_or_is_refused_early(tiny_llama):
    from llm_prune_model import check_pattern_fits

    model = tiny_llama(hidden=32, layers=1)  # linear input widths 32 and 64
    calib = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    ran = refused = retried = 0
    for pattern in SPARSEGPT_PATTERNS:
        for blocksize in SPARSEGPT_BLOCKS:
            for percdamp in SPARSEGPT_DAMPS:
                cfg = PruneConfig(method="sparsegpt", pattern=pattern, blocksize=blocksize, percdamp=percdamp,
                                  calib_samples=1, calib_seq_len=8, progress=False)
                try:
                    cfg.validate()
                    check_pattern_fits(model, pattern)
                except C.UserError:
                    refused += 1
                    continue
                m = copy.deepcopy(model)
                res = prune_model(m, None, calib, cfg)
                n_m = None if pattern == "unstructured" else [int(x) for x in pattern.split(":")]
                target = 0.5 if n_m is None else 1 - n_m[0] / n_m[1]
                assert res.overall_sparsity == pytest.approx(target, abs=0.02), (pattern, blocksize, percdamp)
                assert all(torch.isfinite(p).all() for p in m.parameters())
                retried += bool(res.dampening_increased)
                assert all(v > percdamp for v in res.dampening_increased.values())
                ran += 1
    assert ran + refused == len(SPARSEGPT_PATTERNS) * len(SPARSEGPT_BLOCKS) * len(SPARSEGPT_DAMPS) == 192
    assert refused == 3 * len(SPARSEGPT_BLOCKS) * len(SPARSEGPT_DAMPS)  # M = 6, 5, 1024 do not divide 32
    assert retried > 0  # percdamp 0 on a rank-8 Hessian: retried with more dampening, and recorded


def test_a_singular_hessian_is_damped_more_and_recorded():
    from llm_prune_model import inverse_hessian_factor

    X = torch.randn(16, 3)
    H = 2 * X @ X.T / 3  # rank 3 of 16
    with pytest.raises(RuntimeError):
        torch.linalg.cholesky(H)
    Hinv, used = inverse_hessian_factor(H, 0.0)
    assert used > 0 and torch.isfinite(Hinv).all()
    with pytest.raises(C.UserError, match="not positive definite"):
        inverse_hessian_factor(torch.full((4, 4), float("nan")), 0.01)
