"""Issue 40: compressed-tensors exports that transformers loads, and a card that says only what is true.

A grid of tiny exports (2:4 and unstructured pruning, 4 and 8 bits, symmetric and asymmetric,
float16 and float32 scales) of one 2-layer hidden-64 Llama at group 32: each loads with
transformers' dequantize path, and with plain ``from_pretrained`` exactly where the card says so,
to the in-run logits within the card's stated difference; no config holds a ``sparsity_config``;
the card's group size, dtypes and bits per parameter are those of the files.
"""
from __future__ import annotations

import functools
import json
import math
import re
import warnings

import pytest
import torch
from safetensors import safe_open

import llm_compress as LC
import llm_export as E
import llm_model as LM
import llm_variants as V

GROUP = 32


@pytest.fixture(scope="module")
def model64():
    from conftest import make_llama

    return make_llama(hidden=64)


def _mask(m, pattern: str) -> dict:
    """A 2:4 mask (the 2 smallest of every 4) or an unstructured one (half of each matrix, random)."""
    g, masks = torch.Generator().manual_seed(3), {}
    for n in LM.decoder_linears(m):
        w = m.get_submodule(n).weight.detach()
        if pattern == "2:4":
            groups = w.abs().reshape(-1, 4)
            drop = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.argsort(1)[:, :2], True)
        else:
            drop = torch.rand(w.shape, generator=g) < 0.5
        masks[n + ".weight"] = drop.reshape(w.shape)
    return masks


def _card_diffs(card: str) -> dict:
    """{(reader, dtype): max abs logit diff or None (does not load)} from the card's readers table."""
    out = {}
    for reader, dt, loads, diff in re.findall(r"^\| ([^|]+) \| (float32|bfloat16) \| (yes|\*\*no\*\*[^|]*) \| ([^|]*) \|",
                                              card, re.M):
        out[(reader, dt)] = float(diff) if loads == "yes" else None
    return out


def _load(path, dtype, dequantize: bool):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()


