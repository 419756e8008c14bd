"""Exports: every variant reloads with from_pretrained to identical logits, with a model card."""
from __future__ import annotations

import functools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import llm_export as E
import llm_model as LM
import llm_variants as V


def _variants(m):
    """base (the model as it is), a 2:4 mask (a context manager, as the pipeline stores pruning)
    and a noise-like tensor dict (as a stored noisy variant)."""
    masks = {}
    for n in LM.decoder_linears(m):
        w = m.get_submodule(n).weight.detach()
        groups = w.abs().reshape(-1, 4)
        drop = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.argsort(1)[:, :2], True)
        masks[n + ".weight"] = drop.reshape(w.shape)
    g = torch.Generator().manual_seed(1)
    name = next(iter(LM.decoder_linears(m))) + ".weight"
    noisy = {name: m.get_parameter(name).detach() + 0.05 * torch.randn(m.get_parameter(name).shape, generator=g)}
    return {"base": None, "pruned": functools.partial(V.masked_weights, masks=masks), "noisy": noisy}


def test_each_exported_variant_reloads_to_identical_logits(tiny_model, tok, tmp_path):
    m = tiny_model
    before = {k: v.clone() for k, v in m.state_dict().items()}
    variants = _variants(m)
    facts = {"pruned": {"parent": "base", "base_model": "tiny", "made_by": "wanda pruning, 2:4",
                        "calibration": "4 windows of 32 tokens of text.txt",
                        "metrics": {"perplexity": {"value": 12.5, "text": "wiki.test.raw", "tokens": 256}}, "from_gguf": True}}
    res = E.export_variants(m, tok, variants, tmp_path, E.ExportConfig(enabled=True, command="python x.py --export"),
                            facts)
    assert res.status == "ran" and set(res.variants) == set(variants)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # the live model is restored
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.").input_ids])
    for name, weights in variants.items():
        with V.applied_variant(m, weights), torch.no_grad():
            want = m(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want), name
        assert any(f.endswith(".safetensors") for f in res.variants[name]["files"])
        assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in res.variants[name]["files"])
    assert res.variants["pruned"]["zero_fraction_linears"] >= 0.5
    assert res.variants["base"]["zero_fraction_linears"] < 0.01
    card = (tmp_path / "pruned" / "README.md").read_text()
    for needle in ("Base model: local (tiny)", "wanda pruning, 2:4", "4 windows of 32 tokens", "12.5000", "wiki.test.raw",
                   "unrounded minimum", "python x.py --export", "Parent variant: base"):
        assert needle in card, needle
    assert "base_model:" not in card  # a local model is not a hub id


def test_the_card_carries_what_the_hub_reads_and_the_config_its_own_use_cache(tiny_run_dir, tmp_path):
    """Front matter parsed by huggingface_hub's ModelCard; the perplexity line gives its window and
    token count; config.json keeps the model's own use_cache (loading turns it off for analysis)."""
    import json

    from huggingface_hub import ModelCard

    import llm_main_v4 as M
    import llm_results as R
    from conftest import tiny_argv

    out = tmp_path / "out"
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "prune,eval,export", "--export")) == 0
    card = ModelCard.load(out / "export" / "pruned" / "README.md")
    assert card.data.pipeline_tag == "text-generation" and card.data.license == "other"
    assert "pruning" in card.data.tags and card.data.library_name == "transformers"
    assert card.data.base_model is None  # the tiny model is a local folder
    assert "disjoint windows of 32 tokens, 124 tokens scored" in card.text  # 4 windows x 31 predictions
    assert json.loads((out / "export" / "pruned" / "config.json").read_text())["use_cache"] is True
    # A hub model: its id is the base_model, and the named corpora are the datasets.
    results = {"model": "meta-llama/Llama-2-7b-hf", "model_identity": {"commit": "01c7f73d"},
               "dataset": {"train": {"name": "c4"}, "eval": {"name": "wikitext2", "source": "wikitext2 test"}},
               "perplexity": {"base": 5.47}, "protocol": {"seq_len": 2048}, "variants": {"base": None}}
    text = E.model_card("base", R.variant_facts(results, {"base": None})["base"])
    data = ModelCard(text).data
    assert data.base_model == "meta-llama/Llama-2-7b-hf" and data.datasets == ["allenai/c4", "wikitext"]
    assert data.license_link == "https://huggingface.co/meta-llama/Llama-2-7b-hf"


