"""FGSM/PGD on embeddings (llm_attacks), GCG (llm_gcg), defences and the adversarial step on tiny models."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import llm_adversarial_test as ADV
import llm_attacks as A
import llm_common as C
import llm_data as D
import llm_gcg as G
import llm_model as LM
import llm_variants as V
from conftest import make_tokenizer


def _samples(n=3, P=12, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [A.Sample(torch.randint(0, 256, (P,), generator=g), torch.randint(0, 256, (T,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_epsilon_changes_nothing(tiny_model, method, norm):
    s = _samples(1)[0]
    r = A.attack_embeddings(tiny_model, s, A.AttackConfig(method=method, norm=norm, epsilon=0.0))
    assert r.attacked_nll == r.clean_nll and r.top1_agreement == 1.0
    assert torch.count_nonzero(r.delta) == 0


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("positions", ["prompt", "suffix"])
def test_pgd_iterates_stay_in_the_ball(tiny_model, norm, positions):
    s = _samples(1)[0]
    cfg = A.AttackConfig(method="pgd", norm=norm, epsilon=0.3, steps=8, alpha=0.3, positions=positions,
                           suffix_len=4)
    r = A.attack_embeddings(tiny_model, s, cfg)
    assert r.max_norm <= r.radius * (1 + 1e-5)
    assert r.delta.shape[0] == (12 if positions == "prompt" else 4)
    if norm == "l2":  # the radius is relative to the mean embedding-row norm
        assert r.radius == pytest.approx(0.3 * A.mean_row_norm(tiny_model))


def test_pgd_beats_fgsm_and_both_raise_the_loss(tiny_model):
    samples = _samples(4)
    res = {}
    for method in ("fgsm", "pgd"):
        cfg = A.AttackConfig(method=method, norm="linf", epsilon=0.5, steps=10)
        res[method] = [A.attack_embeddings(tiny_model, s, cfg) for s in samples]
    for f, p in zip(res["fgsm"], res["pgd"]):
        assert f.attacked_nll > f.clean_nll and p.attacked_nll > p.clean_nll
    assert sum(r.attacked_nll for r in res["pgd"]) >= sum(r.attacked_nll for r in res["fgsm"])


def test_targeted_attack_reaches_target(tiny_llama):
    m = tiny_llama(seed=3, initializer_range=0.3)  # logits with real range, so targets are reachable
    s = A.Sample(torch.arange(40, 52), torch.tensor([101, 7, 202]))
    cfg = A.AttackConfig(method="pgd", norm="l2", epsilon=2.0, steps=80, alpha=0.2, objective="targeted")
    assert not A.targeted_success(m, s, None, cfg)
    r = A.attack_embeddings(m, s, cfg)
    assert r.attacked_nll < r.clean_nll
    assert A.targeted_success(m, s, r.delta, cfg)


def test_parameters_frozen_and_unchanged(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    A.attack_embeddings(tiny_model, _samples(1)[0], A.AttackConfig(epsilon=0.2, steps=3))
    assert all(p.grad is None for p in tiny_model.parameters())
    assert {n: p.requires_grad for n, p in tiny_model.named_parameters()} == flags
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_gcg_lowers_target_loss_with_printable_suffix(tok, tiny_llama):
    m = tiny_llama(seed=1)
    s = A.Sample(torch.tensor(tok("Hello there").input_ids), torch.tensor(tok(" ok").input_ids))
    r = G.gcg_attack(m, tok, s, G.GCGConfig(suffix_len=4, steps=8, topk=16, batch=16, progress=False))
    assert r.final_loss <= r.initial_loss and len(r.suffix_ids) == 4
    assert r.suffix_text.isascii() and r.suffix_text.isprintable()


def test_gcg_candidates_are_single_swaps_to_top_gradient_tokens_that_a_user_can_send(tok):
    """Each sampled candidate differs from the suffix in at most one position, by a token among
    the top-k of the negative one-hot gradient there (never a forbidden one); filtering keeps
    exactly the candidates whose text re-tokenizes to themselves."""
    g = torch.Generator().manual_seed(0)
    suffix = torch.tensor(tok(" abcd", add_special_tokens=False).input_ids)
    grad = torch.randn(suffix.numel(), 257, generator=g)
    grad[:, 200:] = float("inf")  # forbidden tokens
    cands = G.sample_ids_from_grad(suffix, grad, topk=5, batch=64, g=g)
    assert cands.shape == (64, suffix.numel())
    for c in cands:
        diff = (c != suffix).nonzero().flatten().tolist()
        assert len(diff) <= 1
        for p in diff:
            assert int(c[p]) in set((-grad[p]).topk(5).indices.tolist()) and int(c[p]) < 200
    turn = G.UserTurn.of_ids(tok, torch.tensor(tok("Hi").input_ids))
    kept, dropped = G.filter_ids(cands, turn)
    assert len(kept) + dropped == 64
    assert all(tok(tok.decode(turn.before) + tok.decode(c), add_special_tokens=False).input_ids
               == turn.before.tolist() + c.tolist() for c in kept)
    with pytest.raises(C.UserError, match="objective"):
        G.GCGConfig(objective="sideways").validate()


def test_perplexity_filter_is_calibrated_and_measured_on_held_out_prompts(tok, tiny_llama):
    """The threshold comes from calibration prompts only; FPR and TPR are counted on other
    prompts, each perplexity equal to exp(mean NLL) of a plain forward pass on the user text."""
    m = tiny_llama()
    g = torch.Generator().manual_seed(0)
    cal = [torch.randint(0, 256, (12,), generator=g) for _ in range(5)]
    held = [torch.randint(0, 256, (12,), generator=g) for _ in range(40)]
    attacked = [torch.cat([x, torch.tensor([255] * 6)]) for x in held[:10]]
    out = A.perplexity_filter(m, cal, held, attacked, window=4)

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


@pytest.mark.parametrize("train,steps,lr", [("pgd", 30, 3e-3), ("free", 120, 1e-3)])
def test_adversarial_training_reduces_delta_nll_and_restores(tiny_llama, train, steps, lr):
    """PGD-AT (30 steps of PGD-4: 150 backward passes) and Free-AT (120 one-pass steps) both lower
    PGD's delta NLL, and the weights are restored bit for bit on exit."""
    m = tiny_llama(seed=2)
    samples = _samples(3)
    cfg = A.AttackConfig(method="pgd", norm="linf", epsilon=0.5, steps=4, seed=5)
    fit = A.adversarial_finetune if train == "pgd" else A.free_adversarial_finetune
    before = sum(A.attack_embeddings(m, s, cfg).delta_nll for s in samples)
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    with V.restored_on_exit(m, [n for n, _ in m.named_parameters()]):
        fit(m, samples, cfg, steps=steps, lr=lr, progress=False)
        after = sum(A.attack_embeddings(m, s, cfg).delta_nll for s in samples)
    assert after < before
    assert all(torch.equal(snap[k], v) for k, v in m.state_dict().items())


