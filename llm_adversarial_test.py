"""Step 5: adversarial robustness: FGSM and PGD on input embeddings, GCG on tokens, defences.

A sample is (prompt ids, continuation ids). The attacks perturb the input embeddings of
the prompt tokens, or of ``suffix_len`` adversarial tokens appended to the prompt, and
    untargeted: raise the cross-entropy of the clean continuation;
    targeted:   lower the cross-entropy of a chosen target string.
Radii are relative to the mean L2 norm of the embedding matrix's rows (r_bar), as in
Xhonneux et al. 2024, so one eps means the same across models:
    l2    per-token ||delta_t||_2 <= eps * r_bar
    linf  |delta_ti| <= eps * r_bar / sqrt(d), the largest cube inside that L2 ball's
          bounding sphere scale (its diagonal is eps * r_bar).
FGSM takes one signed (linf) or normalised (l2) step of the full radius; PGD takes
``steps`` steps of size alpha from a random start and projects after each.

Only the embeddings receive gradients: parameters are frozen for the attack and restored
afterwards, and nothing runs under ``inference_mode``.

Beyond embeddings: ``gcg_attack`` is a greedy coordinate gradient search over printable
suffix tokens (Zou et al. 2023), whose suffix is real text. Defences: ``perplexity_filter``
flags prompts whose perplexity is above a threshold set on clean prompts, and
``adversarial_finetune`` trains briefly on PGD-perturbed embeddings (in place).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import llm_common as C

log = logging.getLogger("llm.adversarial")


@dataclass
class AttackConfig:
    method: str = "pgd"            # fgsm | pgd
    norm: str = "linf"             # linf | l2
    epsilon: float = 0.05          # relative to the mean embedding-row norm
    steps: int = 10                # PGD iterations
    alpha: Optional[float] = None  # PGD step, relative like epsilon; default 2.5 * eps / steps
    random_start: bool = True
    objective: str = "untargeted"  # untargeted | targeted
    positions: str = "prompt"      # prompt | suffix
    suffix_len: int = 8
    seed: int = 0


@dataclass
class Sample:
    prompt: torch.Tensor           # [P] token ids
    continuation: torch.Tensor     # [T] token ids scored (clean continuation, or the target)
    label: str = ""


@dataclass
class AttackResult:
    clean_nll: float               # mean nats/token of the continuation, clean input
    attacked_nll: float
    delta_nll: float
    top1_agreement: float          # attacked argmax == clean argmax, over continuation positions
    delta: Optional[torch.Tensor] = None  # [P', d] embedding perturbation (P' = prompt or suffix)
    losses: list = field(default_factory=list)  # objective after each step
    max_norm: float = 0.0          # largest per-token norm (l2) or |coordinate| (linf) over all iterates
    radius: float = 0.0            # the ball's radius in embedding units


def validate(cfg: AttackConfig) -> None:
    if cfg.method not in ("fgsm", "pgd"):
        raise C.UserError(f"--attack must be fgsm or pgd, not {cfg.method!r}")
    if cfg.norm not in ("linf", "l2"):
        raise C.UserError(f"--attack-norm must be linf or l2, not {cfg.norm!r}")
    if not cfg.epsilon >= 0 or math.isinf(cfg.epsilon):
        raise C.UserError(f"--attack-eps must be finite and >= 0, got {cfg.epsilon}")
    if cfg.steps < 1 or cfg.suffix_len < 1:
        raise C.UserError("--attack-steps and the suffix length must be >= 1")
    if cfg.objective not in ("untargeted", "targeted") or cfg.positions not in ("prompt", "suffix"):
        raise C.UserError("objective must be untargeted|targeted and positions prompt|suffix")


def mean_row_norm(model) -> float:
    return float(model.get_input_embeddings().weight.detach().float().norm(dim=-1).mean())


def _radius(model, cfg: AttackConfig, eps: float) -> float:
    r = eps * mean_row_norm(model)
    return r / math.sqrt(model.get_input_embeddings().weight.shape[1]) if cfg.norm == "linf" else r


def project(delta: torch.Tensor, radius: float, norm: str) -> torch.Tensor:
    """Project delta [P, d] onto the L-inf ball, or each row onto the L2 ball, of ``radius``."""
    if norm == "linf":
        return delta.clamp(-radius, radius)
    n = delta.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return delta * torch.clamp(radius / n, max=1.0)


def _embeds(model, ids: torch.Tensor) -> torch.Tensor:
    return model.get_input_embeddings()(ids.to(C.input_device(model))).detach()


def _layout(model, sample: Sample, cfg: AttackConfig, suffix_ids: Optional[torch.Tensor] = None):
    """(embeds [1, L, d], slice perturbed, index of continuation targets, target ids)."""
    parts = [sample.prompt]
    if cfg.positions == "suffix":
        if suffix_ids is None:  # neutral filler: "!" repeated, as in GCG's initial suffix
            suffix_ids = torch.full((cfg.suffix_len,), int(sample.prompt[-1]), dtype=torch.long)
        parts.append(suffix_ids)
    parts.append(sample.continuation)
    ids = torch.cat(parts)
    P = sample.prompt.numel()
    pert = slice(0, P) if cfg.positions == "prompt" else slice(P, P + (suffix_ids.numel()))
    T = sample.continuation.numel()
    start = ids.numel() - T
    return _embeds(model, ids)[None], pert, start, sample.continuation


def _cont_logits(model, embeds: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """Logits [T, V] predicting the continuation (positions start-1 .. start+T-2)."""
    logits = model(inputs_embeds=embeds, use_cache=False).logits[0, start - 1:start - 1 + T]
    return logits.float().to(embeds.device)  # with device_map="auto" the head may sit on another GPU


def attack_embeddings(model, sample: Sample, cfg: AttackConfig = AttackConfig()) -> AttackResult:
    """FGSM or PGD on one sample. The model's parameters are frozen and unchanged."""
    validate(cfg)
    embeds, pert, start, target = _layout(model, sample, cfg)
    target = target.to(embeds.device)
    T = target.numel()
    radius = _radius(model, cfg, cfg.epsilon)
    alpha_rel = cfg.alpha if cfg.alpha is not None else 2.5 * cfg.epsilon / cfg.steps
    alpha = _radius(model, cfg, alpha_rel) if cfg.method == "pgd" else radius
    sign = 1.0 if cfg.objective == "untargeted" else -1.0  # ascend CE, or descend towards target
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    with C.trainable_only(model, ()):
        with torch.no_grad():
            clean_logits = _cont_logits(model, embeds, start, T)
        clean_nll = float(F.cross_entropy(clean_logits, target))
        base = embeds[0, pert]
        delta = torch.zeros_like(base, dtype=torch.float32)
        if cfg.method == "pgd" and cfg.random_start and radius > 0:
            noise = torch.rand(delta.shape, generator=g).to(delta.device) * 2 - 1
            delta = project(noise * radius, radius, cfg.norm)
        losses = []
        max_norm = float(delta.abs().max() if cfg.norm == "linf" else delta.norm(dim=-1).max())
        n_steps = 1 if cfg.method == "fgsm" else cfg.steps
        for _ in range(n_steps if radius > 0 else 0):
            delta.requires_grad_(True)
            e = embeds.clone()
            e[0, pert] = base + delta.to(base.dtype)
            loss = F.cross_entropy(_cont_logits(model, e, start, T), target)
            grad, = torch.autograd.grad(loss, delta)
            losses.append(float(loss.detach()))
            with torch.no_grad():
                if cfg.norm == "linf":
                    step = grad.sign()
                else:
                    step = grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                delta = project(delta + sign * alpha * step, radius, cfg.norm).detach()
                seen = delta.abs().max() if cfg.norm == "linf" else delta.norm(dim=-1).max()
                max_norm = max(max_norm, float(seen))
        with torch.no_grad():
            e = embeds.clone()
            e[0, pert] = base + delta.to(base.dtype)
            adv_logits = _cont_logits(model, e, start, T)
        adv_nll = float(F.cross_entropy(adv_logits, target))
        agree = float((adv_logits.argmax(-1) == clean_logits.argmax(-1)).float().mean())
    return AttackResult(clean_nll, adv_nll, adv_nll - clean_nll, agree, delta.detach().cpu(), losses, max_norm,
                        radius)


