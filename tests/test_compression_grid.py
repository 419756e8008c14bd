"""Compression studies of any shape (issue 32 part 2): quantization grids, quantization stacked on
pruned variants with their zeros kept exactly zero, bits per weight as the papers count them, and
the Pareto front of quality against size."""
import json
import math

import pytest
import torch

import llm_compress as LC
import llm_data as D
import llm_main_v4 as M
import llm_model as LM
import llm_quantize_model as Q
import llm_results as R
import llm_variants as V
from conftest import counting, make_llama, make_tokenizer, one_error, tiny_argv
from llm_config import QuantizeConfig

PRUNE = ["--prune-method", "wanda,sparsegpt", "--sparsity-pattern", "unstructured,2:4"]
QUANT = ["--quant-method", "gptq", "--wbits", "4,3", "--quant-group", "16", "--quantize-from", "live,pruned[*]"]
PRUNED = ["pruned[wanda,0.5,unstructured]", "pruned[wanda,2:4]", "pruned[sparsegpt,0.5,unstructured]",
          "pruned[sparsegpt,2:4]"]
QUANTIZED = ["quantized[gptq,4,g16]", "quantized[gptq,3,g16]"]



@pytest.fixture(scope="module")
def study(tiny_run_dir, tmp_path_factory):
    """The issue's study on the tiny model: {Wanda, SparseGPT} x {0.5, 2:4}, each and the dense
    model quantized with GPTQ at 4 and 3 bits, in one run."""
    out = tmp_path_factory.mktemp("study") / "out"
    counts: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        counting(mp, LM, "load_model", counts)
        counting(mp, D, "calibration_windows", counts)
        counting(mp, Q, "capture_block_inputs", counts)
        assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "prune,quantize,eval", *PRUNE, *QUANT)) == 0
    return out, json.loads((out / "results.json").read_text()), counts


def test_the_study_makes_every_stacked_variant_with_one_load_and_one_draw_per_step(study):
    out, res, counts = study
    stacked = [f"{p}+{q}" for p in PRUNED for q in QUANTIZED]
    assert list(res["perplexity"]) == ["base", *PRUNED, *QUANTIZED, *stacked]
    assert all(res["variants"][f"{p}+{q}"] == p for p in PRUNED for q in QUANTIZED)
    # One model load; the prune step and the quantize step each draw their windows once (the quantize
    # step also its held-out windows for the output errors, once), and the quantize step runs
    # embeddings to block 0 once for all 10 variants (pruning leaves them as they are).
    assert counts == {"load_model": 1, "calibration_windows": 3, "capture_block_inputs": 1}
    assert {r["calibration"]["windows"] for r in res["quantize"]["grid"]} == {2}
    assert (out / "plots" / "pareto.png").stat().st_size > 1000


def test_each_stacked_variant_keeps_its_parents_zeros_exactly_zero(study, tiny_run_dir):
    out, res, _ = study
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_run_dir / "model", dtype=torch.float32)
    names = [n + ".weight" for n in LM.decoder_linears(model)]
    prune = {r["name"]: r for r in res["prune"]["grid"]}
    for rec in res["quantize"]["grid"]:
        parent = rec["parent"]
        if parent == "base":
            continue
        with V.applied_variant(model, V.variant_weights(out, prune[parent])):
            zeros = {n: V.named_tensors(model)[n] == 0 for n in names}
        q = LC.load_codes(out / rec["checkpoint"])
        for n in names:
            w = q[n].dequantize(torch.float32)
            assert zeros[n].float().mean() >= 0.49 and torch.all(w[zeros[n]] == 0), (rec["name"], n)
            assert (w != 0).float().mean() > 0.4  # the kept half is quantized, not zeroed
        assert rec["pruned_weights"] == sum(int(z.sum()) for z in zeros.values())


def test_stacked_bits_are_counted_as_the_sparsegpt_paper_counts_them(study):
    """50% + 4-bit is 2 bits of codes + a 1-bit mask + the grids: the SparseGPT paper's 'like 3-bit'."""
    _, res, _ = study
    bits = R.variant_bits(res)
    model = make_llama()
    shapes = [LM.weight_view(m).shape for m in LM.decoder_linears(model).values()]
    total = sum(o * i for o, i in shapes)
    for rec in res["quantize"]["grid"]:
        b, pruned = rec["wbits"], rec["pruned_weights"]
        grids = sum(o * math.ceil(i / 16) for o, i in shapes) * (16 + b)
        want = ((total - pruned) * b + grids + total * (pruned > 0)) / total
        assert rec["avg_bits"] == pytest.approx(want, rel=1e-12) and bits[rec["name"]] == rec["avg_bits"]
    assert bits["base"] == 16 and bits["pruned[wanda,2:4]"] == pytest.approx(16 * 0.5 + 1)


