"""Attacks on a causal LM's input embeddings, and the defences that work on embeddings and tokens.

A sample is (prompt ids, continuation ids). The attacks perturb the input embeddings of
the prompt tokens, or of ``suffix_len`` adversarial tokens appended to the prompt, and
    untargeted: raise the cross-entropy of the clean continuation;
    targeted:   lower the cross-entropy of a chosen target string.
Radii are relative to the mean L2 norm of the embedding matrix's rows (r_bar), as in
Xhonneux et al. 2024, so one eps means the same across models:
    l2    per-token ||delta_t||_2 <= eps * r_bar
    linf  |delta_ti| <= eps * r_bar / sqrt(d), the largest cube inside that L2 ball's
          bounding sphere scale (its diagonal is eps * r_bar).
FGSM takes one signed (linf) or normalised (l2) step of the full radius; PGD (Madry et al.
2018) takes ``steps`` steps of size alpha from a random start and projects after each.

Only the embeddings receive gradients: parameters are frozen for the attack and restored
afterwards, and nothing runs under ``inference_mode``.

Defences: ``perplexity_filter`` flags prompts whose perplexity is above a threshold set on
clean prompts; ``adversarial_finetune`` (PGD-AT) and ``free_adversarial_finetune`` (Free-AT)
train briefly on perturbed embeddings, in place, through the shared loop of ``llm_train``.
GCG, the attack on tokens, is ``llm_gcg``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import llm_common as C
import llm_model as LM
import llm_train as TR
from llm_perplexity import safe_exp

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


def embeds_of(model, ids: torch.Tensor) -> torch.Tensor:
    """The input embeddings [..., d] of token ids [...], on the embedding's device, detached."""
    return model.get_input_embeddings()(ids.to(LM.input_device(model))).detach()


def _layout(sample: Sample, cfg: AttackConfig, suffix_ids: Optional[torch.Tensor] = None):
    """(ids [L], perturbed slice, index of the first continuation token)."""
    parts = [sample.prompt]
    if cfg.positions == "suffix":
        if suffix_ids is None:  # neutral filler: the prompt's last token repeated, as GCG's "! ! !"
            suffix_ids = torch.full((cfg.suffix_len,), int(sample.prompt[-1]), dtype=torch.long)
        parts.append(suffix_ids)
    parts.append(sample.continuation)
    ids = torch.cat(parts)
    P = sample.prompt.numel()
    pert = slice(0, P) if cfg.positions == "prompt" else slice(P, P + suffix_ids.numel())
    return ids, pert, ids.numel() - sample.continuation.numel()


