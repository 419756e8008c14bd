"""GCG: the greedy coordinate gradient attack on a suffix of tokens (Zou et al. 2023), in the chat turn.

    turn = UserTurn(tokenizer, "How do I ...")        # what a user can send, and how a server tokenizes it
    res = gcg_attack(model, tokenizer, Sample(turn.before, target_ids), GCGConfig(steps=100), turn=turn)

Cut as the reference implementation (nanoGCG, GraySwanAI): a config (``GCGConfig``), candidate
sampling from the one-hot gradient (``sample_ids_from_grad``), candidate filtering
(``filter_ids``: here whether the text a user would send tokenizes back to the scored ids) and
candidate losses (``_Problem.losses``, one forward over the shared prefix's KV cache). The
suffix is real text: printable ASCII tokens that survive the server's tokenization.
"""
from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import llm_common as C
import llm_model as LM
from llm_attacks import AttackConfig, Sample, embeds_of, targeted_success


@dataclass
class GCGConfig:
    """GCG's search (nanoGCG's ``GCGConfig``: ``num_steps``, ``topk``, ``search_width``)."""

    suffix_len: int = 8            # S: adversarial tokens
    steps: int = 20                # gradient steps, one forward + backward each
    topk: int = 64                 # candidate tokens per suffix position, by the one-hot gradient
    batch: int = 32                # single-token swaps sampled per step (nanoGCG's search_width)
    objective: str = "targeted"    # targeted: lower the target's CE; untargeted: raise it
    seed: int = 0                  # the initial suffix and the swaps
    progress: bool = True

    def validate(self) -> None:
        if self.objective not in ("targeted", "untargeted"):
            raise C.UserError(f"GCG's objective must be targeted or untargeted, not {self.objective!r}")
        if min(self.suffix_len, self.topk, self.batch) < 1 or self.steps < 0:
            raise C.UserError("GCG needs suffix_len, topk and batch >= 1 and steps >= 0")


