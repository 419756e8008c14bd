"""FGSM/PGD on embeddings, GCG, and defences on tiny models."""
import math

import pytest
import torch

import llm_adversarial_test as ADV
import llm_common as C
import llm_data as D
import llm_model as LM
import llm_variants as V


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


def test_targeted_attack_reaches_target(tiny_llama):
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


def test_gcg_lowers_target_loss_with_printable_suffix(tok, tiny_llama):
    m = tiny_llama(seed=1)
    s = ADV.Sample(torch.tensor(tok("Hello there").input_ids), torch.tensor(tok(" ok").input_ids))
    r = ADV.gcg_attack(m, tok, s, suffix_len=4, steps=8, topk=16, batch=16, progress=False)
    assert r.final_loss <= r.initial_loss and len(r.suffix_ids) == 4
    assert r.suffix_text.isascii() and r.suffix_text.isprintable()


def test_perplexity_filter_is_calibrated_and_measured_on_held_out_prompts(tok, tiny_llama):
    """The threshold comes from calibration prompts only; FPR and TPR are counted on other
    prompts, each perplexity equal to exp(mean NLL) of a plain forward pass on the user text."""
    m = tiny_llama()
    g = torch.Generator().manual_seed(0)
    cal = [torch.randint(0, 256, (12,), generator=g) for _ in range(5)]
    held = [torch.randint(0, 256, (12,), generator=g) for _ in range(40)]
    attacked = [torch.cat([x, torch.tensor([255] * 6)]) for x in held[:10]]
    out = ADV.perplexity_filter(m, cal, held, attacked, window=4)

    def ppl(x):
        return math.exp(float(m(input_ids=x[None], labels=x[None]).loss))

    thr = max(ppl(x) for x in cal)
    assert out["threshold"] == pytest.approx(thr, rel=1e-5)
    # With 5 calibration prompts, some of 40 held-out ones exceed their max: FPR is measured, not 0 by construction.
    assert out["false_positive_rate"] == pytest.approx(sum(ppl(x) > thr for x in held) / 40)
    assert out["true_positive_rate"] == pytest.approx(sum(ppl(x) > thr for x in attacked) / 10)
    assert out["heldout_prompts"] == 40 and out["windowed"]["window"] == 4
    def w(x):  # each token scored in its full context, then the worst 4 consecutive tokens
        logp = torch.log_softmax(m(input_ids=x[None]).logits[0, :-1].float(), -1)
        nll = -logp[torch.arange(x.numel() - 1), x[1:]]
        return max(math.exp(float(nll[i:i + 4].mean())) for i in range(nll.numel() - 3))

    assert out["windowed"]["threshold"] == pytest.approx(max(w(x) for x in cal), rel=1e-5)


def test_adversarial_finetune_reduces_delta_nll_and_restores(tiny_llama):
    m = tiny_llama(seed=2)
    samples = _samples(3)
    cfg = ADV.AttackConfig(method="pgd", norm="linf", epsilon=0.5, steps=4, seed=5)
    before = sum(ADV.attack_embeddings(m, s, cfg).delta_nll for s in samples)
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    with V.restored_on_exit(m, [n for n, _ in m.named_parameters()]):
        ADV.adversarial_finetune(m, samples, cfg, steps=30, lr=3e-3, progress=False)
        after = sum(ADV.attack_embeddings(m, s, cfg).delta_nll for s in samples)
    assert after < before
    assert all(torch.equal(snap[k], v) for k, v in m.state_dict().items())


def test_full_adversarial_step_on_tiny_model(tok, sample_text, tiny_llama):
    m = tiny_llama()
    ids = D.tokenize_corpus(tok, sample_text[:2000])
    cfg = ADV.AdversarialConfig(epsilons=(0.05, 0.2), pgd_steps=2, n_windows=2, prompt_len=12, continuation_len=4,
                                targeted_steps=2, gcg_steps=2, gcg_batch=4, gcg_topk=4, gcg_suffix_len=2,
                                defence_steps=2, max_new_tokens=4, progress=False)
    res = ADV.test_adversarial_robustness(m, tok, ids, cfg)
    assert len(res.table) == 4 and res.n_samples == 3
    assert set(res.answers) == {LM.SAMPLE_PROMPT}
    assert 0 <= res.targeted["success_rate"] <= 1
    assert "delta_nll_after" in res.adversarial_training
    assert res.config["pgd_steps"] == 2 and res.config["defence_lora_r"] is None
    with pytest.raises(C.UserError, match="attack windows"):
        ADV.test_adversarial_robustness(m, tok, ids[:20], cfg)


@pytest.mark.parametrize("kw,msg", [(dict(epsilon=-1), "--attack-eps"), (dict(method="cw"), "--attack"),
                                    (dict(norm="l1"), "--attack-norm")])
def test_bad_attack_config(kw, msg):
    with pytest.raises(C.UserError, match=msg):
        ADV.validate(ADV.AttackConfig(**kw))