def test_two_of_four_detection_and_cpu_speed_path(tiny_llama, tok, tmp_path):
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3]])
    assert E.is_two_of_four(w) and not E.is_two_of_four(torch.ones(1, 8)) and not E.is_two_of_four(torch.ones(1, 6))
    m = tiny_llama()
    res = E.export_variants(m, tok, _variants(m), tmp_path, E.ExportConfig(two_of_four=True))
    assert res.status == "ran" and set(res.variants) == {"base", "pruned", "noisy"}  # --export-2of4 implies --export
    assert res.two_of_four["status"] == "skipped" and "CUDA" in res.two_of_four["reason"]
    shapes = []
    hook = m.model.register_forward_hook(lambda mod, args, kw, out: shapes.append(tuple(kw["input_ids"].shape)),
                                         with_kwargs=True)
    try:
        rate = E.tokens_per_second(m, 2, 16, iters=2, warmup=1)
    finally:
        hook.remove()
    assert shapes == [(2, 16)] * 3 and 0 < rate < float("inf")  # warm-up + timed passes, all of [batch, seq_len]


def test_export_is_off_by_default(tiny_llama, tok, tmp_path):
    res = E.export_variants(tiny_llama(), tok, {"base": None}, tmp_path / "x")
    assert res.status == "off" and not (tmp_path / "x").exists()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="semi-structured sparse kernels need CUDA, compute capability 8.0+")
def test_semi_structured_conversion_keeps_logits_on_cuda(tiny_llama, tok, tmp_path):
    m = tiny_llama(hidden=128).to("cuda", torch.float16)
    res = E.export_variants(m, tok, _variants(m), tmp_path, E.ExportConfig(two_of_four=True, speed_batches=(1, 2)))
    tf = res.two_of_four
    assert tf["status"] == "ran" and tf["variant"] == "pruned" and tf["linears"] > 0, tf
    assert tf["max_abs_logit_diff"] < 1e-1 and set(tf["tokens_per_s"]) == {"1", "2"}
    with V.applied_variant(m, _variants(m)["pruned"]), E.semi_structured(m) as done:
        assert set(done) <= set(LM.decoder_linears(m)) and done
    assert all(type(m.get_submodule(n).weight.data) is torch.Tensor for n in done)  # dense again on exit