def test_free_adversarial_training_is_shafahis_algorithm_one_pass_per_step(tiny_llama):
    """Free-AT against an independent loop written from Shafahi et al.'s Algorithm 1 with plain
    HF calls: per step one forward+backward at x + delta, one AdamW step with its weight
    gradient, delta += eps * sign(its input gradient), clipped to the cube. Same losses, same
    weights; and the counter sees one forward and one backward per step."""
    import copy

    m = tiny_llama(seed=2)
    ref = copy.deepcopy(m)
    samples = _samples(3)
    cfg = A.AttackConfig(method="pgd", norm="linf", epsilon=0.5, steps=4)
    with ADV.counted_passes(m) as n:
        losses = A.free_adversarial_finetune(m, samples, cfg, steps=3, lr=1e-2, progress=False)
    assert (n["forward"], n["backward"]) == (3, 3)

    emb = ref.get_input_embeddings().weight
    r = 0.5 * float(emb.detach().norm(dim=-1).mean()) / emb.shape[1] ** 0.5
    ids = torch.stack([torch.cat([s.prompt, s.continuation]) for s in samples])
    P, T = samples[0].prompt.numel(), samples[0].continuation.numel()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    delta = torch.zeros(len(samples), P, emb.shape[1])
    ref_losses = []
    for _ in range(3):
        delta.requires_grad_(True)
        x = ref.get_input_embeddings()(ids).detach()
        x = torch.cat([x[:, :P] + delta, x[:, P:]], 1)
        logits = ref(inputs_embeds=x).logits[:, P - 1:P - 1 + T]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, P:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        delta = (delta.detach() + r * delta.grad.sign()).clamp(-r, r)
        ref_losses.append(float(loss))
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    for (k, a), b in zip(m.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


@pytest.mark.parametrize("defence", ["free", "pgd", "none"])
def test_defence_records_which_ran_and_its_passes(tok, sample_text, tiny_llama, defence):
    m = tiny_llama(seed=2)
    ids = D.tokenize_corpus(tok, sample_text[:4000])
    cfg = ADV.AdversarialConfig(epsilons=(0.2,), pgd_steps=3, n_windows=2, prompt_len=12, continuation_len=4,
                                targeted_steps=2, gcg_steps=1, gcg_batch=4, gcg_topk=4, gcg_suffix_len=2,
                                defence=defence, defence_steps=4, max_new_tokens=2, progress=False)
    d = ADV.test_adversarial_robustness(m, tok, ids, cfg).adversarial_training
    assert d["defence"] == defence
    if defence == "none":
        assert "delta_nll_after" not in d and "passes" not in d
        return
    p = d["passes"]["training"]
    # Free-AT: one forward+backward per step; PGD-AT: per step the attack's clean pass, its
    # 3 steps and its final pass, then the training pass: 3 + 1 backward, 3 + 3 forward.
    want = (4, 4) if defence == "free" else (4 * 6, 4 * 4)
    assert (p["forward"], p["backward"]) == want
    assert p["tokens"] == want[0] * 2 * 16  # 2 windows of 12 + 4 tokens
    assert d["passes"]["attacks_before_after"]["backward"] == 2 * 3
    assert d["delta_nll_after"] != d["delta_nll_before"]


def test_defence_budget_and_flag():
    import llm_cli as CLI
    import llm_config as K

    assert K.AdversarialConfig().resolved(gpu=True).defence == "free" == K.AdversarialConfig().resolved(False).defence
    assert CLI.from_args(CLI.add_arguments(CLI.OneLineParser()).parse_args(["--defence", "pgd"])).adversarial.defence \
        == "pgd"
    with pytest.raises(C.UserError, match="--defence"):
        K.AdversarialConfig(defence="trades").resolved(False).validate()


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
        A.validate(A.AttackConfig(**kw))


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
    samples = [A.Sample(torch.randint(0, 256, (P,), generator=g), torch.randint(0, 256, (T,), generator=g))
               for P, T in ((12, 6), (7, 3), (15, 5))]
    cfgs = [A.AttackConfig(method="pgd", norm="l2", epsilon=0.3, steps=4, seed=3),
            A.AttackConfig(method="fgsm", norm="l2", epsilon=0.2),
            A.AttackConfig(method="pgd", norm="l2", epsilon=0.5, steps=2, objective="targeted", seed=4)]
    jobs = [(s, c) for s in samples for c in cfgs]
    batched = A.attack_batch(tiny_model, jobs)
    for (s, c), b in zip(jobs, batched):
        alone = A.attack_embeddings(tiny_model, s, c)
        assert b.clean_nll == pytest.approx(alone.clean_nll, abs=1e-4)
        assert b.attacked_nll == pytest.approx(alone.attacked_nll, abs=1e-3)
        assert torch.allclose(b.delta, alone.delta, atol=1e-3)


def test_pgd_reports_its_best_iterate(tiny_model):
    cfg = A.AttackConfig(method="pgd", norm="linf", epsilon=0.5, steps=6, alpha=0.5, seed=2)
    for s in _samples(4, seed=5):
        r = A.attack_embeddings(tiny_model, s, cfg)
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
    got = A.greedy_batch(tiny_model, [emb(torch.tensor(p)).detach() for p in prompts], 6)
    assert got == [plain(p, 6) for p in prompts]


def _templated(tok, template):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


TRIM_TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] | trim }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _server_ids(t, content):
    """What a chat server feeds the model for this user message (HF's own tokenizing path)."""
    return list(t.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"])


def _target_nll(m, ids, target):
    """Mean NLL (nats) of ``target`` after ``ids``, one plain forward."""
    x = torch.cat([torch.as_tensor(ids), target])[None]
    with torch.no_grad():
        logp = torch.log_softmax(m(input_ids=x).logits[0, -target.numel() - 1:-1].float(), -1)
    return float(-logp[torch.arange(target.numel()), target].mean())


def test_gcg_suffix_sits_inside_the_user_turn_and_is_what_a_user_sends(tok, tiny_llama):
    t = _templated(tok, TRIM_TEMPLATE)
    turn = G.UserTurn(t, "Name a film")
    suffix = torch.tensor(t(" xyz!", add_special_tokens=False).input_ids)
    text = t.apply_chat_template([{"role": "user", "content": "Name a film xyz!"}], add_generation_prompt=True,
                                 tokenize=False)
    assert t.decode(torch.cat([turn.before, suffix, turn.after])) == text
    assert t.decode(turn.after) == "<|end|><|assistant|>"
    assert G.chat_parts(t, "Name a film")[0].tolist() == turn.before.tolist()
    m = tiny_llama(seed=1)
    target = torch.tensor(t(" ok").input_ids)
    r = G.gcg_attack(m, t, A.Sample(turn.before, target), G.GCGConfig(suffix_len=3, steps=4, topk=8, batch=8,
                                                                     progress=False), turn=turn)
    assert r.final_loss <= r.initial_loss and len(r.losses) == 4
    assert r.in_context and r.user_message == "Name a film" + r.suffix_text
    real = _server_ids(t, r.user_message)
    assert real == turn.before.tolist() + r.suffix_ids + turn.after.tolist()
    assert r.final_loss == pytest.approx(_target_nll(m, real, target), abs=1e-4)  # the loss of the real text
    assert "user turn" in r.search_space and r.candidates_scored > 1


def test_in_context_check_accepts_exactly_what_a_server_tokenizes_back(tok):
    """Random GCG-like candidates under a template that trims the user's message (as
    Llama-2's does): a suffix ending in whitespace is sent as other ids and must be rejected;
    every accepted one re-tokenizes, through HF's own chat tokenization, to the scored ids."""
    t = _templated(tok, TRIM_TEMPLATE)
    turn = G.UserTurn(t, "Name a film")
    allowed = G.printable_token_mask(t, 257).nonzero().flatten()
    g = torch.Generator().manual_seed(0)
    cands = allowed[torch.randint(0, allowed.numel(), (400, 3), generator=g)]
    cands[::4, -1] = t(" ", add_special_tokens=False).input_ids[0]  # a trailing space: trimmed by the template
    ok = G.UserTurn(t, "Name a film").in_context(cands)
    scored = [turn.before.tolist() + c.tolist() + turn.after.tolist() for c in cands]
    real = [_server_ids(t, "Name a film" + t.decode(c)) for c in cands]
    assert ok.tolist() == [r == s for r, s in zip(real, scored)]
    assert 100 <= int((~ok).sum()) < 400  # both outcomes happen


@pytest.fixture(scope="module")
def smol_tok():
    """SmolLM2-135M-Instruct's tokenizer alone: from the dequantized cache when it exists,
    else read from the embedded GGUF (no weights are dequantized)."""
    from transformers import AutoTokenizer

    try:
        gguf = LM.embedded_gguf_path()
    except C.UserError as e:
        pytest.skip(str(e))
    cached = LM._gguf_cache_dir(gguf, LM.DEFAULT_CACHE_DIR)
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.mark.parametrize("prompt", [LM.SAMPLE_PROMPT, LM.SAMPLE_PROMPT + " "])
def test_in_context_check_on_smollm2s_template(smol_tok, prompt):
    """SmolLM2's byte-level BPE: a prompt ending in a space leaves a lone space token before
    the suffix, which a suffix starting with a letter merges into (the issue's 32.7%). Over
    600 GCG-like candidates (random suffixes and single-token swaps), the check accepts
    exactly those whose chat text, tokenized by HF's own chat path, gives the scored ids."""
    t = smol_tok
    turn = G.UserTurn(t, prompt)
    allowed = G.printable_token_mask(t, len(t)).nonzero().flatten()
    g = torch.Generator().manual_seed(1)
    cands = allowed[torch.randint(0, allowed.numel(), (300, 6), generator=g)]
    swaps = cands[:1].repeat(300, 1)
    swaps[torch.arange(300), torch.randint(0, 6, (300,), generator=g)] = \
        allowed[torch.randint(0, allowed.numel(), (300,), generator=g)]
    cands = torch.cat([cands, swaps])
    ok = turn.in_context(cands)
    scored = [turn.before.tolist() + c.tolist() + turn.after.tolist() for c in cands]
    real = [_server_ids(t, prompt + t.decode(c)) for c in cands]
    assert ok.tolist() == [r == s for r, s in zip(real, scored)]
    rejected = int((~ok).sum())
    lone_space = t.decode(turn.before[-1:]) == " "
    assert lone_space == prompt.endswith(" ")
    # Both outcomes happen (how many merge into a lone space depends on the draw: the swaps all share
    # the first candidate's tokens; issue 33's narrower search space drew one that does not merge).
    assert 30 < rejected < 570


def test_in_context_check_on_bare_ids(tok):
    turn = G.UserTurn.of_ids(tok, torch.tensor(tok("Hello").input_ids))
    cands = torch.tensor([tok(" ab").input_ids, tok("cd!").input_ids])
    assert turn.in_context(cands).tolist() == [True, True]
    assert turn.message("xy") == "Helloxy"


def test_defence_trains_on_windows_disjoint_from_the_attacked_ones():
    """The adversarial fine-tune's windows (offset 0.5) share no token position with the
    attack samples (offset 0), so a lower delta NLL on the samples is not memorisation."""
    ids = torch.arange(4000)
    cfg = ADV.AdversarialConfig(n_windows=4, prompt_len=24, continuation_len=8)
    attacked = ADV._windows(ids, 4, cfg)
    trained = ADV._windows(ids, 4, cfg, offset=0.5)
    span = lambda s: set(s.prompt.tolist()) | set(s.continuation.tolist())  # noqa: E731  ids == positions here
    assert not set().union(*map(span, attacked)) & set().union(*map(span, trained))


def test_report_names_the_defence_and_its_passes():
    import llm_report_labels as L

    at = {"defence": "free", "steps": 4, "eps": 0.1, "delta_nll_before": 0.5, "delta_nll_after": 0.25,
          "passes": {"training": {"forward": 4, "backward": 4}}}
    assert L.defence_line(at) == ("Adversarial fine-tune (free, 4 steps, 4 forward / 4 backward passes): "
                                  "delta NLL at eps 0.1 0.5 -> 0.25 on held-out samples.")
    assert "off" in L.defence_line({"defence": "none"})
    old = {k: v for k, v in at.items() if k not in ("defence", "passes")}  # results from before the field
    assert L.defence_line(old).startswith("Adversarial fine-tune (pgd, 4 steps)")
    # Issue 32: "0.1009 -> 0.1009" said nothing changed in numbers only; 0 steps never ran
    same = {**at, "delta_nll_before": 0.10091, "delta_nll_after": 0.100912}
    assert "nothing changed: delta NLL at eps 0.1 stays 0.1009" in L.defence_line(same)
    assert L.defence_finding(same)[0].endswith("changed nothing: PGD's delta NLL stays 0.1009 at eps=0.1.")
    assert L.defence_line({**at, "steps": 0}) == "Adversarial fine-tune (free): not run (0 steps)."
    assert L.defence_finding({**at, "steps": 0}) == [] and "->" not in L.defence_line(same)


def test_gcg_search_space_holds_no_special_token_of_smollm2(smol_tok):
    """Issue 33: every added token SmolLM2's tokenizer marks special (its 17 control tokens, of
    which only 3 are in all_special_ids) is out of GCG's search space, and so is every id a
    tokenizer.json lists as special."""
    import json as _json

    t = smol_tok
    allowed = set(G.printable_token_mask(t, len(t)).nonzero().flatten().tolist())
    marked = {i for i, tok_ in t.added_tokens_decoder.items() if tok_.special}
    assert len(marked) >= 17 and not marked & allowed
    named = {t.convert_tokens_to_ids(n) for n in ("<filename>", "<jupyter_code>", "<issue_start>", "<reponame>",
                                                  "<gh_stars>", "<jupyter_output>", "<|im_start|>", "<|endoftext|>")}
    assert len(named) == 8 and not named & allowed
    path = os.path.join(t.name_or_path, "tokenizer.json")
    if os.path.isfile(path):  # an independent reading: the file the tokenizer came from
        listed = {a["id"] for a in _json.load(open(path))["added_tokens"] if a["special"]}
        assert listed and not listed & allowed


@pytest.mark.parametrize("special", [True, False])
def test_an_added_token_is_left_out_exactly_when_marked_special(tok, special):
    from transformers import AddedToken

    t = make_tokenizer()
    t.add_tokens([AddedToken("<tool_call>", special=special)])
    i = t.convert_tokens_to_ids("<tool_call>")
    assert i not in t.all_special_ids
    assert bool(G.printable_token_mask(t, len(t))[i]) is (not special)


def test_clean_answers_are_the_evaluations_and_are_not_generated_again(tok, sample_text, tiny_llama, monkeypatch):
    """Issue 41: a variant's clean greedy answer to a sample prompt is what the evaluation step
    generated for it (same chat-template prompt, same length), so the attacks take it from the
    evaluation's ``generations`` and generate only the attacked answers."""
    from llm_perplexity import EvalConfig, evaluate_model

    m = tiny_llama()
    ids = D.tokenize_corpus(tok, sample_text[:2000])
    prompts = (LM.SAMPLE_PROMPT, "Name a colour.")
    cfg = ADV.AdversarialConfig(epsilons=(0.2,), pgd_steps=2, n_windows=1, prompt_len=12, continuation_len=4,
                                max_new_tokens=6, prompts=prompts, progress=False).for_model(m)
    samples = ADV.build_samples(m, tok, ids, cfg)
    _, deltas = ADV._sweep(m, samples, cfg)
    fresh = ADV._answers(m, tok, samples[1:], deltas, cfg)
    gens = evaluate_model(m, tok, ids[:64], EvalConfig(seq_len=32, eval_tokens=64, prompts=prompts,
                                                       max_new_tokens=6, progress=False)).generations
    assert {p: a["clean"] for p, a in fresh.items()} == gens  # the same answers, two decoders
    calls = []
    real = ADV.greedy_batch
    monkeypatch.setattr(ADV, "greedy_batch", lambda model, embeds, *a: calls.append(len(embeds)) or real(model, embeds, *a))
    known = {LM.SAMPLE_PROMPT: "KNOWN"}
    got = ADV._answers(m, tok, samples[1:], deltas, cfg, known)
    assert calls == [3]  # both attacked answers and the one clean answer not known
    assert got[LM.SAMPLE_PROMPT]["clean"] == "KNOWN" and got["Name a colour."] == fresh["Name a colour."]
    assert {p: a["attacked"] for p, a in got.items()} == {p: a["attacked"] for p, a in fresh.items()}
    # What the pipeline hands the step: the evaluation's answers, only at the same answer length.
    results = {"protocol": {"config": {"max_new_tokens": 6}}, "evaluation": {"base": {"generations": gens},
                                                                              "v": {"generations": {}}}}
    assert ADV.clean_answers(results, cfg) == {"base": gens}
    results["protocol"]["config"]["max_new_tokens"] = 8
    assert ADV.clean_answers(results, cfg) == {}
    # Through the step: the model as it is (the variant whose weights are None) takes its own.
    calls.clear()
    cfg2 = ADV.AdversarialConfig(epsilons=(0.05, 0.2), pgd_steps=2, n_windows=2, prompt_len=12, continuation_len=4,
                                 targeted_steps=2, gcg_steps=2, gcg_batch=4, gcg_topk=4, gcg_suffix_len=2,
                                 defence="none", max_new_tokens=4, progress=False)
    res = ADV.test_adversarial_robustness(m, tok, ids, cfg2, variants={"base": None}, parents={"base": None},
                                          clean={"base": {LM.SAMPLE_PROMPT: "KNOWN"}})
    assert res.answers[LM.SAMPLE_PROMPT]["clean"] == "KNOWN" == res.variants["base"]["answers"][LM.SAMPLE_PROMPT]["clean"]
    assert calls == [1, 1]  # the samples' own answers (build_samples), then the attacked answer alone
