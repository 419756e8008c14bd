"""Integration on the real embedded SmolLM2-135M-Instruct (GGUF, dequantized and cached)."""
import math
import time

import pytest
import torch

import llm_common as C
import llm_data as D
import llm_model as LM
from llm_evaluate_models import EvalConfig, evaluate_model


@pytest.fixture(scope="module")
def smol():
    model, tok, label = LM.load_model(LM.LoadConfig())
    return model, tok, label


def test_embedded_model_loads_and_matches_plain_hf_loop(smol, sample_text):
    model, tok, label = smol
    assert label == LM.EMBEDDED_NAME
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = D.tokenize_corpus(tok, sample_text)[:513]
    res = evaluate_model(model, tok, ids, EvalConfig(seq_len=256, max_new_tokens=24, progress=False))
    with torch.no_grad():
        losses = [model(input_ids=ids[s:s + 256][None], labels=ids[s:s + 256][None]).loss.item()
                  for s in (0, 256)]
    assert res.perplexity == pytest.approx(math.exp(sum(losses) / 2), rel=1e-3)
    assert 5 < res.perplexity < 100  # a real LM on English text, not a random one
    answer = res.generations[LM.SAMPLE_PROMPT]
    assert len(answer) > 10


def test_float_zero_point_at_group_32_reproduces_the_q4_1_weights(smol):
    """The embedded GGUF stores every decoder linear as Q4_1 (the tied embedding as Q8_0): 4-bit
    RTN at group 32 with the float zero point gives back the file's fp16 scales and minima and
    its dequantized weights bit for bit; GPTQ's integer zero point gives back few of them."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    import llm_compress as LC

    model, _, _ = smol
    reader = gguf.GGUFReader(str(LM.embedded_gguf_path()))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0"
    assert {v for k, v in types.items() if k.startswith("blk.") and not k.endswith("norm.weight")} == {"Q4_1"}
    tensors = {t.name: t for t in reader.tensors}
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    same_int = total = 0
    for i in (0, 29):
        for gname, hname in names.items():
            W = model.get_submodule(f"model.layers.{i}.{hname}").weight.detach().float()
            q = LC.rtn_quantize(W, 4, 32, zero_point="float")
            assert torch.equal(q.dequantize(torch.float32), W), (i, hname)
            if gname in ("attn_q", "attn_k"):  # transformers permutes their rows (rotary layout); the rest as stored
                continue
            t = tensors[f"blk.{i}.{gname}.weight"]
            blocks = np.asarray(t.data).reshape(-1, 20)  # Q4_1 block: fp16 d, fp16 m, 16 bytes of codes
            d, m = (torch.from_numpy(blocks[:, a:a + 2].copy().view(np.float16).astype(np.float32)) for a in (0, 2))
            assert torch.equal(q.scale.flatten(), d.flatten()) and torch.equal(q.zero.flatten(), m.flatten())
            G = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type)).reshape(W.shape)
            assert torch.equal(q.dequantize(torch.float32), G)
            same_int += int((LC.rtn_quantize(W, 4, 32).dequantize(torch.float32) == W).sum())
            total += W.numel()
    assert same_int / total < 0.01  # measured 0.27% over the 210 linears


def test_gguf_cache_is_reused(smol):
    t = time.perf_counter()
    src, _ = LM.resolve_model_source(None)
    assert time.perf_counter() - t < 2
    assert (C.Path(src) / "model.safetensors").is_file()


def test_embedded_model_answers_the_local_trivia_task_above_chance(smol, tmp_path):
    """lm-eval on the real model through the zero-shot step: 32 four-way questions
    (bench/tasks/trivia_mc), where chance is 25%; SmolLM2-135M gets about 69%."""
    pytest.importorskip("lm_eval")
    import llm_zeroshot as Z

    root = C.Path(__file__).resolve().parents[1] / "bench" / "tasks"
    yaml = (root / "trivia_mc.yaml").read_text().replace("bench/tasks/trivia_mc.jsonl", str(root / "trivia_mc.jsonl"))
    (tmp_path / "trivia_mc.yaml").write_text(yaml)  # lm-eval resolves data files against the working directory
    model, tok, _ = smol
    res = Z.evaluate_zeroshot(model, tok, {"base": None}, Z.ZeroShotConfig(tasks=("trivia_mc",),
                                                                          include_path=str(tmp_path)))
    row = res.tasks["base"]["trivia_mc"]
    assert res.status == "ran" and row["n"] == 32
    assert row["acc"] > 0.5 and row["acc"] - 2 * row["acc_stderr"] > 0.25


def test_gcg_on_smollm2_reports_a_suffix_a_user_can_send(smol):
    """A short real GCG run in SmolLM2's chat template: the reported user message, tokenized by
    HF's own chat path, gives exactly the ids GCG scored, and the reported best loss is the
    target NLL of that real text in a plain forward pass."""
    import llm_attacks as A
    import llm_gcg as G

    model, tok, _ = smol
    turn = G.UserTurn(tok, LM.SAMPLE_PROMPT)
    target = torch.tensor(tok(" Star Wars", add_special_tokens=False).input_ids)
    r = G.gcg_attack(model, tok, A.Sample(turn.before, target),
                     G.GCGConfig(suffix_len=6, steps=3, topk=32, batch=16, progress=False), turn=turn)
    real = tok.apply_chat_template([{"role": "user", "content": r.user_message}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]
    assert r.in_context and list(real) == turn.before.tolist() + r.suffix_ids + turn.after.tolist()
    x = torch.cat([torch.tensor(list(real)), target])[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0, -target.numel() - 1:-1].float(), -1)
    assert r.final_loss == pytest.approx(float(-logp[torch.arange(target.numel()), target].mean()), rel=1e-3)
    assert r.candidates_scored + r.candidates_filtered == 1 + 3 * 16
