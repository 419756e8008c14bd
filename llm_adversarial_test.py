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

import contextlib
import copy
import inspect
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

import llm_common as C
import llm_model as LM
import llm_variants as V
from llm_config import AdversarialConfig
from llm_run import Run
from llm_perplexity import safe_exp

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


def _embeds(model, ids: torch.Tensor) -> torch.Tensor:
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
        embeds = _embeds(model, pad)
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


def _perturbed_prompt(model, sample: Sample, delta: Optional[torch.Tensor], cfg: AttackConfig,
                      suffix_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Input embeddings [L', d] of the attacked prompt (and suffix), without the continuation."""
    ids, pert, start = _layout(sample, cfg, suffix_ids)
    e = _embeds(model, ids[:start]).clone()
    if delta is not None:
        e[pert] = e[pert] + delta.to(e.device, e.dtype)
    return e


def targeted_success(model, sample: Sample, delta: Optional[torch.Tensor], cfg: AttackConfig,
                     suffix_ids: Optional[torch.Tensor] = None) -> bool:
    """Greedy decoding of the attacked prompt reproduces the target exactly."""
    return targeted_successes(model, [(sample, delta, cfg, suffix_ids)])[0]


def targeted_successes(model, items: Sequence[tuple]) -> list[bool]:
    """``targeted_success`` for many (sample, delta, cfg, suffix_ids) at once, in one batch."""
    embeds = [_perturbed_prompt(model, s, d, c, suf) for s, d, c, suf in items]
    T = max(s.continuation.numel() for s, _, _, _ in items)
    outs = greedy_batch(model, embeds, T)
    return [o[:s.continuation.numel()] == s.continuation.tolist() for o, (s, _, _, _) in zip(outs, items)]


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
    losses: list                   # loss of the current suffix after each step
    initial_loss: float
    final_loss: float              # the best loss seen over all steps
    success: bool                  # greedy decoding of the real chat text's ids gives the target
    seconds: float
    threat_model: str = ""
    candidates_filtered: int = 0   # candidates dropped: the chat text with them tokenizes to other ids
    candidates_scored: int = 0     # candidates scored (forward passes over suffix + tail + target)
    search_space: str = ""         # what a user can send, and how it is tokenized (``UserTurn.search_space``)
    user_message: str = ""         # the user turn's content with the best suffix: the text a user would send
    in_context: bool = False       # the chat text with ``suffix_text``, tokenized afresh, gives the scored ids


class UserTurn:
    """What a user can send to a chat server: ``prompt`` followed directly by a suffix (the
    suffix's own first token brings any space), as the content of the user turn.

    The chat text is the tokenizer's chat template applied to that one user message with the
    generation prompt, rendered to text and encoded without adding special tokens: what
    ``apply_chat_template(tokenize=True)``, and the chat endpoints of vLLM and TGI, do. Without
    a chat template the user is a completion client: ``tokenizer(prompt + suffix)``, with the
    tokenizer's own special tokens. ``UserTurn.of_ids(tokenizer, before, after)`` is the
    case of bare ids: the text is decode(before) + suffix + decode(after), encoded without
    added special tokens.

    before [P] / after [A] are the ids GCG scores around the suffix ids [S]: the rendered
    text up to the suffix and after it, each encoded alone. A candidate suffix is what a user
    could send only when the whole chat text with its decoded text encodes to exactly
    before + suffix + after (``in_context``): a suffix token can merge with the prompt's last
    token or the template's next one (SmolLM2's byte-level BPE joins a lone space before a
    word into the word), and a template can transform the content (Llama-2's strips it).
    """

    PLACEHOLDER = "{ADV_SUFFIX}"

    def __init__(self, tokenizer, prompt: str):
        self.tokenizer, self.prompt = tokenizer, prompt
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self._ids_context = None
        if self.templated:
            head, _, tail = self._render([prompt + self.PLACEHOLDER])[0].partition(self.PLACEHOLDER)
            self.before, self.after = self._encode([head])[0], self._encode([tail])[0]
            self.search_space = ("the content of the chat template's user turn: the prompt, then directly the "
                                 "suffix's text (printable ASCII tokens); the chat text rendered by the template "
                                 "and encoded without added special tokens, as a chat server does, must give "
                                 "exactly the scored ids")
        else:
            self.before = torch.tensor(tokenizer(prompt).input_ids, dtype=torch.long)
            self.after = torch.zeros(0, dtype=torch.long)
            self.search_space = ("plain text (no chat template): the prompt, then directly the suffix's text "
                                 "(printable ASCII tokens), encoded with the tokenizer's special tokens as a "
                                 "completion server does; it must give exactly the scored ids")

    @classmethod
    def of_ids(cls, tokenizer, before: torch.Tensor, after: Optional[torch.Tensor] = None) -> "UserTurn":
        """A turn around bare ids: the text is decode(before) + suffix + decode(after)."""
        turn = cls.__new__(cls)
        turn.tokenizer, turn.templated = tokenizer, False
        turn.before = before.cpu().long()
        turn.after = torch.zeros(0, dtype=torch.long) if after is None else after.cpu().long()
        turn._ids_context = (tokenizer.decode(turn.before), tokenizer.decode(turn.after))
        turn.prompt = turn._ids_context[0]
        turn.search_space = ("bare ids: decode(prefix ids) + the suffix's text (printable ASCII tokens) + "
                             "decode(following ids), encoded without added special tokens, must give exactly "
                             "the scored ids")
        return turn

    def _render(self, contents: list[str]) -> list[str]:
        convs = [[{"role": "user", "content": c}] for c in contents]
        return self.tokenizer.apply_chat_template(convs, add_generation_prompt=True, tokenize=False)

    def _encode(self, texts: list[str], special: bool = False) -> list[torch.Tensor]:
        return [torch.tensor(x, dtype=torch.long)
                for x in self.tokenizer(texts, add_special_tokens=special).input_ids]

    def message(self, suffix_text: str) -> str:
        """The user turn's content (or the whole text, for bare ids) with this suffix."""
        if self._ids_context is not None:
            return self._ids_context[0] + suffix_text + self._ids_context[1]
        return self.prompt + suffix_text

    def ids(self, suffix_texts: Sequence[str]) -> list[torch.Tensor]:
        """The ids a server gets for each suffix text: the whole chat text, tokenized afresh."""
        msgs = [self.message(t) for t in suffix_texts]
        if self.templated:
            return self._encode(self._render(msgs))
        return self._encode(msgs, special=self._ids_context is None)

    def in_context(self, cands: torch.Tensor) -> torch.Tensor:
        """[B] True where candidate suffix ids [B, S], decoded to text and sent in this turn,
        tokenize to exactly before + suffix + after (the ids GCG scores)."""
        real = self.ids(self.tokenizer.batch_decode(cands.tolist()))
        scored = torch.cat([self.before.expand(len(cands), -1), cands.cpu(), self.after.expand(len(cands), -1)], 1)
        return torch.tensor([r.numel() == scored.shape[1] and bool(torch.equal(r, s)) for r, s in zip(real, scored)],
                            dtype=torch.bool)


def chat_parts(tokenizer, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (before, after) around a suffix appended to ``prompt`` in the user turn
    (``UserTurn(tokenizer, prompt)``): ``before`` ends with the user's prompt, ``after``
    holds the end of the turn and the assistant header (empty without a chat template)."""
    turn = UserTurn(tokenizer, prompt)
    return turn.before, turn.after


def _forward_kw(model) -> str:
    """The name of the KV-cache argument: ``cache`` in transformers 5, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def gcg_attack(model, tokenizer, sample: Sample, suffix_len: int = 8, steps: int = 20, topk: int = 64,
               batch: int = 32, objective: str = "targeted", seed: int = 0, progress: bool = True,
               after: Optional[torch.Tensor] = None, turn: Optional[UserTurn] = None) -> GCGResult:
    """Greedy coordinate gradient (Zou et al. 2023) over printable suffix tokens.

    Input layout: the fixed prefix ``turn.before``, the suffix [S], ``turn.after`` (the end of
    the user turn and the assistant header), then the target ``sample.continuation``. ``turn``
    (a ``UserTurn``) says what a user can send; without it the prefix is ``sample.prompt`` and
    the tail ``after``, as bare ids (``UserTurn.of_ids``). The prefix's KV cache is computed
    once and shared by every pass. Each step: the gradient w.r.t. the one-hot suffix [S, V]
    (one forward + backward) gives per position the ``topk`` most promising printable tokens;
    ``batch`` single-token swaps are sampled, those whose text does not tokenize in context to
    the ids scored are dropped (``UserTurn.in_context``: the whole chat text with the decoded
    suffix, as a server tokenizes it), and the rest scored in one forward that computes only
    the target's logits. So every loss, the success flag and the final suffix belong to text a
    user can send. As in the reference code, the suffix moves to the batch's best candidate
    every step, and the best suffix seen overall is returned.
    """
    t0 = time.perf_counter()
    W = model.get_input_embeddings().weight
    dev = LM.input_device(model)
    turn = turn if turn is not None else UserTurn.of_ids(tokenizer, sample.prompt, after)
    prompt, after = turn.before, turn.after
    allowed = printable_token_mask(tokenizer, W.shape[0]).to(W.device)
    g = torch.Generator().manual_seed(seed)
    allowed_ids = allowed.nonzero().flatten().cpu()
    # An initial suffix (one token repeated, as GCG's "! ! !") that a user could send.
    starts = allowed_ids[torch.randint(0, allowed_ids.numel(), (100,), generator=g)][:, None].repeat(1, suffix_len)
    ok = turn.in_context(starts)
    if not bool(ok.any()):
        raise C.UserError(f"no GCG suffix of {suffix_len} repeated printable tokens tokenizes back to itself in "
                          "the chat text; try another --gcg-suffix-len")
    suffix = starts[int(ok.nonzero()[0])]
    sign = 1.0 if objective == "targeted" else -1.0  # we minimise sign * CE
    S, A, T = suffix_len, after.numel(), sample.continuation.numel()
    target = sample.continuation.to(dev)
    tail = torch.cat([after, sample.continuation.cpu()])  # what follows the suffix
    keep = torch.arange(S + A - 1, S + A - 1 + T)  # new-token positions whose logits predict the target
    cache_kw = _forward_kw(model)

    with LM.trainable_only(model, ()), LM.use_cache(model, True):
        with torch.no_grad():
            out = model(input_ids=prompt[None].to(dev), use_cache=True)
        prefix = getattr(out, "cache", None) or out.past_key_values
        del out

        def with_prefix(n: int):
            c = copy.deepcopy(prefix)  # a forward appends to the cache it is given
            if n > 1:
                c.batch_repeat_interleave(n)
            return {cache_kw: c}

        # Candidates per forward that fit in memory (each carries a copy of the prefix cache).
        size = LM.auto_batch_size(model, S + A + T + prompt.numel(), batch, scored=T, on_cpu=None)

        def objective_of(cands: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B]
            vals = []
            for i in range(0, len(cands), size):
                part = cands[i:i + size]
                ids = torch.cat([part, tail.expand(len(part), -1)], dim=1).to(dev)
                logits = model(input_ids=ids, use_cache=True, logits_to_keep=keep, **with_prefix(len(part))).logits
                ce = F.cross_entropy(logits.float().transpose(1, 2).to(dev), target.expand(len(part), -1),
                                     reduction="none").mean(1)
                vals.append(sign * ce)
            return torch.cat(vals)

        with torch.no_grad():
            best = float(objective_of(suffix[None])[0])
        initial, cur, best_suffix, losses, filtered, scored = best, best, suffix.clone(), [], 0, 1
        emb_tail = _embeds(model, tail)
        for _ in tqdm(range(steps), desc="gcg", disable=not progress):
            onehot = F.one_hot(suffix.to(W.device), W.shape[0]).to(W.dtype).requires_grad_(True)
            e = torch.cat([(onehot @ W).to(emb_tail.device), emb_tail])[None]
            logits = model(inputs_embeds=e, use_cache=True, logits_to_keep=keep, **with_prefix(1)).logits[0]
            loss = sign * F.cross_entropy(logits.float().to(dev), target)
            grad, = torch.autograd.grad(loss, onehot)
            grad = grad.float().masked_fill(~allowed[None, :], float("inf"))
            cand_tok = (-grad).topk(topk, dim=1).indices.cpu()  # [S, topk]
            pos = torch.randint(0, suffix_len, (batch,), generator=g)
            tok = cand_tok[pos, torch.randint(0, topk, (batch,), generator=g)]
            cands = suffix.repeat(batch, 1)
            cands[torch.arange(batch), pos] = tok
            ok = turn.in_context(cands)
            filtered += int((~ok).sum())
            if not bool(ok.any()):  # the suffix stays
                losses.append(sign * cur)
                continue
            cands = cands[ok]
            scored += len(cands)
            with torch.no_grad():
                vals = objective_of(cands)
            i = int(vals.argmin())
            suffix, cur = cands[i].clone(), float(vals[i])
            if cur < best:
                best, best_suffix = cur, suffix.clone()
            losses.append(sign * cur)
        text = tokenizer.decode(best_suffix)
        real = turn.ids([text])[0]  # what a server gets for the reported text, tokenized afresh
        in_context = bool(torch.equal(real, torch.cat([prompt, best_suffix, after])))
        ok = objective == "targeted" and targeted_success(model, Sample(real, sample.continuation), None,
                                                          AttackConfig())
    return GCGResult(best_suffix.tolist(), text, losses, sign * initial, sign * best, ok, time.perf_counter() - t0,
                     candidates_filtered=filtered, candidates_scored=scored, search_space=turn.search_space,
                     user_message=turn.message(text), in_context=in_context)


# --------------------------------------------------------------------------- defences


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


def _scores(model, seqs: Sequence[torch.Tensor], window: int) -> tuple[list, list]:
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
    cal, cal_w = _scores(model, calibration, window)
    held, held_w = _scores(model, heldout, window)
    att, att_w = _scores(model, attacked, window)
    thr, thr_w = max(cal), max(cal_w)
    rate = lambda xs, t: sum(x > t for x in xs) / max(len(xs), 1)  # noqa: E731
    return {"scored": "user text only, no chat template", "threshold": thr, "calibration_prompts": len(cal),
            "heldout_prompts": len(held), "attacked_prompts": len(att),
            "false_positive_rate": rate(held, thr), "true_positive_rate": rate(att, thr),
            "windowed": {"window": window, "threshold": thr_w, "false_positive_rate": rate(held_w, thr_w),
                         "true_positive_rate": rate(att_w, thr_w)},
            "heldout_ppl": held, "attacked_ppl": att}


def _trainable(model) -> list:
    """What the defences train: the LoRA adapters when the model has them (see ``_lora``), else
    every floating-point weight."""
    if getattr(model, "peft_config", None):
        return [p for n, p in model.named_parameters() if "lora_" in n]
    return [p for p in model.parameters() if p.is_floating_point()]


@contextlib.contextmanager
def _training(model, params, lr: float):
    """(optimizer, autocast dtype) for a defence's weight updates, restored on exit: fp32
    master weights for bf16/fp16 models (``LM.fp32_master_weights``: steps of lr ~1e-5 are not
    rounded away), only ``params`` trainable, train mode, then the previous mode back."""
    was_training = model.training
    try:
        with LM.fp32_master_weights(params):
            fused = LM.input_device(model).type == "cuda"
            yield torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused), LM.low_precision_dtype(model)
    finally:
        model.train(was_training)


def adversarial_finetune(model, samples: Sequence[Sample], cfg: AttackConfig, steps: int = 6, lr: float = 1e-5,
                         seed: int = 0, progress: bool = True) -> list:
    """PGD adversarial training (Madry et al. 2018) in embedding space, in place: each step
    finds PGD perturbations for all ``samples`` at once (one batch; ``cfg.steps`` forward +
    backward passes, plus the attack's clean and final forwards) and takes one AdamW step on
    the clean continuations' loss under them: ``cfg.steps + 1`` backward passes per weight
    update. Returns the training losses. Wrap in ``V.restored_on_exit`` to undo."""
    params = _trainable(model)
    dev = LM.input_device(model)
    losses = []
    with _training(model, params, lr) as (opt, low):
        for step in tqdm(range(steps), desc="adversarial fine-tune (PGD)", disable=not progress):
            with torch.autocast(dev.type, dtype=low, enabled=low is not None):
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
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
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
    ``V.restored_on_exit`` to undo. Returns the training losses (nats/token, under delta).
    """
    validate(cfg)
    params = _trainable(model)
    dev = LM.input_device(model)
    layouts = [_layout(s, cfg) for s in samples]
    rbar, dim = mean_row_norm(model), model.get_input_embeddings().weight.shape[-1]
    radius = torch.tensor([_radius_of(rbar, dim, cfg.norm, cfg.epsilon)], device=dev)
    l2 = torch.tensor(cfg.norm == "l2", device=dev).reshape(1, 1, 1)
    delta, losses = None, []
    with _training(model, params, lr) as (opt, low), LM.trainable_only(model, params):
        model.train()
        for _ in tqdm(range(steps), desc="adversarial fine-tune (free)", disable=not progress):
            with torch.autocast(dev.type, dtype=low, enabled=low is not None):
                rows = _Rows.build(model, layouts)  # the embedding rows as trained so far
                if delta is None:
                    delta = torch.zeros(rows.embeds.shape, dtype=torch.float32, device=rows.embeds.device)
                d = delta.requires_grad_(True)
                nll, _ = _scored(model, rows, d)
                loss = nll.mean()
            loss.backward()  # the one backward: weight gradients and d.grad together
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                delta = _project(d.detach() + radius * _ascent(d.grad, l2), radius, l2) * rows.pert.float()
            losses.append(loss.detach())
    return torch.stack(losses).float().cpu().tolist() if losses else []


@contextlib.contextmanager
def counted_passes(model):
    """Count the forward and backward passes through ``model``'s decoder, as a dict that fills
    while the block runs: ``forward`` (calls of the first decoder block, so a chunked batch
    counts each chunk), ``backward`` (backward passes that reach its output), ``rows`` and
    ``tokens`` (rows x positions of those forwards)."""
    counts = {"forward": 0, "backward": 0, "rows": 0, "tokens": 0}

    def seen(_grad):
        counts["backward"] += 1

    def hook(_module, args, kwargs, out):
        h = out[0] if isinstance(out, tuple) else out
        x = args[0] if args else kwargs["hidden_states"]
        counts["forward"] += 1
        counts["rows"] += x.shape[0]
        counts["tokens"] += x.shape[0] * x.shape[1]
        if torch.is_tensor(h) and h.requires_grad:
            h.register_hook(seen)

    handle = LM.decoder_layers(model)[0].register_forward_hook(hook, with_kwargs=True)
    try:
        yield counts
    finally:
        handle.remove()


def _lora(model, r: int, seed: int):
    """The model with fresh LoRA adapters on every linear (in place; ``.unload()`` removes them)."""
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


# --------------------------------------------------------------------------- driver


def _chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        return enc["input_ids"][0]
    return torch.tensor(tokenizer(prompt).input_ids)


def _windows(eval_ids: torch.Tensor, n: int, cfg: AdversarialConfig, offset: float = 0.0) -> list[Sample]:
    """``n`` (prompt, true continuation) windows spread evenly over the text; ``offset`` in
    [0, 1) shifts them by that fraction of the spacing (0.5: the midpoints, disjoint from
    the windows at offset 0 whenever the spacing is at least two windows long)."""
    L = cfg.prompt_len + cfg.continuation_len
    step = eval_ids.numel() // n
    out = []
    for i in range(n):
        s = i * step + int(offset * step)
        out.append(Sample(eval_ids[s:s + cfg.prompt_len], eval_ids[s + cfg.prompt_len:s + L],
                          f"window {i}" if offset == 0 else f"train window {i}"))
    return out


def build_samples(model, tokenizer, eval_ids: torch.Tensor, cfg: AdversarialConfig) -> list[Sample]:
    """Text windows (prompt + its true continuation) and sample prompts (prompt + the
    model's own clean greedy answer, decoded for all prompts in one batch)."""
    L = cfg.prompt_len + cfg.continuation_len
    if eval_ids.numel() < 2 * L * cfg.n_windows:
        raise C.UserError(f"evaluation text has {eval_ids.numel()} tokens, fewer than {2 * cfg.n_windows} "
                          f"attack windows of {L} (half of them train the adversarial fine-tune)")
    out = _windows(eval_ids, cfg.n_windows, cfg)
    ids = [_chat_ids(tokenizer, p) for p in cfg.prompts]
    answers = greedy_batch(model, [_embeds(model, x) for x in ids], cfg.continuation_len, tokenizer.eos_token_id)
    for p, x, ans in zip(cfg.prompts, ids, answers):
        if ans:
            out.append(Sample(x, torch.tensor(ans), p))
    return out


def _summary(rs: Sequence[AttackResult]) -> dict:
    return {"clean_nll": _mean(r.clean_nll for r in rs), "attacked_nll": _mean(r.attacked_nll for r in rs),
            "delta_nll": _mean(r.delta_nll for r in rs), "top1_agreement": _mean(r.top1_agreement for r in rs)}


@dataclass
class AdversarialResult:
    embedding_row_norm: float      # r_bar: eps are relative to it
    norm: str
    n_samples: int
    table: list                    # per (method, eps): clean/attacked/delta NLL, top-1 agreement
    answers: dict                  # prompt -> clean and attacked greedy answers
    targeted: dict                 # targeted PGD: target, eps, steps, success rate
    gcg: dict                      # GCGResult as a dict
    perplexity_filter: dict
    adversarial_training: dict     # the defence, held-out and trained-on windows
    seconds: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # the resolved AdversarialConfig


def _sweep(model, samples: list[Sample], config: AdversarialConfig) -> tuple[list, dict]:
    """FGSM and PGD at every eps on every sample, one batch per step. Returns the table and
    the strongest PGD's delta per sample (by id)."""
    jobs = [(s, AttackConfig(method=m, norm=config.norm, epsilon=e, steps=config.pgd_steps, seed=config.seed))
            for e in config.epsilons for m in ("fgsm", "pgd") for s in samples]
    rs = attack_batch(model, jobs)
    table = []
    for e in config.epsilons:
        for m in ("fgsm", "pgd"):
            part = [r for (s, c), r in zip(jobs, rs) if c.epsilon == e and c.method == m]
            table.append({"method": m, "eps": e, **_summary(part)})
    strongest = max(config.epsilons)
    deltas = {id(s): r.delta for (s, c), r in zip(jobs, rs) if c.method == "pgd" and c.epsilon == strongest}
    return table, deltas


def _answers(model, tokenizer, prompts: list[Sample], deltas: dict, config: AdversarialConfig) -> dict:
    """Greedy answers to the sample prompts, clean and under the strongest PGD of the sweep."""
    embeds = [_perturbed_prompt(model, Sample(s.prompt, s.prompt[:0]), d, AttackConfig())
              for s in prompts for d in (None, deltas[id(s)])]
    outs = greedy_batch(model, embeds, config.max_new_tokens, tokenizer.eos_token_id)
    dec = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
    return {s.label: {"clean": dec[2 * i], "attacked": dec[2 * i + 1], "eps": max(config.epsilons)}
            for i, s in enumerate(prompts)}


def _targeted(model, samples: list[Sample], tgt: torch.Tensor, config: AdversarialConfig) -> dict:
    """Targeted PGD: make every sample continue with the target string."""
    tcfg = AttackConfig(method="pgd", norm=config.norm, epsilon=config.targeted_eps, steps=config.targeted_steps,
                        objective="targeted", seed=config.seed)
    tsamples = [Sample(s.prompt, tgt, s.label) for s in samples]
    trs = attack_batch(model, [(s, tcfg) for s in tsamples])
    hits = targeted_successes(model, [(s, r.delta, tcfg, None) for s, r in zip(tsamples, trs)])
    return {"target": config.target, "eps": config.targeted_eps, "steps": config.targeted_steps,
            "success_rate": sum(hits) / len(hits), "n": len(hits)}


DEFENCES = {
    "free": "Free adversarial training (Free-AT, Shafahi et al. 2019): one forward+backward per weight update "
            "gives the weight gradient and the perturbation's ascent step; the whole training set is the "
            "minibatch, replayed every step",
    "pgd": "PGD adversarial training (Madry et al. 2018): a full PGD attack per weight update",
}


def _defence(model, samples: list[Sample], train_s: list[Sample], config: AdversarialConfig) -> dict:
    """Adversarial fine-tune (undone afterwards) on windows disjoint from the attack samples,
    by ``config.defence`` (free or pgd); PGD delta NLL before/after on both the held-out attack
    samples and the trained-on ones. ``passes`` records the forward and backward passes of the
    training alone and of the before/after attacks, counted at the decoder."""
    out = {"defence": config.defence}
    if config.defence == "none":
        return {**out, "algorithm": "no adversarial training (--defence none)"}
    dcfg = AttackConfig(method="pgd", norm=config.norm, epsilon=max(config.epsilons), steps=config.pgd_steps,
                        seed=config.seed + 99)
    every = samples + train_s
    with counted_passes(model) as attacks:
        before_rs = attack_batch(model, [(s, dcfg) for s in every])
    n_params = sum(p.numel() for p in model.parameters())
    lora_r = config.defence_lora_r if config.defence_lora_r is not None else (16 if n_params > 1.5e9 else 0)
    # Full weights need 16 bytes each for fp32 masters and AdamW (108 GB at 7B): large models
    # train LoRA adapters instead, removed afterwards; small ones are restored from a copy.
    names = [] if lora_r else [n for n, p in model.named_parameters() if p.is_floating_point()]
    with V.restored_on_exit(model, names):
        target = _lora(model, lora_r, config.seed) if lora_r else model
        try:
            with counted_passes(model) as training:  # the hooks sit on the base model's blocks, under LoRA too
                if config.defence == "free":
                    train_losses = free_adversarial_finetune(target, train_s, dcfg, config.defence_steps,
                                                             config.defence_lr, config.progress)
                else:
                    train_losses = adversarial_finetune(target, train_s, dcfg, config.defence_steps,
                                                        config.defence_lr, config.seed, config.progress)
            with counted_passes(model) as after:
                after_rs = attack_batch(target, [(s, dcfg) for s in every])
        finally:
            if lora_r:
                target.unload()  # the original modules, without the adapters
    k = len(samples)
    held_b, held_a, tr_b, tr_a = (_summary(x) for x in (before_rs[:k], after_rs[:k], before_rs[k:], after_rs[k:]))
    steps = config.defence_steps
    return {**out, "algorithm": DEFENCES[config.defence], "eps": dcfg.epsilon, "steps": steps,
            "lr": config.defence_lr, "attack": f"PGD-{dcfg.steps} at eps {dcfg.epsilon} ({dcfg.norm})",
            "trained": f"LoRA adapters, r={lora_r}" if lora_r else "all weights",
            "trained_on": f"{len(train_s)} windows disjoint from the {k} attack samples",
            "passes": {"training": {"forward": training["forward"], "backward": training["backward"],
                                   "tokens": training["tokens"],
                                   "backward_per_step": training["backward"] / max(steps, 1)},
                       "attacks_before_after": {"forward": attacks["forward"] + after["forward"],
                                                "backward": attacks["backward"] + after["backward"]}},
            "delta_nll_before": held_b["delta_nll"], "delta_nll_after": held_a["delta_nll"],
            "clean_nll_before": held_b["clean_nll"], "clean_nll_after": held_a["clean_nll"],
            "train_windows": {"delta_nll_before": tr_b["delta_nll"], "delta_nll_after": tr_a["delta_nll"],
                              "clean_nll_before": tr_b["clean_nll"], "clean_nll_after": tr_a["clean_nll"]},
            "train_losses": train_losses}


def _filter(model, tokenizer, eval_ids: torch.Tensor, gcg: GCGResult, config: AdversarialConfig) -> dict:
    """Clean user prompts are windows of the evaluation text: calibration at offset 0.25 and
    held-out at 0.75 of their spacing, disjoint because the spacing is at least two windows.
    The attacked prompts are the held-out ones with GCG's suffix text appended, and GCG's user
    message, each tokenized from its text."""
    n = max(2, min(config.filter_prompts, eval_ids.numel() // (2 * config.prompt_len)))
    cfg = replace(config, continuation_len=0)
    cal = [s.prompt for s in _windows(eval_ids, n, cfg, offset=0.25)]
    held = [s.prompt for s in _windows(eval_ids, n, cfg, offset=0.75)]
    # The attacked prompts are texts a user sends, tokenized as such: each held-out prompt's
    # text with the suffix's text appended, and GCG's own user message.
    texts = [tokenizer.decode(x) + gcg.suffix_text for x in held] + [gcg.user_message]
    attacked = [torch.tensor(x, dtype=torch.long) for x in tokenizer(texts, add_special_tokens=False).input_ids]
    return perplexity_filter(model, cal, held, attacked)


def test_adversarial_robustness(model, tokenizer, eval_ids: torch.Tensor,
                                config: AdversarialConfig = AdversarialConfig()) -> AdversarialResult:
    """The adversarial step: delta NLL vs eps for FGSM and PGD, targeted success, answers
    under attack, GCG, and the two defences measured before and after. ``eval_ids`` is the
    tokenized evaluation text [n_tokens]. The model's weights are unchanged on return.

    Every attack family runs as one batch: all samples x eps x method step together."""
    config = config.for_model(model)
    C.seed_everything(config.seed)
    t0 = time.perf_counter()
    secs = {}
    samples = build_samples(model, tokenizer, eval_ids, config)
    table, deltas = _sweep(model, samples, config)
    secs["sweep"] = time.perf_counter() - t0

    t = time.perf_counter()
    answers = _answers(model, tokenizer, samples[config.n_windows:], deltas, config)
    tgt = torch.tensor(tokenizer(config.target, add_special_tokens=False).input_ids)
    targeted = _targeted(model, samples, tgt, config)
    secs["targeted"] = time.perf_counter() - t

    # GCG on the first sample prompt, the suffix inside its user turn, targeted at the target.
    t = time.perf_counter()
    gprompt = config.prompts[0] if config.prompts else tokenizer.decode(samples[0].prompt)
    turn = UserTurn(tokenizer, gprompt)
    gcg = gcg_attack(model, tokenizer, Sample(turn.before, tgt, gprompt), config.gcg_suffix_len, config.gcg_steps,
                     config.gcg_topk, config.gcg_batch, "targeted", config.seed, config.progress, turn=turn)
    gcg.threat_model = ("suffix appended to the user's message inside the chat template, before the end of "
                        "the turn and the assistant header (Zou et al. 2023); only text a user can send is "
                        "scored (search_space)")
    secs["gcg"] = time.perf_counter() - t

    # Defence 1: perplexity filter, threshold from calibration prompts, FPR on held-out clean
    # prompts, TPR on those prompts with the GCG suffix appended and on GCG's own user text.
    pfilter = _filter(model, tokenizer, eval_ids, gcg, config)
    t = time.perf_counter()
    defence = _defence(model, samples, _windows(eval_ids, config.n_windows, config, offset=0.5), config)
    secs["defence"] = time.perf_counter() - t
    secs["total"] = time.perf_counter() - t0
    return AdversarialResult(mean_row_norm(model), config.norm, len(samples), table, answers, targeted,
                             asdict(gcg), pfilter, defence, secs, asdict(config))


test_adversarial_robustness.__test__ = False  # the historical name; not a pytest test


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def pipeline_step(run: Run, config: AdversarialConfig) -> None:
    """The pipeline's adversarial step on the live model and the evaluation text."""
    run.results["adversarial"] = asdict(test_adversarial_robustness(run.model, run.tokenizer, run.ids("eval"), config))