def test_grid_points_equal_quantize_model_alone_and_are_named(sample_text):
    tok = make_tokenizer()
    ids = D.tokenize_corpus(tok, sample_text[:4000])
    grid = QuantizeConfig(method=("rtn", "gptq"), wbits=(4, 3), group=16, calib_samples=2, calib_seq_len=32,
                          progress=False)
    assert [p.variant_name() for p in grid.grid_points()] == [
        "quantized[rtn,4,g16]", "quantized[rtn,3,g16]", "quantized[gptq,4,g16]", "quantized[gptq,3,g16]"]
    assert QuantizeConfig(method="gptq", bit_allocation=("uniform", "hessian"), avg_bits=3.5).grid_points()[1] \
        .variant_name() == "quantized[gptq,hessian3.5,g128]"
    assert QuantizeConfig(calib_seed=(3, 4)).grid_points()[1].variant_name() == "quantized[seed=4]"
    assert QuantizeConfig(method="gptq").variant_name() == "quantized"
    model, got = make_llama(), {}
    for point, _ in Q.quantize_grid(model, tok, ids, grid):
        got[point.variant_name()] = {n: t.clone() for n, t in V.named_tensors(model).items()}
    assert all(torch.equal(a, b) for a, b in zip(V.named_tensors(model).values(),
                                                 V.named_tensors(make_llama()).values()))  # restored
    for point in grid.grid_points():
        alone = make_llama()
        Q.quantize_model(alone, tok, ids, point)
        assert all(torch.equal(got[point.variant_name()][n], t) for n, t in V.named_tensors(alone).items()), point


def _obs_with_mask(W, H, bits, zeros, damp=0.01):
    """GPTQ on a fixed mask, transcribed column by column without lazy batches (SparseGPT's
    ``fasterprune`` with ``wbits``: the pruned weight is set to 0 before it is quantized, and every
    column's error is spread over all later columns), one grid per row from the masked weights."""
    W = W.double().clone()
    H = H.double() + damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    lo = W.masked_fill(zeros, 0).amin(1).clamp(max=0)
    hi = W.masked_fill(zeros, 0).amax(1).clamp(min=0)
    scale = (hi - lo) / (2 ** bits - 1)
    zero = torch.round(-lo / scale)
    Q_ = torch.zeros_like(W)
    for i in range(W.shape[1]):
        w = W[:, i].masked_fill(zeros[:, i], 0)
        q = scale * (torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1) - zero)
        Q_[:, i] = q
        err = (W[:, i] - q) / Hinv[i, i]
        W[:, i + 1:] -= err[:, None] * Hinv[i, i + 1:][None, :]
    return Q_


def test_gptq_on_a_pruned_mask_matches_the_column_by_column_obs_loop_and_holds_zeros():
    torch.manual_seed(0)
    W = torch.randn(8, 24, dtype=torch.float64)
    X = torch.randn(200, 24, dtype=torch.float64) @ torch.randn(24, 24, dtype=torch.float64)  # correlated inputs
    H = 2 * X.t() @ X / 200
    zeros = torch.rand(8, 24) < 0.5  # on a dense W: the pruned values' error is spread too, as SparseGPT's
    q = LC.gptq_quantize(W, H, 3, group_size=0, blocksize=5, zeros=zeros)
    got = q.dequantize(torch.float64)  # from the stored codes and float32 grids
    assert torch.all(got[zeros] == 0) and torch.all(q.dequantized[zeros] == 0)
    assert torch.allclose(q.dequantized, _obs_with_mask(W, H, 3, zeros), atol=1e-9)
    assert torch.allclose(got, q.dequantized, atol=1e-6)
    pruned = W.masked_fill(zeros, 0)  # the pipeline's case: a pruned matrix, its zeros held
    held = LC.gptq_quantize(pruned, H, 4, group_size=8, blocksize=5, zeros=zeros).dequantize(torch.float64)
    assert torch.all(held[zeros] == 0) and (held[~zeros] != 0).float().mean() > 0.8
    with pytest.raises(ValueError, match="integer zero-point"):
        LC.gptq_quantize(W, H, 3, zeros=zeros, zero_point="float")


