"""Every step on tiny random models of several architectures, built from configs."""
import json

import pytest
import torch

import llm_common as C
import llm_main_v4
import llm_model as LM
import llm_variants as V


def make(arch: str):
    import transformers as T

    torch.manual_seed(0)
    common = dict(vocab_size=257, max_position_embeddings=256)
    if arch == "llama":
        cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, **common)
        return T.LlamaForCausalLM(cfg)
    if arch == "mistral":
        cfg = T.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, sliding_window=64, **common)
        return T.MistralForCausalLM(cfg)
    if arch == "qwen2":
        cfg = T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, **common)
        return T.Qwen2ForCausalLM(cfg)
    if arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=257, n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=256,
                           eos_token_id=256)
        return T.GPT2LMHeadModel(cfg)
    if arch == "opt":
        cfg = T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                          word_embed_proj_dim=32, bos_token_id=256, eos_token_id=256, pad_token_id=256, **common)
        return T.OPTForCausalLM(cfg)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "gpt2", "opt"]


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_map(arch):
    m = make(arch)
    layers = LM.decoder_layers(m)
    assert len(layers) == 2
    down = LM.mlp_down_proj(layers[0])
    assert LM.weight_view(down).shape == (32, 64)  # [out=hidden, in=intermediate] for every layout
    assert len(LM.block_linears(layers[0])) >= 4


def test_unsupported_architecture_is_a_clear_error():
    class Odd(torch.nn.Module):
        pass

    with pytest.raises(C.UserError, match="unsupported architecture Odd"):
        LM.decoder_layers(Odd())


@pytest.mark.parametrize("arch", ARCHS)
def test_whole_pipeline(arch, tmp_path, sample_text, byte_tokenizer, pipeline_config):
    model_dir = tmp_path / "model"
    make(arch).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text(sample_text[:4000])
    out = tmp_path / "out"
    cfg = pipeline_config(model_dir, text, out, prune={"pattern": "2:4", "protect": ()},
                          noise={"sweep_eps": (0.5,), "sweep_seeds": 1}, analysis={"quant_group": 32})
    llm_main_v4.run_pipeline(cfg, argv=[])
    res = json.loads((out / "results.json").read_text())
    assert set(res["perplexity"]) == {"base", "fine-tuned", "pruned", "noisy"}
    assert res["prune"]["overall_sparsity"] == pytest.approx(0.5)  # 2:4 exactly
    pruned = V.load_masks(out / "checkpoints" / "pruned.safetensors")  # True where pruned
    for name, z in pruned.items():
        z = z.t() if arch == "gpt2" else z  # Conv1D stores [in, out]
        assert (z.reshape(z.shape[0], -1, 4).sum(-1) >= 2).all(), name
    assert res["evaluation"]["noisy"]["kl"] > 0
    assert res["noise"]["map"]["delta_nll"] and len(res["analysis"]["hessian_trace"]) == len(pruned)
    assert len(res["adversarial"]["table"]) == 6
    assert res["finetune"]["heldout_loss_after"] < res["finetune"]["heldout_loss_before"]
