"""FGSM/PGD on embeddings, GCG, and defences on tiny models."""
import pytest
import torch

import llm_adversarial_test as ADV
import llm_common as C


def _samples(n=3, P=12, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [ADV.Sample(torch.randint(0, 256, (P,), generator=g), torch.randint(0, 256, (T,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_epsilon_changes_nothing(tiny_model, method, norm):
    s = _samples(1)[0]
    r = ADV.attack_embeddings(tiny_model, s, ADV.AttackConfig(method=method, norm=norm, epsilon=0.0))
    assert r.attacked_nll == r.clean_nll and r.top1_agreement == 1.0
    assert torch.count_nonzero(r.delta) == 0


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("positions", ["prompt", "suffix"])
def test_pgd_iterates_stay_in_the_ball(tiny_model, norm, positions):
    s = _samples(1)[0]
    cfg = ADV.AttackConfig(method="pgd", norm=norm, epsilon=0.3, steps=8, alpha=0.3, positions=positions,
                           suffix_len=4)
    r = ADV.attack_embeddings(tiny_model, s, cfg)
    assert r.max_norm <= r.radius * (1 + 1e-5)
    assert r.delta.shape[0] == (12 if positions == "prompt" else 4)
    if norm == "l2":  # the radius is relative to the mean embedding-row norm
        assert r.radius == pytest.approx(0.3 * ADV.mean_row_norm(tiny_model))


def test_pgd_beats_fgsm_and_both_raise_the_loss(tiny_model):
    samples = _samples(4)
    res = {}
    for method in ("fgsm", "pgd"):
        cfg = ADV.AttackConfig(method=method, norm="linf", epsilon=0.5, steps=10)
        res[method] = [ADV.attack_embeddings(tiny_model, s, cfg) for s in samples]
    for f, p in zip(res["fgsm"], res["pgd"]):
        assert f.attacked_nll > f.clean_nll and p.attacked_nll > p.clean_nll
    assert sum(r.attacked_nll for r in res["pgd"]) >= sum(r.attacked_nll for r in res["fgsm"])


def test_targeted_attack_reaches_target():
    from conftest import tiny_llama

    m = tiny_llama(seed=3, initializer_range=0.3)  # logits with real range, so targets are reachable
    s = ADV.Sample(torch.arange(40, 52), torch.tensor([101, 7, 202]))
    cfg = ADV.AttackConfig(method="pgd", norm="l2", epsilon=2.0, steps=80, alpha=0.2, objective="targeted")
    assert not ADV.targeted_success(m, s, None, cfg)
    r = ADV.attack_embeddings(m, s, cfg)
    assert r.attacked_nll < r.clean_nll
    assert ADV.targeted_success(m, s, r.delta, cfg)


def test_parameters_frozen_and_unchanged(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    ADV.attack_embeddings(tiny_model, _samples(1)[0], ADV.AttackConfig(epsilon=0.2, steps=3))
    assert all(p.grad is None for p in tiny_model.parameters())
    assert {n: p.requires_grad for n, p in tiny_model.named_parameters()} == flags
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_gcg_lowers_target_loss_with_printable_suffix(tok):
    from conftest import tiny_llama

    m = tiny_llama(seed=1)
    s = ADV.Sample(torch.tensor(tok("Hello there").input_ids), torch.tensor(tok(" ok").input_ids))
    r = ADV.gcg_attack(m, tok, s, suffix_len=4, steps=8, topk=16, batch=16, progress=False)
    assert r.final_loss <= r.initial_loss and len(r.suffix_ids) == 4
    assert r.suffix_text.isascii() and r.suffix_text.isprintable()


def test_perplexity_filter_flags_gibberish(tok):
    from conftest import tiny_llama

    m = tiny_llama()
    clean = [torch.tensor([5] * 10)]
    out = ADV.perplexity_filter(m, clean, [torch.tensor(list(range(100, 110)))])
    assert out["false_positive_rate"] == 0.0
    assert out["threshold"] == pytest.approx(max(out["clean_ppl"]))


def test_adversarial_finetune_reduces_delta_nll_and_restores():
    from conftest import tiny_llama

    m = tiny_llama(seed=2)
    samples = _samples(3)
    cfg = ADV.AttackConfig(method="pgd", norm="linf", epsilon=0.5, steps=4, seed=5)
    before = sum(ADV.attack_embeddings(m, s, cfg).delta_nll for s in samples)
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    with C.restored_on_exit(m, [n for n, _ in m.named_parameters()]):
        ADV.adversarial_finetune(m, samples, cfg, steps=30, lr=3e-3, progress=False)
        after = sum(ADV.attack_embeddings(m, s, cfg).delta_nll for s in samples)
    assert after < before
    assert all(torch.equal(snap[k], v) for k, v in m.state_dict().items())


def test_full_adversarial_step_on_tiny_model(tok, sample_text):
    from conftest import tiny_llama

    m = tiny_llama()
    ids = C.tokenize_corpus(tok, sample_text[:2000])
    cfg = ADV.AdversarialConfig(epsilons=(0.05, 0.2), pgd_steps=2, n_windows=2, prompt_len=12, continuation_len=4,
                                targeted_steps=2, gcg_steps=2, gcg_batch=4, gcg_topk=4, gcg_suffix_len=2,
                                defence_steps=2, max_new_tokens=4, progress=False)
    res = ADV.test_adversarial_robustness(m, tok, ids, cfg)
    assert len(res["table"]) == 4 and res["n_samples"] == 3
    assert set(res["answers"]) == {C.SAMPLE_PROMPT}
    assert 0 <= res["targeted"]["success_rate"] <= 1
    assert "delta_nll_after" in res["adversarial_training"]
    with pytest.raises(C.UserError, match="attack windows"):
        ADV.test_adversarial_robustness(m, tok, ids[:20], cfg)


@pytest.mark.parametrize("kw,msg", [(dict(epsilon=-1), "--attack-eps"), (dict(method="cw"), "--attack"),
                                    (dict(norm="l1"), "--attack-norm")])
def test_bad_attack_config(kw, msg):
    with pytest.raises(C.UserError, match=msg):
        ADV.validate(ADV.AttackConfig(**kw))


def test_lora_defence_trains_adapters_and_leaves_the_model_unchanged(tok, sample_text):
    from conftest import tiny_llama

    m = tiny_llama(seed=2)
    ids = C.tokenize_corpus(tok, sample_text[:4000])
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = ADV.AdversarialConfig(epsilons=(0.2,), pgd_steps=2, n_windows=2, prompt_len=12, continuation_len=4,
                                targeted_steps=2, gcg_steps=1, gcg_batch=4, gcg_topk=4, gcg_suffix_len=2,
                                defence_steps=3, defence_lr=1e-2, defence_lora_r=4, max_new_tokens=4,
                                progress=False)
    res = ADV.test_adversarial_robustness(m, tok, ids, cfg)
    d = res["adversarial_training"]
    assert d["trained"] == "LoRA adapters, r=4"
    assert d["delta_nll_after"] != d["delta_nll_before"]  # the adapters were active for the "after" attacks
    assert type(m).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in m.named_modules())
    assert set(m.state_dict()) == set(snap) and all(torch.equal(snap[k], v) for k, v in m.state_dict().items())