def _unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The compressed-tensors pack-quantized layout read by hand, for bits dividing 32: value j of
    a row sits in int32 word j // (32 / bits) at bit (j mod 32 / bits) x bits, unsigned."""
    per = 32 // bits
    j = torch.arange(n)
    return (packed[:, j // per].long() >> (bits * (j % per))) & (2 ** bits - 1)


def _quantized_variant(m, tmp_path, bits: int, group: int, method: str = "rtn", scale_dtype: str = "float32"):
    """Codes of every decoder linear (RTN, or GPTQ on a random Hessian), stored as the pipeline
    stores them; returns (records, checkpoint, bits per linear)."""
    import llm_compress as LC

    g = torch.Generator().manual_seed(0)
    recs = {}
    for n, mod in LM.decoder_linears(m).items():
        W = LM.weight_view(mod).detach()
        if method == "gptq":
            X = torch.randn(200, W.shape[1], generator=g)
            recs[n + ".weight"] = LC.gptq_quantize(W, 2 * X.T @ X / 200, bits, group, scale_dtype=scale_dtype)
        else:
            recs[n + ".weight"] = LC.rtn_quantize(W, bits, group, scale_dtype=scale_dtype)
    LC.save_codes(tmp_path / "run", "quantized", recs)
    ckpt = tmp_path / "run" / "checkpoints" / "quantized.safetensors"
    return recs, ckpt, {n: bits for n in LM.decoder_linears(m)}


@pytest.mark.parametrize("bits,method,dtype,scales", [(4, "rtn", torch.float32, "float32"),
                                                      (4, "gptq", torch.float32, "float32"),
                                                      (8, "rtn", torch.float32, "float32"),
                                                      (8, "gptq", torch.bfloat16, "float32"),
                                                      (4, "gptq", torch.float32, "float16")])
def test_pack_quantized_export_decompresses_to_the_in_run_weights_at_the_expected_size(tok, tmp_path, bits,
                                                                                      method, dtype, scales):
    """Issues 34 and 40: the compressed-tensors export is pack-quantized: compressed-tensors' own
    config model parses it, the packed codes and zero points read by hand are ours, the library's
    decompressor gives back the in-run weights and logits exactly (float32 and bf16, with
    --export-dtype float32: the scales are stored in float32), and the bytes written per weight
    are the codes plus a scale and a packed zero per group. One group size for every linear: the
    gcd of the group (32) and every width (48, 96): 16 (SmolLM2's 576 and 1536 at 128: 64). With
    --quant-scale-dtype float16 the scales are written in 16 bits, and the values are what a
    reader computes in fp16."""
    import math

    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open

    import llm_compress as LC

    m = make_llama_of(48)
    if dtype != torch.float32:  # loaded in bf16 as the pipeline loads it (rotary frequencies stay float32)
        m.save_pretrained(tmp_path / "m")
        m = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=dtype).eval()
    recs, ckpt, bits_of = _quantized_variant(m, tmp_path, bits, 32, method, scales)
    variant = functools.partial(LC.coded_weights, path=ckpt)
    res = E.export_variants(m, tok, {"quantized": variant}, tmp_path / "x",
                            E.ExportConfig(enabled=True, quant_format="compressed-tensors", dtype="float32",
                                           reader_check=False),
                            codes={"quantized": (ckpt, bits_of)})
    path, rec = tmp_path / "x" / "quantized", res.variants["quantized"]
    raw = json.loads((path / "config.json").read_text())["quantization_config"]
    qc = QuantizationConfig.model_validate(raw)
    assert qc.format == "pack-quantized" and rec["quant_format"]["dense"] == []
    assert rec["quant_format"]["max_abs_diff"] == 0 and rec["group_size_written"] == 16
    sizes = {g.weights.group_size: set(g.targets) for g in qc.config_groups.values()}
    assert sizes == {16: set(bits_of)}
    assert all(g.weights.num_bits == bits and not g.weights.symmetric for g in qc.config_groups.values())
    want_bytes, n_weights = 0, 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for pname, q in recs.items():
            name, (out, inp) = pname[:-len(".weight")], q.codes.shape
            gs = 16
            packed, zp = f.get_tensor(name + ".weight_packed"), f.get_tensor(name + ".weight_zero_point")
            scale = f.get_tensor(name + ".weight_scale")
            assert packed.dtype == zp.dtype == torch.int32 and scale.dtype == getattr(torch, scales)
            assert torch.equal(_unpack(packed, bits, inp), q.codes.long())
            groups = torch.arange(inp // gs) * gs // 32  # each sub-group's original group
            assert torch.equal(_unpack(zp.T, bits, out).T, q.zero[:, groups].long())
            assert torch.equal(scale.float(), q.scale[:, groups])
            # codes, float32 scales, zero points packed along the output dimension, the int64 shape
            groups_n = inp // gs
            scale_bytes = 2 if scales == "float16" else 4
            want_bytes += out * inp * bits // 8 + (out * scale_bytes + math.ceil(out * bits / 32) * 4) * groups_n + 16
            n_weights += out * inp
    got = rec["stored_bits_per_weight"]["decoder_linears"]
    assert got == pytest.approx(8 * want_bytes / n_weights, rel=1e-12)
    ids = torch.randint(0, 256, (2, 16))
    loaded = E.load_compressed_tensors(path, dtype)
    with variant(m), torch.no_grad():
        assert all(torch.equal(p, m.get_parameter(n)) for n, p in loaded.named_parameters())
        assert torch.equal(loaded(ids).logits, m(ids).logits)
    # the reader check was off: the card claims no recipe
    assert "no load recipe is claimed" in (path / "README.md").read_text()
    # transformers 5.24's plain path expects the zero point unpacked
    with pytest.raises(RuntimeError, match="size mismatch|ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(path)


def make_llama_of(hidden: int):
    from conftest import make_llama

    return make_llama(hidden=hidden)


def test_an_export_that_does_not_decompress_to_the_quantized_weights_is_refused(tok, tmp_path, monkeypatch):
    """The export reads itself back through compressed-tensors' decompressor: a weight that comes
    back different (a library change of rounding or packing), or a linear that does not come
    back, stops the export instead of shipping other weights."""
    import llm_compress as LC

    m = make_llama_of(32)
    recs, ckpt, bits_of = _quantized_variant(m, tmp_path, 4, 16)
    real = E._decompressed
    for bad in (lambda p, q: ((n, w + 1e-3 * (n.endswith("q_proj"))) for n, w in real(p, q)),
                lambda p, q: ((n, w) for n, w in real(p, q) if "v_proj" not in n)):
        monkeypatch.setattr(E, "_decompressed", bad)
        with pytest.raises(RuntimeError, match="decompressed weights differ"):
            E.export_variants(m, tok, {"quantized": functools.partial(LC.coded_weights, path=ckpt)},
                              tmp_path / "x", E.ExportConfig(enabled=True, quant_format="compressed-tensors"),
                              codes={"quantized": (ckpt, bits_of)})
        assert not (tmp_path / "x" / "quantized").exists()  # atomic: nothing half-written