@torch.no_grad()
def greedy_from_embeds(model, embeds: torch.Tensor, max_new_tokens: int, eos_id: Optional[int] = None) -> list:
    """Greedy decoding from input embeddings [1, L, d] (attacked prompts have no token ids)."""
    emb = model.get_input_embeddings()
    out = []
    e = embeds
    for _ in range(max_new_tokens):
        nxt = int(model(inputs_embeds=e, use_cache=False).logits[0, -1].argmax())
        if eos_id is not None and nxt == eos_id:
            break
        out.append(nxt)
        e = torch.cat([e, emb(torch.tensor([[nxt]], device=e.device)).to(e.dtype)], dim=1)
    return out


def attacked_generation(model, tokenizer, prompt_ids: torch.Tensor, delta: Optional[torch.Tensor],
                        max_new_tokens: int = 32) -> str:
    """Greedy answer to ``prompt_ids`` [P] with ``delta`` [P, d] added to its embeddings."""
    e = _embeds(model, prompt_ids)[None]
    if delta is not None:
        e = e.clone()
        e[0, :delta.shape[0]] += delta.to(e.device, e.dtype)
    return tokenizer.decode(greedy_from_embeds(model, e, max_new_tokens, tokenizer.eos_token_id),
                            skip_special_tokens=True).strip()


