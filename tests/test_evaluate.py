"""evaluate_model against independent computations."""
import math

import pytest
import torch

from llm_common import UserError
from llm_data import tokenize_corpus
from llm_evaluate_models import EvalConfig, evaluate_model, safe_exp, window_plan


def hand_nll(model, ids, seq_len, stride):
    """Independent exact computation: every target token is predicted once, by the first
    full window that contains it in its last `stride` positions (all positions for window 0)."""
    total, count = 0.0, 0
    scored = set()
    for k, start in enumerate(range(0, ids.numel() - seq_len + 1, stride)):
        w = ids[start:start + seq_len]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), -1)
        for p in range(1, seq_len):
            g = start + p
            if g in scored:
                continue
            scored.add(g)
            total -= logp[p - 1, w[p]].item()
            count += 1
    return total / count, count


@pytest.mark.parametrize("stride", [None, 16, 5])
def test_perplexity_matches_hand_computation(tiny_model, tok, sample_text, stride):
    ids = tokenize_corpus(tok, sample_text[:200])
    cfg = EvalConfig(seq_len=32, stride=stride, max_new_tokens=0, batch_size=3, progress=False)
    res = evaluate_model(tiny_model, tok, ids, cfg)
    nll, count = hand_nll(tiny_model, ids, 32, stride or 32)
    assert res.tokens_scored == count
    assert res.nll == pytest.approx(nll, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(nll), rel=1e-5)


def test_stride_equal_to_seq_len_is_disjoint_windows(tok, sample_text, tiny_llama):
    model = tiny_llama()
    ids = tokenize_corpus(tok, sample_text[:300])
    a = evaluate_model(model, tok, ids, EvalConfig(seq_len=40, max_new_tokens=0, progress=False))
    b = evaluate_model(model, tok, ids, EvalConfig(seq_len=40, stride=40, max_new_tokens=0, progress=False))
    # Independent disjoint protocol: mean of per-window HF losses (equal counts per window).
    losses = [model(input_ids=ids[s:s + 40][None], labels=ids[s:s + 40][None]).loss.item()
              for s in range(0, ids.numel() - 39, 40)]
    assert a.perplexity == b.perplexity
    assert a.tokens_scored == len(losses) * 39
    assert a.perplexity == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_sliding_window_scores_each_token_once():
    plan = window_plan(100, 20, 7)
    scored = []
    for s, f in plan:
        scored += list(range(s + f, s + 20))
    assert len(scored) == len(set(scored))
    assert scored == list(range(1, plan[-1][0] + 20))


def test_uniform_logits_give_vocab_size(tok, sample_text, tiny_llama):
    model = tiny_llama(vocab=301)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ids = tokenize_corpus(tok, sample_text[:100])
    res = evaluate_model(model, tok, ids, EvalConfig(seq_len=25, max_new_tokens=0, progress=False))
    assert res.perplexity == pytest.approx(301, rel=1e-6)  # fp32 log-softmax rounding
    assert res.bits_per_byte == pytest.approx(res.tokens_scored * math.log2(301) / res.bytes_scored)


def test_kl_against_itself_is_zero(tiny_model, tok, sample_text):
    ids = tokenize_corpus(tok, sample_text[:120])
    res = evaluate_model(tiny_model, tok, ids, EvalConfig(seq_len=30, max_new_tokens=0, progress=False),
                         reference=tiny_model)
    assert res.kl == pytest.approx(0.0, abs=1e-9)
    assert res.top1_agreement == 1.0


