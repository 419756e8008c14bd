"""The run's plan, before its first step: the variants each step will hold, the units each measure
uses, and the time each step should take on this machine.

Variants: each variant step's ``planned`` hook (``llm_steps``) names what it will make, from the
flags alone; ``check_variant_patterns`` refuses, before loading, a pattern that can choose nothing.

Time: ``time_passes`` times one short forward and one forward+backward pass of the loaded model
(median of a few repeats, a second or two for a 135M model on CPU) as seconds per token;
``planned_passes`` counts the tokens each step sends forward and backward through the decoder, from
its resolved config alone (the same passes that ``PassCounter`` counts by hooks and that
``bench/bench_passes.py`` checks against each algorithm's minimum). Their product is the estimate:
it counts passes only (not lm-eval's, the export's or the report's file work, nor a busy neighbour),
at the timed length rather than each window's own, so it is an order of magnitude to plan by.
The manifest records it beside each step's actual wall time (``manifest.estimate``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from pathlib import Path

import torch

import llm_model as LM
import llm_results as R
import llm_steps
import llm_variants as V
from llm_config import ALL_STEPS
from llm_knobs import flag_of, parse_variant_patterns

log = logging.getLogger("llm.main")


# --------------------------------------------------------------------------- variants


def planned_variants(configs: dict, earlier: list) -> dict:
    """{step: (the variant names the run may hold once the step's ``planned`` hook has run, the live
    one)}, in pipeline order, starting from base and the ``earlier`` run's variants: a superset, so
    nothing valid is refused. Raises UserError where a step's source will not be there."""
    names, live, out = list(dict.fromkeys(["base", *map(str, earlier)])), "base", {}
    for step, config in sorted(configs.items(), key=lambda sc: ALL_STEPS.index(sc[0])):
        plan = llm_steps.hook(step, "planned")
        if plan:
            names, live = plan(config, names, live)
        out[step] = (list(names), live)
    return out


def check_variant_patterns(configs: dict, out: Path) -> None:
    """Before loading: every variant pattern (``--robustness-variants``, ``--quantize-from``) must
    choose a variant that the run will hold when its step runs: the names the variant steps will make
    (its own included) and those an earlier run into ``out`` left. A typo, ``ALL`` or a variant of a
    step that is not run fails now (UserError), not after the steps before it ran."""
    try:  # never touched here: a results.json not ours is dealt with (moved aside) under the lock, later
        earlier = R.field(R.read_results(out, foreign=True), "variants", kind=dict, default={}) \
            if (out / "results.json").is_file() else {}
    except (OSError, ValueError):
        earlier = {}
    plan = planned_variants(configs, list(earlier))
    for step, (names, live) in plan.items():
        config = configs[step]
        ignored = {flag for flag, _ in config.ignored()}
        for f in dataclasses.fields(config):
            flag = flag_of(type(config), f)
            if f.metadata.get("parse") is parse_variant_patterns and flag not in ignored:
                V.select_variants(names, getattr(config, f.name), live, flag=flag)


# --------------------------------------------------------------------------- passes


class PassCounter:
    """Counts what goes through the decoder: forward hooks on every block and counting wrappers
    around ``torch.autograd.grad`` / ``backward`` (installed until ``close``). ``close()`` returns
    {"fwd_tokens": tokens through the blocks / number of blocks (a [B, L] forward counts B*L),
    "fwd_passes": block calls / blocks, "mean_batch": rows per pass, "bwd": backward calls}."""

    def __init__(self, model):
        self.layers = LM.decoder_layers(model)
        self.tokens = self.layer_calls = self.rows = self.calls0 = self.bwd = 0
        self.handles = [layer.register_forward_hook(self._hook(i), with_kwargs=True)
                        for i, layer in enumerate(self.layers)]
        self._grad, self._backward = torch.autograd.grad, torch.autograd.backward

        def grad(*a, **k):
            self.bwd += 1
            return self._grad(*a, **k)

        def backward(*a, **k):
            self.bwd += 1
            return self._backward(*a, **k)

        torch.autograd.grad, torch.autograd.backward = grad, backward

    def _hook(self, i):
        def hook(module, args, kwargs, out):
            h = args[0] if args else kwargs["hidden_states"]
            self.tokens += h.shape[0] * h.shape[1]
            self.layer_calls += 1
            if i == 0:
                self.calls0 += 1
                self.rows += h.shape[0]
        return hook

    def close(self) -> dict:
        for h in self.handles:
            h.remove()
        torch.autograd.grad, torch.autograd.backward = self._grad, self._backward
        n = len(self.layers)
        return {"fwd_tokens": self.tokens / n, "fwd_passes": self.layer_calls / n,
                "mean_batch": self.rows / max(self.calls0, 1), "bwd": self.bwd}