def targeted_success(model, sample: Sample, delta: torch.Tensor, cfg: AttackConfig,
                     suffix_ids: Optional[torch.Tensor] = None) -> bool:
    """Greedy decoding of the attacked prompt reproduces the target exactly."""
    embeds, pert, start, target = _layout(model, sample, cfg, suffix_ids)
    e = embeds[:, :start].clone()
    if delta is not None:
        e[0, pert] = e[0, pert] + delta.to(e.device, e.dtype)
    return greedy_from_embeds(model, e, target.numel()) == target.tolist()


# --------------------------------------------------------------------------- GCG


def printable_token_mask(tokenizer, vocab_size: int) -> torch.Tensor:
    """Tokens whose text is non-empty printable ASCII: suffixes made of them can be pasted."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ok = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(min(vocab_size, len(tokenizer))):
        if i in special:
            continue
        s = tokenizer.decode([i])
        ok[i] = bool(s.strip()) and s.isascii() and s.isprintable()
    return ok


@dataclass
class GCGResult:
    suffix_ids: list
    suffix_text: str
    losses: list
    initial_loss: float
    final_loss: float
    success: bool
    seconds: float


def gcg_attack(model, tokenizer, sample: Sample, suffix_len: int = 8, steps: int = 20, topk: int = 64,
               batch: int = 32, objective: str = "targeted", seed: int = 0, progress: bool = True) -> GCGResult:
    """Greedy coordinate gradient over suffix tokens appended to the prompt.

    Each step: the gradient of the objective w.r.t. the one-hot suffix [S, V] gives, per
    position, the ``topk`` most promising printable tokens; ``batch`` single-token swaps are
    sampled, evaluated exactly, and the best is kept if it improves the objective.
    """
    t0 = time.perf_counter()
    W = model.get_input_embeddings().weight
    allowed = printable_token_mask(tokenizer, W.shape[0]).to(W.device)
    g = torch.Generator().manual_seed(seed)
    allowed_ids = allowed.nonzero().flatten().cpu()
    suffix = allowed_ids[torch.randint(0, allowed_ids.numel(), (1,), generator=g)].repeat(suffix_len)
    sign = 1.0 if objective == "targeted" else -1.0  # we minimise sign * CE
    dev = C.input_device(model)
    P, T = sample.prompt.numel(), sample.continuation.numel()
    target = sample.continuation.to(dev)

    def objective_of(suffixes: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B]
        ids = torch.cat([sample.prompt.expand(len(suffixes), -1), suffixes.cpu(),
                         sample.continuation.expand(len(suffixes), -1)], dim=1).to(dev)
        logits = model(input_ids=ids, use_cache=False).logits[:, P + suffix_len - 1:P + suffix_len - 1 + T]
        logits = logits.float().to(dev)
        ce = F.cross_entropy(logits.transpose(1, 2), target.expand(len(suffixes), -1), reduction="none").mean(1)
        return sign * ce

    losses = []
    with C.trainable_only(model, ()):
        with torch.no_grad():
            best = float(objective_of(suffix[None])[0])
        initial = best
        for _ in tqdm(range(steps), desc="gcg", disable=not progress):
            onehot = F.one_hot(suffix.to(dev), W.shape[0]).to(W.dtype).requires_grad_(True)
            e = torch.cat([_embeds(model, sample.prompt), onehot @ W, _embeds(model, sample.continuation)])[None]
            logits = model(inputs_embeds=e, use_cache=False).logits[0, P + suffix_len - 1:P + suffix_len - 1 + T]
            loss = sign * F.cross_entropy(logits.float().to(dev), target)
            grad, = torch.autograd.grad(loss, onehot)
            grad = grad.float().masked_fill(~allowed[None, :], float("inf"))
            cand_tok = (-grad).topk(topk, dim=1).indices.cpu()  # [S, topk]
            pos = torch.randint(0, suffix_len, (batch,), generator=g)
            tok = cand_tok[pos, torch.randint(0, topk, (batch,), generator=g)]
            cands = suffix.repeat(batch, 1)
            cands[torch.arange(batch), pos] = tok
            with torch.no_grad():
                vals = objective_of(cands)
            i = int(vals.argmin())
            if float(vals[i]) < best:
                best, suffix = float(vals[i]), cands[i].clone()
            losses.append(sign * best)
    ok = False
    if objective == "targeted":
        ok = targeted_success(model, sample, None, AttackConfig(positions="suffix", suffix_len=suffix_len), suffix)
    return GCGResult(suffix.tolist(), tokenizer.decode(suffix), losses, sign * initial, sign * best, ok,
                     time.perf_counter() - t0)


# --------------------------------------------------------------------------- defences


@torch.no_grad()
def sequence_perplexity(model, ids: torch.Tensor) -> float:
    ids = ids[None].to(C.input_device(model))
    return math.exp(min(709.0, float(model(input_ids=ids, labels=ids, use_cache=False).loss)))


def perplexity_filter(model, clean: Sequence[torch.Tensor], attacked: Sequence[torch.Tensor],
                      margin: float = 1.0) -> dict:
    """Flag prompts whose perplexity exceeds ``margin`` x the largest clean-prompt perplexity.

    Returns the threshold, the perplexities, and the flagged fractions (attacked: detection
    rate; clean: false-positive rate, 0 by construction at margin >= 1)."""
    cp = [sequence_perplexity(model, x) for x in clean]
    ap = [sequence_perplexity(model, x) for x in attacked]
    thr = margin * max(cp)
    return {"threshold": thr, "clean_ppl": cp, "attacked_ppl": ap,
            "detection_rate": sum(p > thr for p in ap) / max(len(ap), 1),
            "false_positive_rate": sum(p > thr for p in cp) / max(len(cp), 1)}


def adversarial_finetune(model, samples: Sequence[Sample], cfg: AttackConfig, steps: int = 6, lr: float = 1e-5,
                         seed: int = 0, progress: bool = True) -> list:
    """Embedding-space adversarial training, in place: each step finds a PGD perturbation
    for one sample and takes an AdamW step on the clean continuation's loss under it.
    Returns the training losses. Wrap in ``C.restored_on_exit`` to undo."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    was_training = model.training
    for step in tqdm(range(steps), desc="adversarial fine-tune", disable=not progress):
        s = samples[step % len(samples)]
        r = attack_embeddings(model, s, AttackConfig(**{**cfg.__dict__, "seed": seed + step}))
        embeds, pert, start, target = _layout(model, s, cfg)
        e = embeds.clone()
        e[0, pert] = e[0, pert] + r.delta.to(e.device, e.dtype)
        with C.trainable_only(model, params):
            model.train()
            loss = F.cross_entropy(_cont_logits(model, e, start, target.numel()), target.to(e.device))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.train(was_training)
    model.eval()
    return losses


