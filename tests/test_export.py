"""Exports: every variant reloads with from_pretrained to identical logits, with a model card."""
from __future__ import annotations

import functools

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
