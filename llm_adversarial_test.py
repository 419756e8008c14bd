"""The adversarial step: robustness to attacks: FGSM and PGD on input embeddings, GCG on tokens, defences.

The step measures, on windows of the evaluation text and on the sample prompts: delta NLL vs
eps for FGSM and PGD, targeted PGD's success, greedy answers under attack, GCG in the chat
turn, the perplexity filter against GCG's text, and an adversarial fine-tune (Free-AT or
PGD-AT, undone afterwards) measured before and after. The attacks and defences themselves
live in ``llm_attacks`` (embeddings, perplexity filter, adversarial training) and ``llm_gcg``
(tokens); this module builds the samples, runs them as batches and gathers the numbers.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Sequence

import numpy as np
import torch

import llm_common as C
import llm_model as LM
import llm_stats as ST
import llm_train as TR
import llm_variants as V
from llm_attacks import (AttackConfig, AttackResult, Sample, adversarial_finetune, attack_batch, embeds_of,
                         free_adversarial_finetune, greedy_batch, mean_row_norm, perplexity_filter, perturbed_prompt,
                         targeted_successes, token_nll)
from llm_config import AdversarialConfig
from llm_gcg import GCGConfig, GCGResult, UserTurn, gcg_attack
from llm_run import Run


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


def _chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        return enc["input_ids"][0]
    return torch.tensor(tokenizer(prompt).input_ids)


def _windows(eval_ids: torch.Tensor, n: int, cfg: AdversarialConfig, offset: float = 0.0) -> list[Sample]:
    """``n`` (prompt, true continuation) windows spread evenly over the whole text, the eval
    step's ``spread`` design: one every ``numel // n`` tokens, all shifted by one shift drawn with
    ``cfg.seed`` (so the sample is not tied to the text's first tokens); ``offset`` in [0, 0.75]
    moves them by that fraction of the spacing (0.5: the midpoints, disjoint from the windows at
    offset 0 whenever the spacing is at least two windows long). The shift keeps every window of
    every offset inside the text."""
    L = cfg.prompt_len + cfg.continuation_len
    step = eval_ids.numel() // n
    room = step - int(0.75 * step) - L + 1  # the latest shift that keeps the offset-0.75 windows inside
    shift = int(np.random.default_rng(cfg.seed).integers(0, room)) if room > 1 else 0
    out = []
    for i in range(n):
        s = i * step + int(offset * step) + shift
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
    answers = greedy_batch(model, [embeds_of(model, x) for x in ids], cfg.continuation_len, tokenizer.eos_token_id)
    for p, x, ans in zip(cfg.prompts, ids, answers):
        if ans:
            out.append(Sample(x, torch.tensor(ans), p))
    return out


def _attack_means(rs: Sequence[AttackResult]) -> dict:
    """Mean clean and attacked NLL, their difference and top-1 agreement over attacked windows."""
    return {"clean_nll": _nan_mean(r.clean_nll for r in rs), "attacked_nll": _nan_mean(r.attacked_nll for r in rs),
            "delta_nll": _nan_mean(r.delta_nll for r in rs), "top1_agreement": _nan_mean(r.top1_agreement for r in rs)}


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
    variants: dict = field(default_factory=dict)  # attack_variants: every variant asked for


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
            deltas_nll = [r.delta_nll for r in part]  # per sample, in sample order: paired across variants
            table.append({"method": m, "eps": e, **_attack_means(part), "delta_nll_samples": deltas_nll,
                          "delta_nll_ci95": list(ST.mean_interval(deltas_nll))})
    strongest = max(config.epsilons)
    deltas = {id(s): r.delta for (s, c), r in zip(jobs, rs) if c.method == "pgd" and c.epsilon == strongest}
    return table, deltas


def _answers(model, tokenizer, prompts: list[Sample], deltas: dict, config: AdversarialConfig,
             clean: Optional[dict] = None) -> dict:
    """Greedy answers to the sample prompts, clean and under the strongest PGD of the sweep.
    ``clean`` ({prompt: answer}): clean answers this model already gave to the same prompt in its
    chat template at ``config.max_new_tokens`` (the evaluation's ``generations``); those are taken,
    not generated again."""
    clean = clean or {}
    todo = [(s, attacked) for s in prompts for attacked in (False, True) if attacked or s.label not in clean]
    outs = greedy_batch(model, [perturbed_prompt(model, Sample(s.prompt, s.prompt[:0]), deltas[id(s)] if attacked
                                                 else None, AttackConfig()) for s, attacked in todo],
                        config.max_new_tokens, tokenizer.eos_token_id)
    dec = {(id(s), a): tokenizer.decode(o, skip_special_tokens=True).strip() for (s, a), o in zip(todo, outs)}
    return {s.label: {"clean": clean[s.label] if s.label in clean else dec[id(s), False],
                      "attacked": dec[id(s), True], "eps": max(config.epsilons)} for s in prompts}


def clean_answers(results: dict, config: AdversarialConfig) -> dict:
    """{variant: {prompt: greedy answer}} that the evaluation step of ``results`` generated with the
    same answer length as ``config`` (the same decoding of the same chat-template prompt): the
    attacks take those clean answers instead of generating each a second time."""
    if (results.get("protocol") or {}).get("config", {}).get("max_new_tokens") != config.max_new_tokens:
        return {}
    return {n: dict(ev["generations"]) for n, ev in (results.get("evaluation") or {}).items()
            if isinstance(ev, dict) and ev.get("generations")}


def _targeted(model, samples: list[Sample], tgt: torch.Tensor, config: AdversarialConfig) -> dict:
    """Targeted PGD: make every sample continue with the target string."""
    tcfg = AttackConfig(method="pgd", norm=config.norm, epsilon=config.targeted_eps, steps=config.targeted_steps,
                        objective="targeted", seed=config.seed)
    tsamples = [Sample(s.prompt, tgt, s.label) for s in samples]
    trs = attack_batch(model, [(s, tcfg) for s in tsamples])
    hits = targeted_successes(model, [(s, r.delta, tcfg, None) for s, r in zip(tsamples, trs)])
    return {"target": config.target, "eps": config.targeted_eps, "steps": config.targeted_steps,
            "success_rate": sum(hits) / len(hits), "n": len(hits), "hits": [bool(h) for h in hits],
            "success_ci95": list(ST.wilson_interval(sum(hits), len(hits))), "interval": "Wilson 95%"}


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
        target = TR.wrap_lora(model, lora_r, 2 * lora_r, config.seed) if lora_r else model
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
    held_b, held_a, tr_b, tr_a = (_attack_means(x) for x in (before_rs[:k], after_rs[:k], before_rs[k:], after_rs[k:]))
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


def _gcg_prompt(tokenizer, samples: list[Sample], config: AdversarialConfig) -> str:
    return config.prompts[0] if config.prompts else tokenizer.decode(samples[0].prompt)


def _gcg(model, tokenizer, samples: list[Sample], tgt: torch.Tensor, config: AdversarialConfig) -> GCGResult:
    """GCG on the first sample prompt, the suffix inside its user turn, targeted at the target."""
    gprompt = _gcg_prompt(tokenizer, samples, config)
    turn = UserTurn(tokenizer, gprompt)
    gcfg = GCGConfig(suffix_len=config.gcg_suffix_len, steps=config.gcg_steps, topk=config.gcg_topk,
                     batch=config.gcg_batch, objective="targeted", seed=config.seed, progress=config.progress)
    gcg = gcg_attack(model, tokenizer, Sample(turn.before, tgt, gprompt), gcfg, turn=turn)
    gcg.threat_model = ("suffix appended to the user's message inside the chat template, before the end of "
                        "the turn and the assistant header (Zou et al. 2023); only text a user can send is "
                        "scored (search_space)")
    return gcg


def gcg_transfer(model, tokenizer, prompt: str, suffix_text: str, tgt: torch.Tensor) -> dict:
    """A GCG suffix found on another model, sent to this one: the user turn with ``suffix_text``
    tokenized afresh as a server would, the target's mean NLL (nats/token) after it and
    without it, and whether greedy decoding gives the target."""
    turn = UserTurn(tokenizer, prompt)
    real, clean = turn.ids([suffix_text, ""])
    nll = token_nll(model, [torch.cat([real, tgt]), torch.cat([clean, tgt])])
    ok = targeted_successes(model, [(Sample(real, tgt), None, AttackConfig(), None)])[0]
    return {"suffix_text": suffix_text, "target_nll": float(nll[0][-tgt.numel():].mean()),
            "clean_target_nll": float(nll[1][-tgt.numel():].mean()), "success": bool(ok)}


def _measures(model, tokenizer, samples: list[Sample], tgt: torch.Tensor, config: AdversarialConfig,
              clean: Optional[dict] = None) -> dict:
    """What every variant gets: the FGSM/PGD table, answers clean (``clean``: those known already)
    and under the strongest PGD, and targeted PGD; ``deltas`` (the PGD perturbations) stays out of
    the record."""
    table, deltas = _sweep(model, samples, config)
    return {"table": table, "answers": _answers(model, tokenizer, samples[config.n_windows:], deltas, config, clean),
            "targeted": _targeted(model, samples, tgt, config)}


def attack_variants(model, tokenizer, eval_ids: torch.Tensor, variants: dict, parents: dict,
                    config: AdversarialConfig, gcg: dict, live: Optional[tuple] = None,
                    samples: Optional[list] = None, clean: Optional[dict] = None) -> dict:
    """The attacks on every variant in ``variants`` ({name: weights}, applied in place one at a
    time and restored bit for bit): FGSM/PGD delta NLL at every eps with 95% intervals over
    samples, targeted PGD success (Wilson interval), greedy answers clean and attacked, and
    ``gcg`` (the live model's suffix, a GCGResult dict) transferred; with
    ``config.gcg_per_variant`` a GCG search of its own too. Every variant is attacked on the
    same samples (built on the model as it is: windows of ``eval_ids`` and the sample prompts
    with its own greedy answers), so differences from the parent are paired per sample.
    ``live``: (name, the ``_measures`` already taken on the model as it is); ``samples``: those
    ``build_samples`` gave (built here when None); ``clean``: {variant: {prompt: clean answer}} known
    already (``clean_answers``). Under torchrun the ranks take disjoint variants."""
    config = config.for_model(model)
    samples = samples if samples is not None else build_samples(model, tokenizer, eval_ids, config)
    tgt = torch.tensor(tokenizer(config.target, add_special_tokens=False).input_ids)
    prompt = _gcg_prompt(tokenizer, samples, config)
    names = [n for n in variants if not (live and n == live[0])]
    mine = []
    for i, name in C.shard_jobs(names):
        C.seed_everything(config.seed)  # every variant starts its attacks from the same random state
        with V.applied_variant(model, variants[name]):
            r = _measures(model, tokenizer, samples, tgt, config, (clean or {}).get(name))
            r["gcg_transfer"] = gcg_transfer(model, tokenizer, prompt, gcg["suffix_text"], tgt)
            if config.gcg_per_variant:
                r["gcg"] = asdict(_gcg(model, tokenizer, samples, tgt, config))
        mine.append((i, r))
    out = dict(zip(names, C.gather_jobs(mine)))
    if live and live[0] in variants:
        out[live[0]] = {**live[1], "gcg_transfer": gcg_transfer(model, tokenizer, prompt, gcg["suffix_text"], tgt)}
    out = {n: {"parent": parents.get(n), **out[n]} for n in variants}
    for row in out.values():  # paired by sample against the parent, when the parent was attacked too
        par = out.get(row["parent"] or "")
        if par:  # at the largest eps, the one the matrix reports: every test made enters the run's family
            top = max(a["eps"] for a in par["table"])
            row["vs_parent"] = {f"{a['method']}@{a['eps']:g}": ST.paired_difference(
                a["delta_nll_samples"], b["delta_nll_samples"], seed=config.seed, units="attacked samples")
                for a, b in zip(par["table"], row["table"]) if a["eps"] == top}
            # successes are 0/1 on the same samples: McNemar's exact test, not an interval of means
            row["vs_parent"]["targeted_success"] = ST.mcnemar_exact(par["targeted"]["hits"], row["targeted"]["hits"],
                                                                    seed=config.seed)
    return out


def test_adversarial_robustness(model, tokenizer, eval_ids: torch.Tensor,
                                config: AdversarialConfig = AdversarialConfig(),
                                samples: Optional[list] = None, variants: Optional[dict] = None,
                                parents: Optional[dict] = None, clean: Optional[dict] = None) -> AdversarialResult:
    """The adversarial step: delta NLL vs eps for FGSM and PGD, targeted success, answers
    under attack, GCG, and the two defences measured before and after. ``eval_ids`` is the
    tokenized evaluation text [n_tokens]. The model's weights are unchanged on return. With
    ``variants`` ({name: weights}, None for the model as it is; ``parents``: {name: parent}) the
    attacks (not the defences) also run on each of them (``attack_variants``), in ``.variants``.
    ``clean`` ({variant: {prompt: answer}}, ``clean_answers``): clean greedy answers already
    generated (the model as it is: under its name in ``variants``); they are not generated again.

    Every attack family runs as one batch: all samples x eps x method step together."""
    config = config.for_model(model)
    C.seed_everything(config.seed)
    t0 = time.perf_counter()
    secs = {}
    samples = samples if samples is not None else build_samples(model, tokenizer, eval_ids, config)
    table, deltas = _sweep(model, samples, config)
    secs["sweep"] = time.perf_counter() - t0

    t = time.perf_counter()
    live = next((n for n, w in (variants or {}).items() if w is None), None)
    answers = _answers(model, tokenizer, samples[config.n_windows:], deltas, config, (clean or {}).get(live))
    tgt = torch.tensor(tokenizer(config.target, add_special_tokens=False).input_ids)
    targeted = _targeted(model, samples, tgt, config)
    secs["targeted"] = time.perf_counter() - t

    t = time.perf_counter()
    gcg = _gcg(model, tokenizer, samples, tgt, config)
    secs["gcg"] = time.perf_counter() - t

    # Defence 1: perplexity filter, threshold from calibration prompts, FPR on held-out clean
    # prompts, TPR on those prompts with the GCG suffix appended and on GCG's own user text.
    pfilter = _filter(model, tokenizer, eval_ids, gcg, config)
    t = time.perf_counter()
    defence = _defence(model, samples, _windows(eval_ids, config.n_windows, config, offset=0.5), config)
    secs["defence"] = time.perf_counter() - t
    res = AdversarialResult(mean_row_norm(model), config.norm, len(samples), table, answers, targeted,
                            asdict(gcg), pfilter, defence, secs, asdict(config))
    if variants:
        t = time.perf_counter()
        res.variants = attack_variants(model, tokenizer, eval_ids, variants, parents or {}, config, res.gcg,
                                       (live, {"table": table, "answers": answers, "targeted": targeted})
                                       if live else None, samples, clean)
        secs["variants"] = time.perf_counter() - t
    secs["total"] = time.perf_counter() - t0
    return res


test_adversarial_robustness.__test__ = False  # the historical name; not a pytest test


def _nan_mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def pipeline_step(run: Run, config: AdversarialConfig) -> None:
    """The pipeline's adversarial step: every attack and defence on the live model, then the
    attacks (not the defences) on every chosen variant (``--robustness-variants``), each with
    the live model's GCG suffix transferred."""
    run.results["adversarial"] = asdict(test_adversarial_robustness(
        run.model, run.tokenizer, run.ids("eval"), config, variants=run.chosen(config.variants), parents=run.parents,
        clean=clean_answers(run.results, config)))