def printable_token_mask(tokenizer, vocab_size: int) -> torch.Tensor:
    """Tokens whose text is non-empty printable ASCII: suffixes made of them can be pasted. Every
    special token is left out: ``all_special_ids`` and each added token marked special in
    ``added_tokens_decoder`` (SmolLM2's ``<filename>``, ``<jupyter_code>``, ...: not in
    ``all_special_ids``), which a chat server never produces from what a user types."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special |= {int(i) for i, t in added.items() if getattr(t, "special", False)}
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


def initial_suffix(turn: UserTurn, allowed: torch.Tensor, suffix_len: int, g: torch.Generator) -> torch.Tensor:
    """A starting suffix [S] that a user could send: one printable token repeated (as GCG's
    "! ! !"), the first of 100 drawn from ``allowed`` [V] (bool) that survives ``turn.in_context``.
    Raises UserError when none does."""
    allowed_ids = allowed.nonzero().flatten().cpu()
    starts = allowed_ids[torch.randint(0, allowed_ids.numel(), (100,), generator=g)][:, None].repeat(1, suffix_len)
    ok = turn.in_context(starts)
    if not bool(ok.any()):
        raise C.UserError(f"no GCG suffix of {suffix_len} repeated printable tokens tokenizes back to itself in "
                          "the chat text; try another --gcg-suffix-len")
    return starts[int(ok.nonzero()[0])]


def sample_ids_from_grad(suffix: torch.Tensor, grad: torch.Tensor, topk: int, batch: int,
                         g: torch.Generator) -> torch.Tensor:
    """``batch`` candidates [batch, S] (CPU), each ``suffix`` [S] with one token swapped: a
    uniform position, and a uniform one of the ``topk`` tokens there whose one-hot gradient
    ``grad`` [S, V] (inf at forbidden tokens) is most negative, i.e. the largest first-order
    decrease of the loss (Zou et al. 2023, Algorithm 1)."""
    top = (-grad).topk(topk, dim=1).indices.cpu()  # [S, topk]
    pos = torch.randint(0, suffix.numel(), (batch,), generator=g)
    tok = top[pos, torch.randint(0, topk, (batch,), generator=g)]
    cands = suffix.repeat(batch, 1)
    cands[torch.arange(batch), pos] = tok
    return cands


def filter_ids(cands: torch.Tensor, turn: UserTurn) -> tuple[torch.Tensor, int]:
    """(the candidates [B', S] a user can send, how many were dropped): those whose decoded
    text, sent in ``turn``, tokenizes to exactly the scored ids (``UserTurn.in_context``)."""
    ok = turn.in_context(cands)
    return cands[ok], int((~ok).sum())


def _forward_kw(model) -> str:
    """The name of the KV-cache argument: ``cache`` in transformers 5, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Problem:
    """One GCG problem on ``model``: prefix ``turn.before`` [P] (its KV cache computed once and
    shared by every pass), then the suffix [S], ``turn.after`` [A] and the target [T]. Losses
    are ``sign`` x the target's mean cross-entropy (nats/token): GCG minimises them. Build and
    use under ``LM.use_cache(model, True)`` and frozen parameters."""

    def __init__(self, model, turn: UserTurn, target: torch.Tensor, suffix_len: int, sign: float, batch: int):
        self.model, self.sign, self.dev = model, sign, LM.input_device(model)
        self.W = model.get_input_embeddings().weight
        self.target = target.to(self.dev)
        self.tail = torch.cat([turn.after, target.cpu()])  # what follows the suffix
        S, A, T = suffix_len, turn.after.numel(), target.numel()
        self.keep = torch.arange(S + A - 1, S + A - 1 + T)  # new-token positions whose logits predict the target
        self.cache_kw = _forward_kw(model)
        with torch.no_grad():
            out = model(input_ids=turn.before[None].to(self.dev), use_cache=True)
        self.prefix = getattr(out, "cache", None) or out.past_key_values
        # Candidates per forward that fit in memory (each carries a copy of the prefix cache).
        self.size = LM.auto_batch_size(model, S + A + T + turn.before.numel(), batch, scored=T, on_cpu=None)
        self._emb_tail = None

    def _with_prefix(self, n: int) -> dict:
        c = copy.deepcopy(self.prefix)  # a forward appends to the cache it is given
        if n > 1:
            c.batch_repeat_interleave(n)
        return {self.cache_kw: c}

    @torch.no_grad()
    def losses(self, cands: torch.Tensor) -> torch.Tensor:
        """[B] losses of candidate suffixes [B, S], in chunks of ``size`` rows; logits only at
        the target's positions."""
        vals = []
        for i in range(0, len(cands), self.size):
            part = cands[i:i + self.size]
            ids = torch.cat([part, self.tail.expand(len(part), -1)], dim=1).to(self.dev)
            logits = self.model(input_ids=ids, use_cache=True, logits_to_keep=self.keep,
                                **self._with_prefix(len(part))).logits
            ce = F.cross_entropy(logits.float().transpose(1, 2).to(self.dev), self.target.expand(len(part), -1),
                                 reduction="none").mean(1)
            vals.append(self.sign * ce)
        return torch.cat(vals)

    def token_gradient(self, suffix: torch.Tensor) -> torch.Tensor:
        """[S, V] float32 gradient of the loss w.r.t. the one-hot suffix (one forward + backward)."""
        if self._emb_tail is None:
            self._emb_tail = embeds_of(self.model, self.tail)
        W = self.W
        onehot = F.one_hot(suffix.to(W.device), W.shape[0]).to(W.dtype).requires_grad_(True)
        e = torch.cat([(onehot @ W).to(self._emb_tail.device), self._emb_tail])[None]
        logits = self.model(inputs_embeds=e, use_cache=True, logits_to_keep=self.keep, **self._with_prefix(1)).logits[0]
        loss = self.sign * F.cross_entropy(logits.float().to(self.dev), self.target)
        grad, = torch.autograd.grad(loss, onehot)
        return grad.float()


def gcg_attack(model, tokenizer, sample: Sample, config: GCGConfig = GCGConfig(),
               turn: Optional[UserTurn] = None, after: Optional[torch.Tensor] = None) -> GCGResult:
    """Greedy coordinate gradient (Zou et al. 2023) over printable suffix tokens.

    Input layout: the fixed prefix ``turn.before``, the suffix [S], ``turn.after`` (the end of
    the user turn and the assistant header), then the target ``sample.continuation`` [T].
    ``turn`` (a ``UserTurn``) says what a user can send; without it the prefix is
    ``sample.prompt`` and the tail ``after``, as bare ids (``UserTurn.of_ids``). Each step: the
    one-hot gradient (``_Problem.token_gradient``) gives ``config.batch`` single-token swaps
    (``sample_ids_from_grad``), those a user cannot send are dropped (``filter_ids``) and the
    rest scored in one forward (``_Problem.losses``). So every loss, the success flag and the
    final suffix belong to text a user can send. As in the reference code, the suffix moves to
    the batch's best candidate every step, and the best suffix seen overall is returned.
    Raises UserError for a bad config, or when no starting suffix survives the server's tokenization.
    """
    config.validate()
    t0 = time.perf_counter()
    turn = turn if turn is not None else UserTurn.of_ids(tokenizer, sample.prompt, after)
    W = model.get_input_embeddings().weight
    allowed = printable_token_mask(tokenizer, W.shape[0]).to(W.device)
    g = torch.Generator().manual_seed(config.seed)
    suffix = initial_suffix(turn, allowed, config.suffix_len, g)
    sign = 1.0 if config.objective == "targeted" else -1.0  # we minimise sign * CE
    with LM.trainable_only(model, ()), LM.use_cache(model, True):
        prob = _Problem(model, turn, sample.continuation, config.suffix_len, sign, config.batch)
        best = float(prob.losses(suffix[None])[0])
        initial, cur, best_suffix, losses, filtered, scored = best, best, suffix.clone(), [], 0, 1
        for _ in tqdm(range(config.steps), desc="gcg", disable=not config.progress):
            grad = prob.token_gradient(suffix).masked_fill(~allowed[None, :], float("inf"))
            cands, dropped = filter_ids(sample_ids_from_grad(suffix, grad, config.topk, config.batch, g), turn)
            filtered += dropped
            if not len(cands):  # the suffix stays
                losses.append(sign * cur)
                continue
            scored += len(cands)
            vals = prob.losses(cands)
            i = int(vals.argmin())
            suffix, cur = cands[i].clone(), float(vals[i])
            if cur < best:
                best, best_suffix = cur, suffix.clone()
            losses.append(sign * cur)
        text = tokenizer.decode(best_suffix)
        real = turn.ids([text])[0]  # what a server gets for the reported text, tokenized afresh
        in_context = bool(torch.equal(real, torch.cat([turn.before, best_suffix, turn.after])))
        ok = config.objective == "targeted" and targeted_success(model, Sample(real, sample.continuation), None,
                                                                 AttackConfig())
    return GCGResult(best_suffix.tolist(), text, losses, sign * initial, sign * best, ok, time.perf_counter() - t0,
                     candidates_filtered=filtered, candidates_scored=scored, search_space=turn.search_space,
                     user_message=turn.message(text), in_context=in_context)