def test_counted_bits_at_4_bit_g128_on_a_576_wide_matrix_by_hand():
    """SmolLM2's widths: 576 = 4 x 128 + a 64-wide tail group, 5 grids per row of fp16 scale + 4-bit zero."""
    W = torch.randn(64, 576)
    q = LC.rtn_quantize(W, 4, 128)
    parts = LC.counted_bits(q, 4, act_order=False)
    assert sum(parts.values()) / W.numel() == pytest.approx(4 + 5 * (16 + 4) / 576)
    assert sum(LC.counted_bits(q, 4, act_order=True).values()) / W.numel() == pytest.approx(
        4 + 5 * 20 / 576 + 32 / 64)  # an int32 group index per column, over 64 rows
    assert LC.counted_bits(q, 4, False, pruned=W.numel() // 2)["mask"] == W.numel()


def test_the_pareto_front_is_what_a_brute_force_says():
    res = {"variants": {"base": None, "a": "base", "b": "base", "c": "base", "d": "base", "e": "base",
                        "noisy": "base"},
           "perplexity": {"base": 10.0, "a": 12.0, "b": 11.0, "c": 20.0, "d": 13.0, "e": 30.0, "noisy": 9.0},
           "quantize": {"status": "ran", "grid": [{"name": n, "status": "ran", "avg_bits": b} for n, b in
                                                  (("a", 4.2), ("b", 4.2), ("c", 3.0), ("d", 5.0),
                                                   ("e", 2.9996))]},  # e: a few more zeros than c, same size
           "zeroshot": {"mean": {"base": {"acc": 0.6}, "a": {"acc": 0.5}, "c": {"acc": 0.55}}}}
    rows = R.pareto_rows(res)
    assert [r["variant"] for r in rows] == ["c", "e", "b", "a", "d", "base"]  # noisy: not compression
    for r in rows:
        dominated = any(round(o["bits"], 3) <= round(r["bits"], 3) and o["perplexity"] < r["perplexity"]
                        for o in rows if o is not r)
        assert r["front"] == (not dominated), r
    assert [r["variant"] for r in rows if r["front_zeroshot"]] == ["c", "base"]


def test_float_zero_point_refuses_pruned_sources_before_the_model_loads(tiny_run_dir, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.setattr(LM, "load_model", lambda *a, **k: pytest.fail("loaded"))
    assert M.main(tiny_argv(tiny_run_dir, tmp_path, "--steps", "prune,quantize", "--quant-method", "rtn",
                            "--quant-zero-point", "float", "--quantize-from", "pruned")) == 2
    assert "--quant-zero-point float" in one_error(capsys)
    assert M.main(tiny_argv(tiny_run_dir, tmp_path, "--quant-method", "none,rtn")) == 2
    assert "--quant-method none" in one_error(capsys)


def test_stacked_variants_export_as_pack_quantized_with_the_2_of_4_sidecar_and_their_zeros(tiny_run_dir, tmp_path):
    """Every quantized variant of a grid is exported in compressed-tensors' pack-quantized form; a
    quantized 2:4 variant says so in llm_variant.json (never in a sparsity_config, which vLLM
    refuses), and the library's decompressor gives its pruned zeros back as zeros."""
    import llm_export as E

    out = tmp_path / "out"
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "prune,quantize,export", "--sparsity-pattern", "2:4",
                            "--quant-method", "rtn", "--wbits", "4,8", "--quant-group", "16", "--quantize-from",
                            "live,pruned", "--export", "--export-quant-format", "compressed-tensors")) == 0
    res = json.loads((out / "results.json").read_text())
    quantized = [r["name"] for r in res["quantize"]["grid"]]
    assert quantized == ["quantized[rtn,4,g16]", "quantized[rtn,8,g16]", "pruned+quantized[rtn,4,g16]",
                         "pruned+quantized[rtn,8,g16]"]
    for name in quantized:
        folder = out / "export" / V.file_stem(name)
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert qc["format"] == "pack-quantized", name
        assert not qc.get("sparsity_config"), name
        side = json.loads((folder / "llm_variant.json").read_text())
        assert side["pattern"] == ("2:4" if "pruned" in name else "dense"), name
        assert res["export"]["variants"][name]["group_size_written"] == 16
    model = E.load_compressed_tensors(out / "export" / "pruned_quantized_rtn_4_g16")
    for m in LM.decoder_linears(model).values():
        w = LM.weight_view(m).reshape(-1, 4)
        assert torch.all((w == 0).sum(1) >= 2)  # 2 of every 4 input weights are exactly zero