# --------------------------------------------------------------------------- driver


@dataclass
class AdversarialConfig:
    epsilons: tuple = (0.02, 0.05, 0.1)
    norm: str = "linf"
    pgd_steps: int = 5
    n_windows: int = 4              # text windows from the evaluation corpus
    prompt_len: int = 32
    continuation_len: int = 16
    sample_prompts: tuple = (C.SAMPLE_PROMPT,)
    target: str = " Star Wars"      # targeted attack's target continuation
    targeted_eps: float = 0.2
    targeted_steps: int = 20
    gcg_steps: int = 10
    gcg_batch: int = 16
    gcg_topk: int = 32
    gcg_suffix_len: int = 6
    defence_steps: int = 6
    defence_lr: float = 1e-5
    max_new_tokens: int = 24
    seed: int = 0
    progress: bool = True


def _chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        return enc["input_ids"][0]
    return torch.tensor(tokenizer(prompt).input_ids)


def build_samples(model, tokenizer, eval_ids: torch.Tensor, cfg: AdversarialConfig) -> list[Sample]:
    """Text windows (prompt + its true continuation) and sample prompts (prompt + the
    model's own clean greedy answer)."""
    L = cfg.prompt_len + cfg.continuation_len
    if eval_ids.numel() < L * cfg.n_windows:
        raise C.UserError(f"evaluation text has {eval_ids.numel()} tokens, fewer than {cfg.n_windows} "
                          f"attack windows of {L}")
    step = eval_ids.numel() // cfg.n_windows
    out = [Sample(eval_ids[i * step:i * step + cfg.prompt_len],
                  eval_ids[i * step + cfg.prompt_len:i * step + L], f"window {i}") for i in range(cfg.n_windows)]
    for p in cfg.sample_prompts:
        ids = _chat_ids(tokenizer, p)
        ans = greedy_from_embeds(model, _embeds(model, ids)[None], cfg.continuation_len, tokenizer.eos_token_id)
        if ans:
            out.append(Sample(ids, torch.tensor(ans), p))
    return out