def test_lora_defence_trains_adapters_and_leaves_the_model_unchanged(tok, sample_text, tiny_llama):
    m = tiny_llama(seed=2)
    ids = D.tokenize_corpus(tok, sample_text[:4000])
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = ADV.AdversarialConfig(epsilons=(0.2,), pgd_steps=2, n_windows=2, prompt_len=12, continuation_len=4,
                                targeted_steps=2, gcg_steps=1, gcg_batch=4, gcg_topk=4, gcg_suffix_len=2,
                                defence_steps=3, defence_lr=1e-2, defence_lora_r=4, max_new_tokens=4,
                                progress=False)
    res = ADV.test_adversarial_robustness(m, tok, ids, cfg)
    d = res.adversarial_training
    assert d["trained"] == "LoRA adapters, r=4"
    assert d["delta_nll_after"] != d["delta_nll_before"]  # the adapters were active for the "after" attacks
    assert type(m).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in m.named_modules())
    assert set(m.state_dict()) == set(snap) and all(torch.equal(snap[k], v) for k, v in m.state_dict().items())


def test_batched_attacks_equal_attacks_one_at_a_time(tiny_model):
    """Rows of different lengths (right-padded) and different configs in one batch give what
    each gives alone. L2 steps (normalised gradients) keep the comparison continuous."""
    g = torch.Generator().manual_seed(1)
    samples = [ADV.Sample(torch.randint(0, 256, (P,), generator=g), torch.randint(0, 256, (T,), generator=g))
               for P, T in ((12, 6), (7, 3), (15, 5))]
    cfgs = [ADV.AttackConfig(method="pgd", norm="l2", epsilon=0.3, steps=4, seed=3),
            ADV.AttackConfig(method="fgsm", norm="l2", epsilon=0.2),
            ADV.AttackConfig(method="pgd", norm="l2", epsilon=0.5, steps=2, objective="targeted", seed=4)]
    jobs = [(s, c) for s in samples for c in cfgs]
    batched = ADV.attack_batch(tiny_model, jobs)
    for (s, c), b in zip(jobs, batched):
        alone = ADV.attack_embeddings(tiny_model, s, c)
        assert b.clean_nll == pytest.approx(alone.clean_nll, abs=1e-4)
        assert b.attacked_nll == pytest.approx(alone.attacked_nll, abs=1e-3)
        assert torch.allclose(b.delta, alone.delta, atol=1e-3)


def test_pgd_reports_its_best_iterate(tiny_model):
    cfg = ADV.AttackConfig(method="pgd", norm="linf", epsilon=0.5, steps=6, alpha=0.5, seed=2)
    for s in _samples(4, seed=5):
        r = ADV.attack_embeddings(tiny_model, s, cfg)
        assert len(r.losses) == 6
        assert r.attacked_nll >= max(r.losses) - 1e-5  # every iterate was a candidate


def test_batched_greedy_with_cache_equals_a_plain_loop(tiny_model):
    def plain(ids, n):  # no cache, no batch: re-run the whole prefix for every token
        out = []
        with torch.no_grad():
            for _ in range(n):
                nxt = int(tiny_model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
                out.append(nxt)
        return out

    prompts = [[5, 6, 7, 8, 9], [100, 3], [42] * 9]
    emb = tiny_model.get_input_embeddings()
    got = ADV.greedy_batch(tiny_model, [emb(torch.tensor(p)).detach() for p in prompts], 6)
    assert got == [plain(p, 6) for p in prompts]


def test_gcg_suffix_sits_inside_the_user_turn_and_round_trips(tok, tiny_llama):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    before, after = ADV.chat_parts(t, "Name a film")
    suffix = torch.tensor(t("xyz!", add_special_tokens=False).input_ids)
    text = t.apply_chat_template([{"role": "user", "content": "Name a film xyz!"}], add_generation_prompt=True,
                                 tokenize=False)
    assert t.decode(torch.cat([before, suffix, after])) == text
    assert t.decode(after) == "<|end|><|assistant|>"
    r = ADV.gcg_attack(tiny_llama(seed=1), t, ADV.Sample(before, torch.tensor(t(" ok").input_ids)), suffix_len=3,
                       steps=4, topk=8, batch=8, progress=False, after=after)
    assert t(r.suffix_text, add_special_tokens=False).input_ids == r.suffix_ids
    assert r.final_loss <= r.initial_loss and len(r.losses) == 4


def test_defence_trains_on_windows_disjoint_from_the_attacked_ones():
    """The adversarial fine-tune's windows (offset 0.5) share no token position with the
    attack samples (offset 0), so a lower delta NLL on the samples is not memorisation."""
    ids = torch.arange(4000)
    cfg = ADV.AdversarialConfig(n_windows=4, prompt_len=24, continuation_len=8)
    attacked = ADV._windows(ids, 4, cfg)
    trained = ADV._windows(ids, 4, cfg, offset=0.5)
    span = lambda s: set(s.prompt.tolist()) | set(s.continuation.tolist())  # noqa: E731  ids == positions here
    assert not set().union(*map(span, attacked)) & set().union(*map(span, trained))