@pytest.mark.parametrize("scales", ["float16", "float32"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_every_compressed_export_loads_where_its_card_says(model64, tok, tmp_path, pattern, bits, symmetric, scales):
    m = model64
    masks = _mask(m, pattern)
    pruned = functools.partial(V.masked_weights, masks=masks)
    with V.applied_variant(m, pruned):  # quantize the pruned weights: 0 is on the integer grid, sym or not
        recs = {n + ".weight": LC.rtn_quantize(LM.weight_view(mod).detach(), bits, GROUP, scale_dtype=scales,
                                               symmetric=symmetric) for n, mod in LM.decoder_linears(m).items()}
    LC.save_codes(tmp_path / "run", "quantized", recs)
    ckpt = tmp_path / "run" / "checkpoints" / "quantized.safetensors"
    variant = functools.partial(LC.coded_weights, path=ckpt)
    bits_of = {n: bits for n in LM.decoder_linears(m)}
    res = E.export_variants(m, tok, {"quantized": variant}, tmp_path / "x",
                            E.ExportConfig(enabled=True, quant_format="compressed-tensors"),
                            facts={"quantized": {"parent": "pruned", "made_by": "rtn"}},
                            codes={"quantized": (ckpt, bits_of)})
    path, rec = tmp_path / "x" / "quantized", res.variants["quantized"]
    cfg = json.loads((path / "config.json").read_text())
    q = cfg["quantization_config"]
    assert "sparsity_config" not in q or not (q["sparsity_config"] or {}).get("targets")  # vLLM refuses any
    assert {(g["weights"]["group_size"], g["weights"]["symmetric"], g["weights"]["num_bits"])
            for g in q["config_groups"].values()} == {(GROUP, symmetric, bits)}
    side = json.loads((path / "llm_variant.json").read_text())
    assert side["pattern"] == pattern and side["parent"] == "pruned" and side["recipe"] == "rtn"
    assert side["sparsity"] >= 0.45

    # The card: read from the folder (the group size, each tensor's dtype, the bits per parameter) ...
    card = (path / "README.md").read_text()
    assert f"group size {GROUP}, 14 linears" in card and f"{bits}-bit {'symmetric' if symmetric else 'asymmetric'}" in card
    header = {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for k in f.keys():
            header.setdefault(k.rsplit(".", 1)[1], set()).add(f.get_slice(k).get_dtype())
    assert header["weight_scale"] == {"F16" if scales == "float16" else "F32"}
    assert f"**Scales:** {header['weight_scale'].pop()}" in card
    assert ("weight_zero_point" in header) is (not symmetric)
    assert "**Not quantized:** BF16" in card and cfg["dtype"] == "bfloat16"  # --export-dtype auto
    n_params = sum(p.numel() for p in m.parameters())
    file_bits = 8 * (path / "model.safetensors").stat().st_size / n_params
    assert f"**Bits per parameter:** {file_bits:.3f} for the whole checkpoint" in card
    assert f"{rec['stored_bits_per_weight']['decoder_linears']:.3f} per decoder-linear weight" in card
    assert ("2:4 (14 decoder linears" in card) is (pattern == "2:4")

    # ... and the readers it names load the folder to the in-run logits within its stated difference.
    stated = _card_diffs(card)
    assert len(stated) == 6 and stated[("transformers plain", "float32")] is None if not symmetric else True
    ids = torch.randint(0, 257, (2, E.READER_CHECK_TOKENS), generator=torch.Generator().manual_seed(0))
    with variant(m), torch.no_grad():
        want = m(ids).logits.float()
    for (reader, dt), diff in stated.items():
        dtype = getattr(torch, dt)
        if reader.startswith("llm-sensitivity"):
            loaded = E.load_compressed_tensors(path, dtype)
        elif reader == "transformers dequantize":
            assert diff is not None, (reader, dt)  # always loads
            loaded = _load(path, dtype, True)
        else:
            assert (diff is not None) is symmetric, (reader, dt)  # plain loads exactly where the card says
            if diff is None:
                with pytest.raises(RuntimeError, match="size mismatch|ignore_mismatched_sizes"):
                    _load(path, dtype, False)
                continue
            loaded = _load(path, dtype, False)
        with torch.no_grad():
            got = loaded(ids).logits.float()
        assert float((got - want).abs().max()) <= diff * (1 + 1e-3) + 1e-6, (reader, dt)
        assert diff < (0.05 if dt == "bfloat16" else 0.01)  # bf16 embeddings move logits a little, no more
    if not symmetric and bits == 8:
        assert "asymmetric 8-bit weights have no kernel below compute capability 9.0" in card


def test_symmetric_grid_is_gptqs_sym_and_counts_no_zero():
    """--quant-symmetric: scale 2 max|w| / (2^b - 1), every zero the middle code, error at most half
    a step; RTN and GPTQ agree on the grid; the papers' count has no zero bits."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 64, generator=g)
    for bits in (4, 8):
        q = LC.rtn_quantize(W, bits, 32, symmetric=True)
        assert q.symmetric and torch.equal(q.zero, torch.full_like(q.zero, 2 ** (bits - 1)))
        amax = W.abs().reshape(8, 2, 32).amax(-1)
        assert torch.allclose(q.scale, 2 * amax / (2 ** bits - 1))
        err = (q.dequantize(torch.float32) - W).abs()
        assert bool((err <= q.scale.repeat_interleave(32, 1) / 2 + 1e-6).all())
        X = torch.randn(100, 64, generator=g)
        qg = LC.gptq_quantize(W, 2 * X.T @ X / 100, bits, 32, symmetric=True)
        assert qg.symmetric and torch.equal(qg.zero, q.zero)
        parts = LC.counted_bits(q, bits, act_order=False)
        assert parts["grids"] == q.scale.numel() * LC.SCALE_BITS
    with pytest.raises(ValueError, match="integer zero point"):
        LC.rtn_quantize(W, 4, 32, zero_point="float", symmetric=True)


def test_quant_symmetric_is_a_switch_and_a_grid_axis():
    import argparse

    import llm_cli
    from llm_common import UserError

    p = llm_cli.add_arguments(argparse.ArgumentParser())
    one = llm_cli.from_args(p.parse_args(["--quant-method", "rtn", "--quant-symmetric"])).quantize
    assert one.symmetric is True and one.variant_name() == "quantized"
    grid = llm_cli.from_args(p.parse_args(["--quant-method", "rtn", "--quant-symmetric", "off,on"])).quantize
    assert [c.variant_name() for c in grid.grid_points()] == ["quantized[rtn,4,g128]", "quantized[rtn,4,g128,sym]"]
    with pytest.raises(UserError, match="--quant-symmetric needs --quant-zero-point integer"):
        llm_cli.from_args(p.parse_args(["--quant-method", "rtn", "--quant-symmetric", "--quant-zero-point",
                                        "float"])).quantize.validate()


def test_export_dtype_casts_what_is_not_quantized(tok, tmp_path, model64):
    """--export-dtype float16 on a plain export: every tensor F16, the config says so, the card
    reads it from the file; auto keeps the model's own dtype (float32)."""
    for choice, want in (("float16", "F16"), ("auto", "F32")):
        res = E.export_variants(model64, tok, {"base": None}, tmp_path / choice,
                                E.ExportConfig(enabled=True, dtype=choice))
        path = tmp_path / choice / "base"
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {want}
        assert f"**Not quantized:** {want}" in (path / "README.md").read_text()
        assert res.variants["base"]["export_dtype"] == {"F16": "float16", "F32": "float32"}[want]
        assert json.loads((path / "llm_variant.json").read_text())["pattern"] == "dense"


def test_a_symmetric_grid_axis_is_scored_exported_and_reported(tiny_run_dir, tmp_path):
    """--quant-symmetric off,on in a run: two quantized variants, each with its own perplexity;
    the symmetric one's export has no zero point and loads with plain from_pretrained (its card
    says so); the quality-against-size table names it symmetric and the group written (the
    tiny model's 32- and 64-wide inputs at group 48: written at 16)."""
    import llm_main_v4 as M
    from conftest import tiny_argv

    out = tmp_path / "out"
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "quantize,eval,export", "--quant-method", "rtn",
                            "--quant-group", "48", "--quant-symmetric", "off,on", "--export",
                            "--export-quant-format", "compressed-tensors")) == 0
    res = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in res["quantize"]["grid"]]
    assert names == ["quantized[rtn,4,g48]", "quantized[rtn,4,g48,sym]"]
    ppl = res["perplexity"]
    assert all(math.isfinite(ppl[n]) for n in names) and ppl[names[0]] != ppl[names[1]]
    for name, sym in zip(names, (False, True)):
        rec = res["export"]["variants"][name]
        assert rec["group_size_written"] == 16 and rec["quant_format"]["symmetric"] == [sym]
        assert rec["readers"]["transformers plain, float32"]["loads"] is sym
        assert rec["readers"]["transformers dequantize, bfloat16"]["loads"]
    report = (out / "report.md").read_text()
    assert "rtn 4 bits g48, symmetric, written at g16" in report or "rtn 4-bit g48, symmetric, written at g16" in report


def test_the_card_warns_where_vllm_refuses():
    """vLLM 0.34's kernel choice (bench/export_readers.py ran it): asymmetric 8-bit has no kernel
    below 9.0, and Machete needs output widths that are multiples of 128 (SmolLM2's 576 and 192
    are not: no GPU serves it); a group Marlin does not take; symmetric 4-bit at 64 is served."""
    import llm_export_card as CARD

    facts = {"groups": [{"bits": 8, "symmetric": False, "group_size": 64}], "packed_shapes": [(576, 576), (1536, 576)]}
    w = " ".join(CARD.known_refusals(facts))
    assert "asymmetric 8-bit weights have no kernel below compute capability 9.0" in w and "which 1 of" in w
    assert "group sizes" not in w
    w = " ".join(CARD.known_refusals({"groups": [{"bits": 4, "symmetric": True, "group_size": 16}]}))
    assert "Marlin takes groups of 32, 64, 128 only; this folder has 16" in w
    assert "no kernel" not in " ".join(CARD.known_refusals({"groups": [{"bits": 4, "symmetric": True,
                                                                         "group_size": 64}]}))