def test_adversarial_robustness(model, tokenizer, eval_ids: torch.Tensor,
                                config: AdversarialConfig = AdversarialConfig()) -> dict:
    """ΔNLL vs eps for FGSM and PGD, targeted success, answers under attack, GCG, and the
    two defences measured before and after. The model's weights are unchanged on return."""
    t0 = time.perf_counter()
    secs = {}
    samples = build_samples(model, tokenizer, eval_ids, config)
    table = []
    for eps in tqdm(config.epsilons, desc="attack eps sweep", disable=not config.progress):
        for method in ("fgsm", "pgd"):
            acfg = AttackConfig(method=method, norm=config.norm, epsilon=eps, steps=config.pgd_steps,
                                seed=config.seed)
            rs = [attack_embeddings(model, s, acfg) for s in samples]
            table.append({"method": method, "eps": eps, "clean_nll": _mean(r.clean_nll for r in rs),
                          "attacked_nll": _mean(r.attacked_nll for r in rs),
                          "delta_nll": _mean(r.delta_nll for r in rs),
                          "top1_agreement": _mean(r.top1_agreement for r in rs)})
    secs["sweep"] = time.perf_counter() - t0

    # Answers to the sample prompts, clean and under the strongest PGD attack.
    t = time.perf_counter()
    answers = {}
    strongest = AttackConfig(method="pgd", norm=config.norm, epsilon=max(config.epsilons), steps=config.pgd_steps,
                             seed=config.seed)
    for s in samples[config.n_windows:]:
        r = attack_embeddings(model, s, strongest)
        answers[s.label] = {"clean": attacked_generation(model, tokenizer, s.prompt, None, config.max_new_tokens),
                            "attacked": attacked_generation(model, tokenizer, s.prompt, r.delta,
                                                            config.max_new_tokens),
                            "eps": strongest.epsilon}
    # Targeted: make every prompt continue with the target string.
    tgt = torch.tensor(tokenizer(config.target, add_special_tokens=False).input_ids)
    tcfg = AttackConfig(method="pgd", norm=config.norm, epsilon=config.targeted_eps, steps=config.targeted_steps,
                        objective="targeted", seed=config.seed)
    hits = []
    for s in samples:
        ts = Sample(s.prompt, tgt, s.label)
        r = attack_embeddings(model, ts, tcfg)
        hits.append(targeted_success(model, ts, r.delta, tcfg))
    targeted = {"target": config.target, "eps": config.targeted_eps, "steps": config.targeted_steps,
                "success_rate": sum(hits) / len(hits), "n": len(hits)}
    secs["targeted"] = time.perf_counter() - t

    # GCG on the first sample prompt (or the first window), targeted at the target string.
    t = time.perf_counter()
    gs = samples[config.n_windows] if len(samples) > config.n_windows else samples[0]
    gcg = gcg_attack(model, tokenizer, Sample(gs.prompt, tgt, gs.label), config.gcg_suffix_len, config.gcg_steps,
                     config.gcg_topk, config.gcg_batch, "targeted", config.seed, config.progress)
    secs["gcg"] = time.perf_counter() - t

    # Defence 1: perplexity filter on the GCG prompt against the clean prompts.
    clean_prompts = [s.prompt for s in samples]
    attacked_prompts = [torch.cat([gs.prompt, torch.tensor(gcg.suffix_ids)])]
    pfilter = perplexity_filter(model, clean_prompts, attacked_prompts)

    # Defence 2: adversarial fine-tune (undone afterwards), ΔNLL at the same eps before/after.
    t = time.perf_counter()
    dcfg = AttackConfig(method="pgd", norm=config.norm, epsilon=max(config.epsilons), steps=config.pgd_steps,
                        seed=config.seed + 99)
    before_rs = [attack_embeddings(model, s, dcfg) for s in samples]
    names = [n for n, p in model.named_parameters() if p.is_floating_point()]
    with C.restored_on_exit(model, names):
        train_losses = adversarial_finetune(model, samples, dcfg, config.defence_steps, config.defence_lr,
                                            config.seed, config.progress)
        after_rs = [attack_embeddings(model, s, dcfg) for s in samples]
    defence = {"eps": dcfg.epsilon, "steps": config.defence_steps, "lr": config.defence_lr,
               "delta_nll_before": _mean(r.delta_nll for r in before_rs),
               "delta_nll_after": _mean(r.delta_nll for r in after_rs),
               "clean_nll_before": _mean(r.clean_nll for r in before_rs),
               "clean_nll_after": _mean(r.clean_nll for r in after_rs),
               "train_losses": train_losses}
    secs["defence"] = time.perf_counter() - t
    secs["total"] = time.perf_counter() - t0
    return {"embedding_row_norm": mean_row_norm(model), "norm": config.norm, "n_samples": len(samples),
            "table": table, "answers": answers, "targeted": targeted,
            "gcg": {k: v for k, v in gcg.__dict__.items()}, "perplexity_filter": pfilter,
            "adversarial_training": defence, "seconds": secs}


test_adversarial_robustness.__test__ = False  # the historical name; not a pytest test


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def plot_attack_sweep(result: dict, path):
    fig, ax = C.new_figure(figsize=(6, 4))
    for method in ("fgsm", "pgd"):
        rows = sorted((r for r in result["table"] if r["method"] == method), key=lambda r: r["eps"])
        ax.plot([r["eps"] for r in rows], [r["delta_nll"] for r in rows], marker="o", label=method.upper())
    C.log_x_axis(ax, [r["eps"] for r in result["table"]])
    ax.set_xlabel(f"eps (relative to mean embedding norm, {result['norm']})")
    ax.set_ylabel("delta NLL (nats/token)")
    ax.legend()
    return C.save_figure(fig, path)