def scored_tokens(n_available: int, seq: int, limit=None) -> int:
    """Tokens in the whole windows of ``seq`` that a budget of ``limit`` tokens (None: all) buys."""
    n = n_available if limit is None else min(n_available, limit)
    return (n // seq) * seq


def planned_passes(step: str, config, facts: dict) -> dict:
    """{"fwd_tokens", "bwd_tokens", "units"} of ``step`` run with its resolved ``config``: tokens the
    step sends forward and backward through the decoder, as the module doc of
    ``bench/bench_passes.py`` counts each algorithm's passes, from the config alone (what a step
    finds as it runs, super weights or lm-eval's requests, is taken at its cap), and the units its
    measures use, in words. ``facts``: "eval_tokens" and "train_tokens" (of the texts), "measured"
    (variants the step measures), "prompt_tokens" (of each prompt), "layers", "linears"."""
    c, f = config, facts
    n = max(1, f.get("measured", 1))
    if step == "finetune":
        if c.mode == "none":
            return {"fwd_tokens": 0, "bwd_tokens": 0, "units": "off (--finetune none)"}
        L = c.seq_len
        hold = (min(max(int(f["train_tokens"] * c.holdout_fraction), L), c.holdout_windows * L) // L) * L
        train = c.steps * c.batch_size * L
        return {"fwd_tokens": train + 2 * hold, "bwd_tokens": train,
                "units": f"{c.steps} steps x {c.batch_size} windows of {L} tokens ({c.mode})"}
    if step == "prune":
        points = c.grid_points()
        calib = sum(2 * p.calib_samples * p.calib_seq_len for p in points if p.method != "magnitude")
        return {"fwd_tokens": calib, "bwd_tokens": 0, "units": f"{len(points)} variant(s), {c.calib_samples} "
                f"calibration windows of {c.calib_seq_len} tokens"}
    if step == "quantize":
        if c.method == "none":
            return {"fwd_tokens": 0, "bwd_tokens": 0, "units": "off (--quant-method none)"}
        fwd = bwd = 0
        points = c.grid_points()
        for p in points:
            seq, sw = p.calib_seq_len, min(p.sensitivity_windows, p.calib_samples)
            fwd += 2 * p.calib_samples * seq if p.method == "gptq" else 0
            if p.keep_fraction > 0 or p.bit_allocation == "fisher":
                fwd, bwd = fwd + sw * seq, bwd + sw * seq
            if p.bit_allocation == "hessian":
                fwd, bwd = fwd + sw * seq, bwd + (1 + p.sensitivity_probes) * sw * seq
        return {"fwd_tokens": fwd, "bwd_tokens": bwd, "units": f"{len(points)} variant(s), {c.method}, "
                f"{c.calib_samples} calibration windows of {c.calib_seq_len} tokens"}
    if step == "noise":
        seq = min(c.sweep_seq_len, c.sweep_tokens)
        ts = scored_tokens(f["eval_tokens"], seq, c.sweep_tokens)
        curves = 2 if c.protect_fraction > 0 else 1
        nwin = c.fisher_windows if c.protect_fraction > 0 else 0
        k = len(c.sweep_eps) * c.sweep_seeds
        fwd = (1 + k * curves) * ts + nwin * c.fisher_seq_len + (n - 1) * (1 + k) * ts
        if c.map:
            tm = scored_tokens(f["eval_tokens"], min(seq, c.map_tokens), c.map_tokens)
            fwd += (1 + f["layers"] * f["linears"]) * tm
        return {"fwd_tokens": fwd, "bwd_tokens": nwin * c.fisher_seq_len,
                "units": f"{len(c.sweep_eps)} eps x {c.sweep_seeds} seeds over {ts // max(seq, 1)} windows of "
                         f"{seq} tokens, {n} variant(s)" + (", a layer x module map" if c.map else "")}
    if step == "eval":
        te = scored_tokens(f["eval_tokens"], c.seq_len, c.eval_tokens or None)
        gen = sum(t + c.max_new_tokens - 1 for t in f["prompt_tokens"])
        return {"fwd_tokens": n * (te + gen), "bwd_tokens": 0,
                "units": f"perplexity: {te // c.seq_len} windows of {c.seq_len} tokens, {c.sampling}; "
                         f"{len(f['prompt_tokens'])} sample prompt(s); {n} variant(s)"}
    if step == "zeroshot":
        if not c.enabled:
            return {"fwd_tokens": 0, "bwd_tokens": 0, "units": "off"}
        questions = c.limit or 1000  # a whole task: of the order of a thousand questions
        # four choices of about 64 tokens each: a typical multiple-choice request, not counted from the task
        fwd = n * len(c.tasks) * questions * 4 * 64
        return {"fwd_tokens": fwd, "bwd_tokens": 0, "units": f"{len(c.tasks)} task(s) x "
                f"{c.limit or 'all'} questions, {n} variant(s)"}
    if step == "safety":
        if not c.enabled:
            return {"fwd_tokens": 0, "bwd_tokens": 0, "units": "off"}
        # all of a set: HarmBench's 159 standard behaviours (32 shipped, without a data folder), StrongREJECT's
        # 313; a user's file is not read here and counts as StrongREJECT's size
        full = {"harmbench": 159 if c.data_dir else 32}.get(c.prompt_set, 313)
        prompts = min(c.n_prompts, full) if c.n_prompts else full
        turn = 48  # a behaviour in the chat template: about 48 tokens, not counted from the set
        fwd = n * (prompts + c.gcg_behaviours) * (turn + c.max_new_tokens)
        tail = turn + c.gcg_suffix_len + 8  # prompt, suffix, template tail and target
        fwd += c.gcg_behaviours * c.gcg_steps * (tail + c.gcg_batch * (c.gcg_suffix_len + 16))
        return {"fwd_tokens": fwd, "bwd_tokens": c.gcg_behaviours * c.gcg_steps * tail,
                "units": f"{c.n_prompts or 'all'} harmful prompt(s) x {c.max_new_tokens} answer tokens; GCG on "
                         f"{c.gcg_behaviours} behaviour(s) x {c.gcg_steps} steps; {n} variant(s)"}
    if step == "export":
        return {"fwd_tokens": 0, "bwd_tokens": 0,
                "units": f"writes {n} variant(s)" if c.enabled else "off (no --export)"}
    if step == "adversarial":
        return _adversarial(c, f, n)
    if step == "analysis":
        tq = scored_tokens(f["eval_tokens"], min(c.eval_seq_len, c.eval_tokens), c.eval_tokens)
        hess = c.calib_windows * c.calib_seq_len
        found = c.max_super_weights
        fwd = n * hess + c.fisher_windows * c.calib_seq_len + (found + 1) * f["prompt_tokens"][0] \
            + n * (1 + found) * tq + len(c.quant_bits) * 3 * tq
        bwd = n * (1 + c.max_probes + c.power_iters) * hess + c.fisher_windows * c.calib_seq_len
        return {"fwd_tokens": fwd, "bwd_tokens": bwd, "units": f"{c.calib_windows} Hessian window(s) of "
                f"{c.calib_seq_len} tokens, up to {c.max_probes} probes; {n} variant(s)"}
    raise KeyError(step)


def _adversarial(c, f: dict, n: int) -> dict:
    """The attacks' passes: per measured variant the sweep (clean, FGSM, PGD steps + 1 per eps) and
    targeted PGD over every sample, the answers; GCG once; the defence's training and its attacks."""
    samples = c.n_windows + len(c.prompts)
    lens = samples * (c.prompt_len + c.continuation_len)
    tl = samples * (c.prompt_len + 4)  # the target: a few tokens
    sweep = lens + len(c.epsilons) * lens * (c.pgd_steps + 3) + tl * (c.targeted_steps + 2)
    fwd = n * sweep + n * 2 * sum(t + c.max_new_tokens for t in f["prompt_tokens"])
    bwd = n * (c.pgd_steps * len(c.epsilons) * lens + c.targeted_steps * tl)
    tail = c.gcg_suffix_len + 16  # suffix, template tail and target
    fwd += tail * c.gcg_steps * (1 + c.gcg_batch)
    bwd += tail * c.gcg_steps
    if c.defence != "none":
        train = c.n_windows * (c.prompt_len + c.continuation_len)
        per = 1 if c.defence == "free" else c.pgd_steps + 1
        fwd += 2 * (lens + train) * (c.pgd_steps + 2) + c.defence_steps * train * per
        bwd += 2 * c.pgd_steps * (lens + train) + c.defence_steps * train * per
    return {"fwd_tokens": fwd, "bwd_tokens": bwd, "units": f"attacks: {samples} samples x {len(c.epsilons)} eps, "
            f"PGD {c.pgd_steps} steps; GCG {c.gcg_steps} steps; defence {c.defence}; {n} variant(s)"}


# --------------------------------------------------------------------------- time


def time_passes(model, tokens: int = 64, repeats: int = 3) -> dict:
    """{"fwd_s_per_token", "fwd_bwd_s_per_token", "tokens"}: the median over ``repeats`` (after one
    warm-up) of one forward, and of one forward + backward (to the input embeddings and every
    parameter that takes a gradient), of a [1, tokens] batch of fixed ids, divided by ``tokens``.
    The model's weights, gradients (left None) and the global RNG are as they were."""
    device = LM.input_device(model)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.arange(tokens, device=device).mul(7919).remainder(vocab).unsqueeze(0)  # no RNG drawn
    was_training = model.training
    model.eval()

    def once(backward: bool) -> float:
        t = time.perf_counter()
        if backward:
            with torch.enable_grad():
                emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                model(inputs_embeds=emb, labels=ids).loss.backward()
        else:
            with torch.no_grad():
                model(input_ids=ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    try:
        out = {}
        for key, backward in (("fwd_s_per_token", False), ("fwd_bwd_s_per_token", True)):
            once(backward)
            out[key] = statistics.median(once(backward) for _ in range(repeats)) / tokens
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {**out, "tokens": tokens}


def _text_tokens(run, which: str) -> int:
    """Tokens of the run's ``which`` text; a document corpus (a C4 shard) is sampled document by
    document as far as each step asks, never tokenized whole: as long as any budget."""
    corpus = run.texts.get(which)
    if corpus is None:
        return 0
    return 10 ** 12 if getattr(corpus, "docs", None) is not None else run.ids(which).numel()


def estimate(run, configs: dict) -> dict:
    """The plan of ``run`` (model loaded, no step run yet) for ``configs`` ({step: resolved config},
    in order): {"timing": ``time_passes``, "steps": {step: {"units", "fwd_tokens", "bwd_tokens",
    "variants", "estimated_s"}}, "estimated_s": their sum}. Seconds are finite and >= 0."""
    timing = time_passes(run.model)
    fwd, bwd = timing["fwd_s_per_token"], max(timing["fwd_bwd_s_per_token"] - timing["fwd_s_per_token"], 0.0)
    tok = run.tokenizer
    facts = {"eval_tokens": _text_tokens(run, "eval"), "train_tokens": _text_tokens(run, "train"),
             "layers": len(LM.decoder_layers(run.model)),
             "linears": len(LM.block_linears(LM.decoder_layers(run.model)[0]))}
    variants = planned_variants(configs, [n for n in run.variants if n != "base"])
    steps = {}
    for step, config in configs.items():
        names, live = variants[step]
        patterns = getattr(config, "variants", None)
        measured = V.select_variants(names, patterns, live) if patterns else names
        prompts = getattr(config, "prompts", None) or (getattr(config, "super_weight_prompt", ""),)
        f = {**facts, "measured": len(measured), "prompt_tokens": [len(tok(p).input_ids) for p in prompts]}
        p = planned_passes(step, config, f)
        seconds = p["fwd_tokens"] * fwd + p["bwd_tokens"] * bwd
        steps[step] = {**p, "variants": list(measured), "estimated_s": seconds if math.isfinite(seconds) else None}
    return {"timing": timing, "steps": steps, "estimated_s": sum(s["estimated_s"] or 0.0 for s in steps.values())}


def plan_lines(plan: dict) -> list:
    """The plan in words, one line per step and a total line (what the log and --dry-run show)."""
    t = plan["timing"]
    lines = [f"plan: one forward {1e3 * t['fwd_s_per_token'] * t['tokens']:.0f} ms, forward+backward "
             f"{1e3 * t['fwd_bwd_s_per_token'] * t['tokens']:.0f} ms per {t['tokens']} tokens on this machine"]
    for step, s in plan["steps"].items():
        lines.append(f"  {step:<12} ~{_duration(s['estimated_s'])}  {s['units']}  [{', '.join(s['variants'])}]")
    lines.append(f"  {'total':<12} ~{_duration(plan['estimated_s'])} (forward and backward passes only)")
    return lines


def _duration(seconds) -> str:
    if seconds is None:
        return "?"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