class _Rows:
    """A right-padded batch of attack rows and the positions where each is scored.

    embeds [B, L, d] clean input embeddings (model dtype); attn [B, L] attention mask, None
    when no row is padded; pert [B, L, 1] 1 at perturbed positions; rows/cols/targets [N]:
    the scored (row, position) pairs, where the logits at ``cols`` predict ``targets``.
    Right padding keeps every row's positions 0..len-1, so a row scores as it would alone.
    """

    def __init__(self, embeds, attn, pert, rows, cols, targets, ref=None):
        self.embeds, self.attn, self.pert = embeds, attn, pert
        self.rows, self.cols, self.targets = rows, cols, targets
        self.ref = ref  # [N] the clean argmax at each scored position, once known
        self.counts = torch.bincount(rows, minlength=embeds.shape[0]).clamp(min=1).to(embeds.device)

    @classmethod
    def build(cls, model, layouts: Sequence[tuple]) -> "_Rows":
        """``layouts``: (ids [L_i], perturbed slice, first continuation index) per row."""
        L = max(ids.numel() for ids, _, _ in layouts)
        pad = torch.zeros(len(layouts), L, dtype=torch.long)
        attn = torch.zeros(len(layouts), L, dtype=torch.long)
        pert = torch.zeros(len(layouts), L, 1)
        rows, cols, targets = [], [], []
        for i, (ids, sl, start) in enumerate(layouts):
            pad[i, :ids.numel()], attn[i, :ids.numel()] = ids, 1
            pert[i, sl] = 1.0
            T = ids.numel() - start
            rows.append(torch.full((T,), i))
            cols.append(torch.arange(start - 1, start - 1 + T))
            targets.append(ids[start:])
        dev = LM.input_device(model)
        embeds = embeds_of(model, pad)
        attn = None if bool(attn.all()) else attn.to(dev)
        return cls(embeds, attn, pert.to(dev, embeds.dtype), torch.cat(rows).to(dev), torch.cat(cols).to(dev),
                   torch.cat(targets).to(dev))

    def subset(self, idx: torch.Tensor) -> "_Rows":
        """The rows ``idx`` (sorted LongTensor on the rows' device), renumbered 0..len-1."""
        if idx.numel() == self.embeds.shape[0]:
            return self
        keep = torch.isin(self.rows, idx)
        remap = torch.full((self.embeds.shape[0],), -1, dtype=torch.long, device=idx.device)
        remap[idx] = torch.arange(idx.numel(), device=idx.device)
        return _Rows(self.embeds[idx], None if self.attn is None else self.attn[idx], self.pert[idx],
                     remap[self.rows[keep]], self.cols[keep], self.targets[keep],
                     None if self.ref is None else self.ref[keep])

    def agreement(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-row fraction [B] of scored positions whose argmax equals the clean one."""
        eq = (logits.argmax(-1) == self.ref.to(logits.device)).float()
        out = torch.zeros(self.embeds.shape[0], device=logits.device).index_add_(0, self.rows.to(logits.device), eq)
        return out.to(self.embeds.device) / self.counts


def _scored(model, rows: _Rows, delta: Optional[torch.Tensor] = None):
    """One forward pass: (per-row mean cross-entropy [B] in float32, scored logits [N, V]).

    Logits are computed only at the scored positions (``logits_to_keep`` with their union),
    not over the whole sequence and vocabulary. ``delta`` [B, L, d] is added at the
    perturbed positions. With ``device_map="auto"`` the head may sit on another GPU.
    """
    e = rows.embeds if delta is None else rows.embeds + (delta * rows.pert).to(rows.embeds.dtype)
    union, idx = torch.unique(rows.cols, return_inverse=True)
    out = model(inputs_embeds=e, attention_mask=rows.attn, use_cache=False, logits_to_keep=union).logits
    logits = out[rows.rows.to(out.device), idx.to(out.device)].float()
    ce = F.cross_entropy(logits, rows.targets.to(out.device), reduction="none")
    per_row = torch.zeros(rows.embeds.shape[0], device=out.device).index_add_(0, rows.rows.to(out.device), ce)
    return per_row.to(rows.embeds.device) / rows.counts, logits


def _radius_of(row_norm: float, dim: int, norm: str, eps: float) -> float:
    """The ball's radius in embedding units: eps x the mean row norm (L2, per token), or
    that divided by sqrt(d) for L-inf (see the module docstring)."""
    r = eps * row_norm
    return r / math.sqrt(dim) if norm == "linf" else r


def _project(d: torch.Tensor, rad: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """``d`` [B, L, d] projected per row onto the per-token L2 ball (``l2`` [B, 1, 1] True) or
    the L-inf cube of radius ``rad`` [B] (embedding units)."""
    r = rad[:, None, None]
    n = d.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return torch.where(l2, d * torch.clamp(r / n, max=1.0), d.clamp(-r, r))


def _ascent(grad: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """The unit ascent direction of a gradient [B, L, d]: per token normalised (L2 rows) or
    its sign (L-inf rows), as in Madry et al.'s PGD and Shafahi et al.'s Free-AT."""
    return torch.where(l2, grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-12), grad.sign())


def _chunks(model, n_rows: int, row_len: int, scored: int) -> list[slice]:
    """Row chunks that fit in memory: attack passes keep activations for the input gradient."""
    size = LM.auto_batch_size(model, row_len, n_rows, scored=scored, train=True, fraction=0.6, on_cpu=None)
    return [slice(i, min(i + size, n_rows)) for i in range(0, n_rows, size)]


def attack_batch(model, jobs: Sequence[tuple], suffixes: Optional[Sequence] = None) -> list[AttackResult]:
    """FGSM/PGD for every (Sample, AttackConfig) in ``jobs``, all rows batched together.

    Every step is one forward + backward over all rows still iterating (FGSM rows take
    one step, PGD rows ``steps``), then one final forward; the clean forward runs once per
    distinct sample. Logits are computed only where the continuation is scored, and no
    value is read back to the host inside the loop. PGD reports its best iterate (highest
    untargeted / lowest targeted loss over all iterates, the random start included);
    FGSM its one step. The model's parameters are frozen and unchanged.
    """
    for _, cfg in jobs:
        validate(cfg)
    layouts = [_layout(s, c, None if suffixes is None else suffixes[i]) for i, (s, c) in enumerate(jobs)]
    results: list[Optional[AttackResult]] = [None] * len(jobs)
    row_len = max(ids.numel() for ids, _, _ in layouts)
    scored = max(ids.numel() - st for ids, _, st in layouts)
    with LM.trainable_only(model, ()):
        # Clean pass, once per distinct (sample, layout).
        keys = [(id(s), c.positions, c.suffix_len) for s, c in jobs]
        uniq = list(dict.fromkeys(keys))
        first_of = {k: keys.index(k) for k in uniq}
        clean_nll, clean_arg = {}, {}
        with torch.no_grad():
            for ch in _chunks(model, len(uniq), row_len, scored):
                part = uniq[ch]
                rows = _Rows.build(model, [layouts[first_of[k]] for k in part])
                nll, logits = _scored(model, rows)
                arg = logits.argmax(-1)
                for i, k in enumerate(part):
                    clean_nll[k], clean_arg[k] = nll[i], arg[rows.rows.to(arg.device) == i]
        for ch in _chunks(model, len(jobs), row_len, scored):
            idx = list(range(len(jobs)))[ch]
            part = _attack_rows(model, [jobs[i] for i in idx], [layouts[i] for i in idx],
                                [clean_nll[keys[i]] for i in idx], [clean_arg[keys[i]] for i in idx])
            for i, r in zip(idx, part):
                results[i] = r
    return results


def _attack_rows(model, jobs, layouts, clean_nll, clean_arg) -> list[AttackResult]:
    rows = _Rows.build(model, layouts)
    rows.ref = torch.cat([a.to(rows.rows.device) for a in clean_arg])
    dev = rows.embeds.device
    B = len(jobs)
    cfgs = [c for _, c in jobs]
    rbar, dim = mean_row_norm(model), rows.embeds.shape[-1]  # once: it reads the whole embedding matrix
    radius = torch.tensor([_radius_of(rbar, dim, c.norm, c.epsilon) for c in cfgs], device=dev)
    alpha = torch.tensor([_radius_of(rbar, dim, c.norm, c.alpha if c.alpha is not None else 2.5 * c.epsilon / c.steps)
                          if c.method == "pgd" else float(r) for c, r in zip(cfgs, radius.tolist())], device=dev)
    n_steps = [0 if r == 0 else (1 if c.method == "fgsm" else c.steps) for c, r in zip(cfgs, radius.tolist())]
    sign = torch.tensor([1.0 if c.objective == "untargeted" else -1.0 for c in cfgs], device=dev)
    is_l2 = torch.tensor([c.norm == "l2" for c in cfgs], device=dev)[:, None, None]
    is_pgd = torch.tensor([c.method == "pgd" for c in cfgs], device=dev)
    clean_nll_t = torch.stack([x.to(dev) for x in clean_nll])

    def size(d, l2):  # [b]: the largest per-token L2 norm, or the largest |coordinate|
        return torch.where(l2[:, 0, 0], d.norm(dim=-1).amax(-1), d.abs().amax(dim=(1, 2)))

    delta = torch.zeros(rows.embeds.shape, dtype=torch.float32, device=dev)
    for i, c in enumerate(cfgs):  # random start: a private generator per row, seeded by its config
        if c.method == "pgd" and c.random_start and n_steps[i] > 0:
            g = torch.Generator().manual_seed(c.seed)
            r = float(radius[i])
            if c.norm == "linf":  # uniform in the cube
                u = (torch.rand(delta.shape[1:], generator=g) * 2 - 1) * r
            else:  # uniform in each token's L2 ball: random direction, radius r * U^(1/d)
                u = torch.randn(delta.shape[1:], generator=g)
                u = u / u.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                u = u * r * torch.rand(delta.shape[1], 1, generator=g) ** (1.0 / delta.shape[2])
            delta[i] = u.to(dev)
    delta = _project(delta, radius, is_l2) * rows.pert.float()
    best_val = torch.full((B,), -float("inf"), device=dev)   # best sign * loss over PGD iterates
    best_nll, best_agree = clean_nll_t.clone(), torch.ones(B, device=dev)
    best_delta = delta.clone()
    max_norm = size(delta, is_l2)  # over every iterate, the random start included
    hist = []  # per step: [B] losses (nan where a row was done), kept on the device

    def track(sel, d, nll, agree):  # PGD rows: keep the best iterate seen so far
        val = sign[sel] * nll
        better = is_pgd[sel] & (val > best_val[sel])
        best_val[sel] = torch.where(better, val, best_val[sel])
        best_nll[sel] = torch.where(better, nll, best_nll[sel])
        best_agree[sel] = torch.where(better, agree, best_agree[sel])
        best_delta[sel] = torch.where(better[:, None, None], d, best_delta[sel])

    for k in range(max(n_steps, default=0)):
        sel = torch.tensor([i for i in range(B) if k < n_steps[i]], device=dev)
        sub = rows.subset(sel)
        sub_l2 = is_l2[sel]
        d = delta[sel].requires_grad_(True)
        nll, logits = _scored(model, sub, d)
        grad, = torch.autograd.grad((sign[sel] * nll).sum(), d)  # ascend sign * loss, row by row
        with torch.no_grad():
            track(sel, d.detach(), nll.detach(), sub.agreement(logits.detach()))
            h = torch.full((B,), float("nan"), device=dev)
            hist.append(h.index_copy_(0, sel, nll.detach()))
            d = _project(d.detach() + alpha[sel][:, None, None] * _ascent(grad, sub_l2), radius[sel], sub_l2) \
                * sub.pert.float()
            delta[sel] = d
            max_norm[sel] = torch.maximum(max_norm[sel], size(d, sub_l2))
        del logits, grad
    with torch.no_grad():  # the last iterate
        sel = torch.arange(B, device=dev)
        nll, logits = _scored(model, rows, delta)
        agree = rows.agreement(logits)
        final_nll, final_agree = nll.clone(), agree.clone()
        track(sel, delta, nll, agree)
        use_best = is_pgd & torch.tensor([n > 0 for n in n_steps], device=dev)
        out_nll = torch.where(use_best, best_nll, final_nll)
        out_agree = torch.where(use_best, best_agree, final_agree)
        out_delta = torch.where(use_best[:, None, None], best_delta, delta)
        cpu = [t.cpu() for t in (clean_nll_t, out_nll, out_agree, max_norm, radius)]
        hist = torch.stack(hist, 1).cpu() if hist else torch.zeros(B, 0)
        out_delta = out_delta.cpu()
    res = []
    for i, (_, sl, _) in enumerate(layouts):
        c_nll, a_nll, agr, mx, rad = (float(t[i]) for t in cpu)
        losses = [x for x in hist[i].tolist() if not math.isnan(x)]
        res.append(AttackResult(c_nll, a_nll, a_nll - c_nll, agr, out_delta[i, sl].clone(), losses, mx, rad))
    return res


def attack_embeddings(model, sample: Sample, cfg: AttackConfig = AttackConfig()) -> AttackResult:
    """FGSM or PGD on one sample (``attack_batch`` with one job)."""
    return attack_batch(model, [(sample, cfg)])[0]


@torch.no_grad()
def greedy_batch(model, embeds: Sequence[torch.Tensor], max_new_tokens: int,
                 eos_id: Optional[int] = None, pad_id: int = 0) -> list[list]:
    """Greedy continuations of several input-embedding sequences ([L_i, d] each) at once.

    Left-padded into one batch and decoded with the KV cache (``generate`` derives the
    positions from the attention mask), so each answer equals its unbatched greedy decode.
    Attacked prompts have no token ids, hence embeddings. Stops at ``eos_id``.
    """
    if not embeds or max_new_tokens <= 0:
        return [[] for _ in embeds]
    L = max(e.shape[0] for e in embeds)
    d = embeds[0].shape[-1]
    dev = embeds[0].device
    E = torch.zeros(len(embeds), L, d, dtype=embeds[0].dtype, device=dev)
    M = torch.zeros(len(embeds), L, dtype=torch.long, device=dev)
    for i, e in enumerate(embeds):
        E[i, L - e.shape[0]:], M[i, L - e.shape[0]:] = e, 1
    with LM.use_cache(model, True):
        out = model.generate(inputs_embeds=E, attention_mask=M, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos_id, pad_token_id=pad_id if eos_id is None else eos_id,
                             top_p=None, top_k=None, temperature=None)
    res = []
    for row in out.tolist():  # generate returns only the new tokens when given embeddings alone
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        res.append(row[:max_new_tokens])
    return res


def perturbed_prompt(model, sample: Sample, delta: Optional[torch.Tensor], cfg: AttackConfig,
                     suffix_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Input embeddings [L', d] of the attacked prompt (and suffix), without the continuation."""
    ids, pert, start = _layout(sample, cfg, suffix_ids)
    e = embeds_of(model, ids[:start]).clone()
    if delta is not None:
        e[pert] = e[pert] + delta.to(e.device, e.dtype)
    return e


def targeted_success(model, sample: Sample, delta: Optional[torch.Tensor], cfg: AttackConfig,
                     suffix_ids: Optional[torch.Tensor] = None) -> bool:
    """Greedy decoding of the attacked prompt reproduces the target exactly."""
    return targeted_successes(model, [(sample, delta, cfg, suffix_ids)])[0]


def targeted_successes(model, items: Sequence[tuple]) -> list[bool]:
    """``targeted_success`` for many (sample, delta, cfg, suffix_ids) at once, in one batch."""
    embeds = [perturbed_prompt(model, s, d, c, suf) for s, d, c, suf in items]
    T = max(s.continuation.numel() for s, _, _, _ in items)
    outs = greedy_batch(model, embeds, T)
    return [o[:s.continuation.numel()] == s.continuation.tolist() for o, (s, _, _, _) in zip(outs, items)]


# --------------------------------------------------------------------------- the perplexity filter


@torch.no_grad()
def token_nll(model, seqs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-token NLL (nats) of each 1-D id sequence, [len - 1] each (token 0 has no context),
    for all sequences in right-padded batches sized from free memory."""
    out: list[torch.Tensor] = []
    seqs = list(seqs)
    dev = LM.input_device(model)
    L = max(x.numel() for x in seqs)
    bs = LM.auto_batch_size(model, L, len(seqs), on_cpu=16)  # short rows: batching pays on CPU too
    for i in range(0, len(seqs), bs):
        chunk = seqs[i:i + bs]
        ids = torch.zeros(len(chunk), L, dtype=torch.long)
        mask = torch.zeros(len(chunk), L, dtype=torch.long)
        for j, x in enumerate(chunk):
            ids[j, :x.numel()], mask[j, :x.numel()] = x, 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:].to(logits.device), reduction="none").cpu()
        out += [nll[j, :x.numel() - 1] for j, x in enumerate(chunk)]
    return out


def _window_nlls(model, seqs: Sequence[torch.Tensor], window: int) -> tuple[list, list]:
    """(perplexity of each sequence, its largest perplexity over windows of ``window`` tokens)."""
    ppl, wmax = [], []
    for nll in token_nll(model, seqs):
        ppl.append(safe_exp(float(nll.mean())))
        w = min(window, nll.numel())
        wmax.append(safe_exp(float(nll.unfold(0, w, 1).mean(-1).max())))
    return ppl, wmax


def perplexity_filter(model, calibration: Sequence[torch.Tensor], heldout: Sequence[torch.Tensor],
                      attacked: Sequence[torch.Tensor], window: int = 10) -> dict:
    """The perplexity filter of Alon & Kamfonas / Jain et al. 2023, scored on the user text only.

    The threshold is the largest perplexity over ``calibration`` clean prompts; the
    false-positive rate is measured on ``heldout`` clean prompts (disjoint from calibration),
    the true-positive rate on ``attacked``. The windowed variant (Jain et al.) flags a prompt
    whose perplexity over any ``window`` consecutive tokens (each scored in its full left
    context; sliding windows, so no chunk boundary hides a suffix) exceeds the largest such
    value over the calibration prompts. Inputs are 1-D token ids, without chat template.
    """
    cal, cal_w = _window_nlls(model, calibration, window)
    held, held_w = _window_nlls(model, heldout, window)
    att, att_w = _window_nlls(model, attacked, window)
    thr, thr_w = max(cal), max(cal_w)
    rate = lambda xs, t: sum(x > t for x in xs) / max(len(xs), 1)  # noqa: E731
    return {"scored": "user text only, no chat template", "threshold": thr, "calibration_prompts": len(cal),
            "heldout_prompts": len(held), "attacked_prompts": len(att),
            "false_positive_rate": rate(held, thr), "true_positive_rate": rate(att, thr),
            "windowed": {"window": window, "threshold": thr_w, "false_positive_rate": rate(held_w, thr_w),
                         "true_positive_rate": rate(att_w, thr_w)},
            "heldout_ppl": held, "attacked_ppl": att}


# --------------------------------------------------------------------------- adversarial training


def adversarial_finetune(model, samples: Sequence[Sample], cfg: AttackConfig, steps: int = 6, lr: float = 1e-5,
                         seed: int = 0, progress: bool = True) -> list:
    """PGD adversarial training (Madry et al. 2018) in embedding space, in place: each step
    finds PGD perturbations for all ``samples`` at once (one batch; ``cfg.steps`` forward +
    backward passes, plus the attack's clean and final forwards) and takes one AdamW step on
    the clean continuations' loss under them: ``cfg.steps + 1`` backward passes per weight
    update. Returns the training losses. Wrap in ``llm_variants.restored_on_exit`` to undo."""
    params = TR.trainable_params(model)
    losses = []
    with TR.training(model, params, lr, fused_on_cpu=False) as tr:  # the per-tensor CPU AdamW, as recorded
        # The defence's recorded numbers read the autocast dtype after the fp32 upcast: a bf16 model trained
        # in full then runs without autocast, in fp32 (LoRA keeps bf16 autocast). Kept so nothing measured moves.
        tr.low = LM.low_precision_dtype(model)
        for step in tqdm(range(steps), desc="adversarial fine-tune (PGD)", disable=not progress):
            with tr.autocast():
                model.eval()  # the attack sees the model as it is evaluated
                jobs = [(s, AttackConfig(**{**cfg.__dict__, "seed": seed + step * len(samples) + i}))
                        for i, s in enumerate(samples)]
                rs = attack_batch(model, jobs)
                layouts = [_layout(s, cfg) for s in samples]
                rows = _Rows.build(model, layouts)
                delta = torch.zeros(rows.embeds.shape, dtype=torch.float32, device=rows.embeds.device)
                for i, ((_, sl, _), r) in enumerate(zip(layouts, rs)):
                    delta[i, sl] = r.delta.to(delta.device)
                with LM.trainable_only(model, params):
                    model.train()
                    nll, _ = _scored(model, rows, delta)
                    loss = nll.mean()
                    tr.step(loss)
            losses.append(loss.detach())
    return torch.stack(losses).float().cpu().tolist() if losses else []


def free_adversarial_finetune(model, samples: Sequence[Sample], cfg: AttackConfig, steps: int = 6,
                              lr: float = 1e-5, progress: bool = True) -> list:
    """Free adversarial training (Free-AT, Shafahi et al. 2019, Algorithm 1) in embedding
    space, in place: ONE forward + backward per weight update.

    Each step runs all ``samples`` as one batch [B, L] at embeddings + delta; its single
    backward gives both the weight gradient (one AdamW step on the clean continuations' loss
    under delta) and the gradient w.r.t. delta, which then ascends one step of the full radius
    (Free-AT's step of eps: sign for L-inf, per-token normalised for L2) and is projected back
    into the ball. delta [B, L, d] starts at zero and carries over from step to step.

    Where this differs from the paper: the minibatch is the whole training set (the
    ``samples``, as in ``adversarial_finetune``), so Free-AT's m replays of a minibatch are
    simply the ``steps`` steps (m = steps, one epoch); AdamW instead of SGD with momentum;
    perturbations on the input embeddings of ``cfg.positions`` (the prompt), with the radius
    relative to the mean embedding-row norm as every attack here; the weight update uses the
    gradient at the current delta, before delta moves, as Algorithm 1 does. Wrap in
    ``llm_variants.restored_on_exit`` to undo. Returns the training losses (nats/token, under delta).
    """
    validate(cfg)
    params = TR.trainable_params(model)
    dev = LM.input_device(model)
    layouts = [_layout(s, cfg) for s in samples]
    rbar, dim = mean_row_norm(model), model.get_input_embeddings().weight.shape[-1]
    radius = torch.tensor([_radius_of(rbar, dim, cfg.norm, cfg.epsilon)], device=dev)
    l2 = torch.tensor(cfg.norm == "l2", device=dev).reshape(1, 1, 1)
    delta, losses = None, []
    with TR.training(model, params, lr, fused_on_cpu=False) as tr, LM.trainable_only(model, params):
        # The defence's recorded numbers read the autocast dtype after the fp32 upcast: a bf16 model trained
        # in full then runs without autocast, in fp32 (LoRA keeps bf16 autocast). Kept so nothing measured moves.
        tr.low = LM.low_precision_dtype(model)
        for _ in tqdm(range(steps), desc="adversarial fine-tune (free)", disable=not progress):
            with tr.autocast():
                rows = _Rows.build(model, layouts)  # the embedding rows as trained so far
                if delta is None:
                    delta = torch.zeros(rows.embeds.shape, dtype=torch.float32, device=rows.embeds.device)
                d = delta.requires_grad_(True)
                nll, _ = _scored(model, rows, d)
                loss = nll.mean()
            tr.step(loss)  # the one backward: weight gradients and d.grad together
            with torch.no_grad():
                delta = _project(d.detach() + radius * _ascent(d.grad, l2), radius, l2) * rows.pert.float()
            losses.append(loss.detach())
    return torch.stack(losses).float().cpu().tolist() if losses else []
