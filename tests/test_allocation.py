"""Layer-wise sparsity allocation (issue 25): OWL against its published formula, computed here
independently from a plain forward pass; the global count is exact in every mode."""
import copy

import numpy as np
import pytest
import torch

import llm_common as C
import llm_model as LM
from llm_compress import bounded_allocation, exact_counts, split_count
from llm_prune_model import PruneConfig, prune_model


def _planted(seed=0, layers=3):
    """Tiny Llama whose block 1 sees massive activation channels (more Wanda outliers)."""
    from conftest import make_llama

    m = make_llama(seed=seed, layers=layers, hidden=64)
    with torch.no_grad():
        m.model.layers[1].input_layernorm.weight[:3] = 40.0
        m.model.layers[1].post_attention_layernorm.weight[:2] = 25.0
    return m


def _windows(n=4, seq=32):
    return torch.randint(0, 257, (n, seq), generator=torch.Generator().manual_seed(1))


def _owl_reference(model, windows, M, lam, sparsity):
    """OWL as its paper and code define it, from one forward pass of the dense model:
    per block, the fraction of |W| * ||X||_2 (all linears together) above M x its mean, in
    percent; ratios mapped to [0, 2 lam], centred, keep ratio = that + (1 - sparsity)."""
    sq, hooks = {}, []
    for name, mod in model.named_modules():
        if LM.is_linear(mod) and "lm_head" not in name:
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, name=name: sq.__setitem__(name, sq.get(name, 0) + a[0].reshape(-1, a[0].shape[-1])
                                                           .double().pow(2).sum(0))))
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None])
    for h in hooks:
        h.remove()
    ratios = []
    for i, layer in enumerate(model.model.layers):
        metric = torch.cat([(mod.weight.double().abs() * sq[f"model.layers.{i}.{rel}"].sqrt()[None, :]).flatten()
                            for rel, mod in LM.block_linears(layer).items()])
        ratios.append(float((metric > metric.mean() * M).sum()) / metric.numel() * 100)
    r = np.array(ratios)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    keep = r - np.mean(r) + (1 - sparsity)
    return ratios, 1 - keep


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_owl_matches_the_papers_formula_and_prunes_exactly_the_target(method):
    model, windows = _planted(), _windows()
    ratios, want = _owl_reference(copy.deepcopy(model), windows, M=5.0, lam=0.08, sparsity=0.6)
    assert ratios[1] > ratios[0] and ratios[1] > ratios[2]  # the planted outliers show
    res = prune_model(model, None, windows, PruneConfig(method=method, sparsity=0.6, allocation="owl",
                                                        owl_m=5.0, owl_lambda=0.08, progress=False))
    got = [res.allocation["target"][str(i)] for i in range(3)]
    assert np.allclose(np.array(res.allocation["scores"]) * 100, ratios, atol=1e-9)
    assert np.allclose(got, want, atol=1e-9)
    assert got[1] == min(got) and max(got) - min(got) == pytest.approx(0.16)
    lin = [m for n, m in model.named_modules() if LM.is_linear(m) and "lm_head" not in n]
    total = sum(m.weight.numel() for m in lin)
    zeros = sum(int((m.weight == 0).sum()) for m in lin)
    assert zeros == round(0.6 * total) == res.target_weights  # exact to the weight
    assert res.overall_sparsity == pytest.approx(0.6, abs=1 / total)
    for i in range(3):  # each layer at its allocation, to rounding and the exactness fix-up
        assert res.layer_sparsity[str(i)] == pytest.approx(got[i], abs=4 / (total / 3))


@pytest.mark.parametrize("kind", ["hessian", "fisher"])
def test_curvature_allocation_is_bounded_exact_and_keeps_the_curved_layer(kind):
    model, windows = _planted(seed=2), _windows()
    res = prune_model(model, None, windows, PruneConfig(method="wanda", sparsity=0.5, allocation=kind,
                                                        allocation_windows=2, allocation_probes=4, progress=False))
    got = [res.allocation["target"][str(i)] for i in range(3)]
    scores = res.allocation["scores"]
    assert max(got) - min(got) <= 0.16 + 1e-12  # within a span of 2 lambda
    if kind == "fisher" or len(set(scores)) > 1:  # (a random model's Hutchinson traces can all be <= 0: a tie)
        assert max(got) - min(got) == pytest.approx(0.16)
        assert got[int(np.argmax(scores))] == min(got) and got[int(np.argmin(scores))] == max(got)
    assert res.pruned_weights == res.target_weights == round(0.5 * res.total_weights)


def test_nm_patterns_refuse_non_uniform_allocation_before_loading():
    with pytest.raises(C.UserError, match="--sparsity-allocation owl needs --sparsity-pattern unstructured"):
        PruneConfig(pattern="2:4", allocation="owl").validate()
    import llm_main_v4

    assert llm_main_v4.main(["--sparsity-pattern", "2:4", "--sparsity-allocation", "fisher",
                             "--model", "/nonexistent"]) == 2


def test_counts_add_up_exactly():
    sizes = [1000, 1000, 3000, 7]
    for target in (0.3, 0.6, 0.7, 0.123457):
        s = bounded_allocation([0.1, 0.5, 0.2, 0.9], sizes, target, 0.08)
        if target > 0.2:  # (below 2 lambda, a layer's sparsity is clamped at 0 and the counts absorb it)
            assert sum(x * n for x, n in zip(s, sizes)) == pytest.approx(target * sum(sizes))
        k = exact_counts(s, sizes, target)
        assert sum(k) == round(target * sum(sizes)) and all(0 <= a < n for a, n in zip(k, sizes))
        parts = split_count(k[2], [100, 900, 2000])
        assert sum(parts) == k[2]


def test_mixed_precision_is_compared_with_uniform_at_its_own_bits(sample_text):
    """Issue 34 item 2: the uniform baseline of a 3.5-bit allocation is not uniform 3-bit at the same
    group (0.5 bit per weight less) but 3-bit at the group size that spends the same bits on grids."""
    import math

    import llm_data as D
    import llm_model as LM
    from conftest import make_llama, make_tokenizer
    from llm_quantize_model import QuantizeConfig, quantize_model

    tok, model = make_tokenizer(), make_llama(hidden=64)
    ids = D.tokenize_corpus(tok, sample_text[:4000])
    res = quantize_model(model, tok, ids, QuantizeConfig(method="rtn", bit_allocation="hessian", avg_bits=3.5,
                                                         group=64, calib_samples=2, calib_seq_len=32,
                                                         sensitivity_probes=2, progress=False))
    m = res.matched_uniform
    shapes = [tuple(LM.weight_view(x).shape) for x in LM.decoder_linears(model).values()]
    total = sum(o * i for o, i in shapes)

    def uniform_bits(b, g):
        return sum(o * i * b + o * math.ceil(i / g) * (16 + b) for o, i in shapes) / total

    assert m["wbits"] == 3 and m["mixed_bits"] == pytest.approx(res.avg_bits)  # nothing kept: the same count
    assert uniform_bits(3, m["group"]) <= m["mixed_bits"] < uniform_bits(3, m["group"] - 1)  # closest, not above
    assert m["group"] < 64 and res.objective[m["name"]] == m["objective"] < res.objective["uniform_3bit"]