def test_kl_matches_hand_computation(tok, sample_text, tiny_llama):
    a, b = tiny_llama(seed=1), tiny_llama(seed=2)
    ids = tokenize_corpus(tok, sample_text[:64])
    res = evaluate_model(a, tok, ids, EvalConfig(seq_len=32, max_new_tokens=0, progress=False), reference=b)
    kls, agree, n = [], 0, 0
    for s in (0, 32):
        w = ids[s:s + 32][None]
        with torch.no_grad():
            pa = torch.log_softmax(a(input_ids=w).logits[0, :-1].double(), -1)
            pb = torch.log_softmax(b(input_ids=w).logits[0, :-1].double(), -1)
        kls.append((pb.exp() * (pb - pa)).sum(-1))
        agree += int((pa.argmax(-1) == pb.argmax(-1)).sum())
        n += 31
    assert res.kl == pytest.approx(torch.cat(kls).mean().item(), rel=1e-4)
    assert res.top1_agreement == agree / n
    assert res.kl > 0


def test_nonfinite_is_reported_not_raised(tok, sample_text, tiny_llama):
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    ids = tokenize_corpus(tok, sample_text[:80])
    res = evaluate_model(model, tok, ids, EvalConfig(seq_len=20, max_new_tokens=0, progress=False))
    assert math.isnan(res.perplexity)
    assert all(math.isnan(x) for x in res.perplexity_ci95)  # a nan interval, not an error
    assert safe_exp(1e6) == float("inf")


def test_generation_is_greedy_and_deterministic(tiny_model, tok):
    cfg = EvalConfig(seq_len=8, max_new_tokens=5, prompts=("hello",), progress=False)
    ids = tokenize_corpus(tok, "some text to score here")
    tiny_model.config.use_cache = False
    r1 = evaluate_model(tiny_model, tok, ids, cfg)
    r2 = evaluate_model(tiny_model, tok, ids, cfg)
    assert set(r1.generations) == {"hello"} and r1.generations == r2.generations
    assert tiny_model.config.use_cache is False  # generation's temporary use_cache=True was undone
    with torch.no_grad():  # greedy: the first generated byte is the argmax after the prompt
        first = int(tiny_model(input_ids=tok("hello", return_tensors="pt").input_ids).logits[0, -1].argmax())
    assert r1.generations["hello"].startswith(tok.decode([first]).strip()[:1])


@pytest.mark.parametrize("kw,msg", [
    (dict(seq_len=1), "seq-len"),
    (dict(seq_len=8, stride=9), "stride"),
    (dict(seq_len=8, stride=0), "stride"),
    (dict(seq_len=4096), "shorter than one window"),
    (dict(seq_len=8, eval_tokens=1), "eval-tokens"),
])
def test_bad_eval_config(tok, kw, msg, tiny_llama):
    ids = tokenize_corpus(tok, "a short corpus of text")
    with pytest.raises(UserError, match=msg):
        evaluate_model(tiny_llama(), tok, ids, EvalConfig(max_new_tokens=0, progress=False, **kw))


def test_evaluation_and_hessian_run_in_eval_mode_and_restore_the_callers_mode(tiny_llama, tok):
    """A notebook model left in train mode (dropout on) scores the same on every call, as in eval
    mode, and is handed back in train mode."""
    import llm_model as LM
    from llm_config import EvalConfig
    from llm_integrated_analysis import hutchinson_trace, lm_loss_fn
    from llm_perplexity import evaluate_model

    m = tiny_llama(attention_dropout=0.5)
    ids = torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(0))
    cfg = EvalConfig(seq_len=32, eval_tokens=128, max_new_tokens=0, progress=False)
    ref = evaluate_model(m, tok, ids, cfg).perplexity
    m.train()
    assert [evaluate_model(m, tok, ids, cfg).perplexity for _ in range(2)] == [ref, ref]
    assert m.training and all(x.training for x in m.modules())
    params = {n: p for n, p in m.named_parameters() if n.endswith("q_proj.weight")}
    with LM.attention_implementation(m, "eager"):  # double backward, as the analysis step runs it
        traces = [hutchinson_trace(lm_loss_fn(m, ids[:64].view(2, 32)), params, max_probes=2, min_probes=2,
                                   progress=False).total for _ in range(2)]
    assert traces[0] == traces[1] and m.training
    with LM.eval_mode(m):
        assert not m.training
    assert m.training
