"""Passes per step against the minimum each algorithm needs (issue 12's batching target).

    python bench/bench_passes.py [--budget gpu] [--defence free|pgd|none] [--out DIR]

Runs all nine steps on a tiny random Llama (4 layers, hidden 64, byte tokenizer) with the
GPU budget profile (step counts, windows, batch shapes, attack and GCG sizes as on a GPU)
but short token lengths, so it finishes on 2 CPU cores in under three minutes. It never
downloads: the hub is set offline, the texts are local, and zero-shot runs the local
lm-eval task shipped in ``bench/tasks`` (32 four-way questions). Hooks count, per step:
  fwd tok  tokens through the decoder blocks / number of blocks (one full forward of a
           [B, L] batch counts B*L; a layer-wise pass over all blocks counts the same);
  fwd      forward passes (layer calls / blocks) and mean batch (rows per pass);
  bwd      backward passes (calls of torch.autograd.backward / torch.autograd.grad, i.e.
           first-order backward and each Hessian-vector product's double backward).
Each is printed beside the minimum the algorithm needs, and ratio = max(fwd tok / min,
bwd / min) (a step whose minimum is zero and that runs nothing counts 1): the target is
<= 1.25 for every step.

The minimum, per step (tokens exclude padding):
  finetune    fwd: steps x batch x seq + 2 x held-out tokens (before/after); bwd: steps.
  prune       fwd: 2 x calibration tokens (Wanda/SparseGPT: each block once to collect its
              input statistics, once more to feed the pruned block's output to the next).
  noise       fwd: (1 clean + eps x seeds x curves) x sweep tokens + Fisher windows
              + (1 clean + layers x modules cells) x map tokens; bwd: Fisher windows. Per other
              measured variant: (1 clean + eps x seeds) x sweep tokens.
  quantize    fwd: GPTQ 2 x calibration tokens (as prune; RTN none) + super-weight search (found
              + 1 passes of the prompt) + sensitivity windows once; bwd: one per sensitivity
              window (keep fraction and Fisher bits share them), or 1 + probes (Hessian bits).
  eval        fwd: variants x (evaluation tokens + per prompt: prompt + new tokens - 1 with
              the KV cache).
  zeroshot    fwd: variants x one forward per distinct lm-eval request: lm-eval scores a
              (context, continuation) request on context + continuation minus its last
              token, and requests sharing that input share one forward (its logits cache);
              at batch size b, ceil(requests / b) passes, padded to the longest row.
  export      nothing: writing the variants needs no forward pass. On CUDA with --export-2of4,
              the 2:4 logits check (one dense and one sparse forward of 32 tokens) and the
              speed measurement (13 timed and warm-up forwards per batch size, dense and 2:4).
  adversarial fwd: per sample once clean; per attack row (sample x eps x method) one pass per
              step plus the final iterate; greedy answers with the KV cache; GCG: the prefix
              once, then per step one pass for the gradient plus one per scored candidate
              (the initial suffix and those that tokenize back in context) over suffix +
              template tail + target only; filter: each prompt once (calibration, held-out, and
              the attacked texts as tokenized); defence (--defence):
              PGD attacks before and after, and per training step for free (Free-AT) one
              training pass over the training windows, for pgd (PGD-AT) the attack's PGD
              steps + 1 training pass, for none nothing. bwd: one batched backward per attack
              step (sweep, targeted, before, after), GCG steps, and defence steps (free) or
              defence steps x (PGD steps + 1) (pgd).
  analysis    fwd: Hessian windows once (the gradient graph is reused by every probe and
              power iteration), Fisher windows, super-weight detection (found + 1 passes of
              the prompt), ablation (1 + candidates) and quantization (bits x 3) evaluations;
              bwd: 1 + probes + power iterations + Fisher windows. Per other measured variant
              (--robustness-variants): its Hessian windows once and, where it keeps k > 0 super
              weights, 1 + k ablation evaluations; bwd 1 + probes + power iterations.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bench never downloads
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import llm_adversarial_test as ADV  # noqa: E402
import llm_common as C  # noqa: E402
import llm_data as D  # noqa: E402
import llm_gcg as G  # noqa: E402
import llm_model as LM  # noqa: E402
import llm_sensitivity as S  # noqa: E402
import llm_main_v4 as M  # noqa: E402
from llm_plan import PassCounter  # noqa: E402  (the one counter, also the estimate's reference)
from llm_run import Run  # noqa: E402
from conftest import make_llama, make_tokenizer  # noqa: E402
from pipeline_counts import run_wrapped  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
VALID = ROOT.parent / "shared" / "data" / "wikitext-2-tokenized" / "valid.txt"
TASKS = ROOT / "bench" / "tasks"
TASK = "trivia_mc"


def _eval_tokens(n_available: int, seq: int, limit) -> int:
    n = n_available if limit is None else min(n_available, limit)
    return (n // seq) * seq


def minimum(step: str, run: Run, cfg) -> tuple[float, int]:
    """(minimum forward tokens, minimum backward passes) for ``step`` run with the resolved
    config ``cfg``; see the module doc."""
    r, n_eval = run.results, run.ids("eval").numel()
    if step == "finetune":
        L = cfg.seq_len
        n_hold = max(int(run.ids("train").numel() * cfg.holdout_fraction), L)
        hold = (min(n_hold, cfg.holdout_windows * L) // L) * L
        return cfg.steps * cfg.batch_size * L + 2 * hold, cfg.steps
    if step == "prune":
        return 2 * cfg.calib_samples * cfg.calib_seq_len, 0
    if step == "noise":
        seq = min(cfg.sweep_seq_len, cfg.sweep_tokens)
        ts = _eval_tokens(n_eval, seq, cfg.sweep_tokens)
        curves = 2 if cfg.protect_fraction > 0 else 1
        nwin = cfg.fisher_windows if cfg.protect_fraction > 0 else 0  # Fisher windows of the protected curve
        fwd = (1 + len(cfg.sweep_eps) * cfg.sweep_seeds * curves) * ts + nwin * cfg.fisher_seq_len
        smap = r["noise"].get("map")
        if smap:
            tm = _eval_tokens(n_eval, min(seq, cfg.map_tokens), cfg.map_tokens)
            fwd += (1 + len(smap["layers"]) * len(smap["modules"])) * tm
        others = [n for n in r["noise"]["variants"] if n != run.live]  # the live model's sweep serves its row
        fwd += len(others) * (1 + len(cfg.sweep_eps) * cfg.sweep_seeds) * ts
        return fwd, nwin
    if step == "quantize":
        return quantize_minimum(run, cfg)
    if step == "eval":
        te = _eval_tokens(n_eval, cfg.seq_len, cfg.eval_tokens or None)
        gen = sum(len(run.tokenizer(p).input_ids) + cfg.max_new_tokens - 1 for p in cfg.prompts)
        return len(r["evaluation"]) * (te + gen), 0
    if step == "zeroshot":
        return zeroshot_minimum(run, cfg)
    if step == "export":
        return export_minimum(run, cfg)
    if step == "adversarial":
        return adversarial_minimum(run, cfg)
    if step == "analysis":
        an = r["analysis"]
        tq = _eval_tokens(n_eval, min(cfg.eval_seq_len, cfg.eval_tokens), cfg.eval_tokens)
        n_sw = len(an["super_weights"])
        fwd = (cfg.calib_windows * cfg.calib_seq_len + cfg.fisher_windows * cfg.calib_seq_len
               + _super_weight_search(run, cfg.super_weight_prompt, n_sw, cfg.max_super_weights)
               + (1 + n_sw) * tq + len(cfg.quant_bits) * 3 * tq)
        bwd = 1 + an["hutchinson_probes"] + an["power_iterations"] + cfg.fisher_windows
        for name, row in an["variants"].items():  # per variant: its Hessian graph, probes and ablations
            if name != run.live:
                cv = row["curvature"]
                fwd += cfg.calib_windows * cfg.calib_seq_len
                kept = sum(s["status"] != "pruned" for s in row["super_weights"])
                fwd += (1 + kept) * tq if kept else 0  # the clean evaluation only where one is ablated
                bwd += 1 + cv["probes"] + cv["power_iterations"]
        return fwd, bwd
    raise KeyError(step)


def _super_weight_search(run: Run, prompt: str, found: int, cap: int) -> int:
    """Tokens of the data-free super-weight search: the prompt once per round, found + 1 rounds
    (the last finds nothing), at most ``cap``."""
    return min(cap, found + 1) * len(run.tokenizer(prompt).input_ids)


def quantize_minimum(run: Run, cfg) -> tuple[float, int]:
    """GPTQ: each block once to collect its input Hessian and once more to feed the quantized
    block's output to the next (RTN: no data); the super-weight search (found + 1 passes of
    the prompt, at most 4); the sensitivity windows once for the gradients that the keep
    fraction and the Fisher bits share (one backward each), or once for Hutchinson's graph
    (1 + probes backward passes)."""
    q = run.results["quantize"]
    if q["status"] != "ran":
        return 0, 0
    n, seq = q["calibration"]["windows"], q["calibration"]["seq_len"]
    fwd = 2 * n * seq if cfg.method == "gptq" else 0
    bwd = 0
    if cfg.protect == "auto":  # protected_coordinates searches with detect_super_weights' own cap
        cap = inspect.signature(S.detect_super_weights).parameters["max_weights"].default
        fwd += _super_weight_search(run, cfg.super_weight_prompt, len(q["super_weights"]), cap)
    sw = min(cfg.sensitivity_windows, n)
    if cfg.keep_fraction > 0 or cfg.bit_allocation == "fisher":
        fwd, bwd = fwd + sw * seq, bwd + sw
    if cfg.bit_allocation == "hessian":
        fwd, bwd = fwd + sw * seq, bwd + 1 + cfg.sensitivity_probes
    return fwd, bwd


def zeroshot_minimum(run: Run, cfg) -> tuple[float, int]:
    """Per variant, one forward per distinct lm-eval input, built by lm-eval itself: its
    requests for the tasks, encoded as its HFLM encodes them; an input is context +
    continuation without the last token, so requests that share it share one forward."""
    import lm_eval.models.huggingface as hf
    from lm_eval.tasks import TaskManager

    z = run.results["zeroshot"]
    if z["status"] != "ran":
        return 0, 0
    lm = hf.HFLM(pretrained=run.model, tokenizer=run.tokenizer, batch_size=1)
    tasks = TaskManager(include_path=cfg.include_path).load(list(z["protocol"]["specs"]))["tasks"]
    inputs = set()
    for name, task in tasks.items():
        task.build_all_requests(limit=cfg.limit or None, rank=0, world_size=1)
        for inst in task.instances:
            ctx, cont = inst.args
            c, x = lm._encode_pair(ctx, cont) if ctx else ([lm.prefix_token_id], lm.tok_encode(cont))
            inputs.add((name, tuple((c + x)[-(lm.max_length + 1):][:-1])))
    return len(z["tasks"]) * sum(len(x) for _, x in inputs), 0


def export_minimum(run: Run, cfg) -> tuple[float, int]:
    """Writing variants needs no forward pass; the 2:4 check and speed runs only on CUDA."""
    speed = (run.results["export"].get("two_of_four") or {})
    if speed.get("status") != "ran":
        return 0, 0
    return 2 * 32 + 2 * sum(13 * b * cfg.speed_seq_len for b in cfg.speed_batches), 0


def filter_minimum(run: Run, cfg: ADV.AdversarialConfig, gcg: dict) -> int:
    """The perplexity filter scores each prompt once: the calibration and held-out windows, and
    the attacked texts (each held-out window's text with GCG's suffix text, and GCG's own user
    message), tokenized as ``_filter`` does."""
    eval_ids, tok = run.ids("eval"), run.tokenizer
    n = max(2, min(cfg.filter_prompts, eval_ids.numel() // (2 * cfg.prompt_len)))
    held = [s.prompt for s in ADV._windows(eval_ids, n, dataclasses.replace(cfg, continuation_len=0), offset=0.75)]
    texts = [tok.decode(x) + gcg["suffix_text"] for x in held] + [gcg["user_message"]]
    return 2 * n * cfg.prompt_len + sum(len(x) for x in tok(texts, add_special_tokens=False).input_ids)


def adversarial_minimum(run: Run, cfg: ADV.AdversarialConfig) -> tuple[float, int]:
    """Minimum for the adversarial step from the same samples it builds (rebuilt after the
    step, outside the counters)."""
    tok = run.tokenizer
    samples = ADV.build_samples(run.model, tok, run.ids("eval"), cfg)
    lens = [s.prompt.numel() + s.continuation.numel() for s in samples]
    prompts = samples[cfg.n_windows:]
    steps = cfg.pgd_steps
    fwd = sum(len(ADV._chat_ids(tok, p)) + cfg.continuation_len - 1 for p in cfg.prompts)  # answers
    fwd += sum(lens) + len(cfg.epsilons) * sum(lens) * (2 + steps + 1)  # sweep: clean, FGSM 2, PGD steps + 1
    fwd += sum(2 * (s.prompt.numel() + cfg.max_new_tokens - 1) for s in prompts)  # answers, clean + attacked
    T = len(tok(cfg.target, add_special_tokens=False).input_ids)
    tl = [s.prompt.numel() + T for s in samples]
    fwd += sum(tl) * (1 + cfg.targeted_steps + 1) + sum(x - 1 for x in tl)  # targeted + success decoding
    adv = run.results["adversarial"]
    g = adv["gcg"]
    before, after = G.chat_parts(tok, cfg.prompts[0])
    tail = cfg.gcg_suffix_len + after.numel() + T
    # prefix once, one gradient pass per step, every scored candidate, then the success decode
    fwd += before.numel() + tail * (cfg.gcg_steps + g["candidates_scored"]) + before.numel() + tail - 1
    fwd += filter_minimum(run, cfg, g)
    bwd = steps + cfg.targeted_steps + cfg.gcg_steps
    # Per variant: the sweep, the answers and targeted PGD again (the live model's serve its own
    # row), and GCG's suffix transferred to every variant (the target after the suffix and
    # without it, and the success decode).
    others = [n for n in adv["variants"] if n != run.live]
    per = (sum(lens) + len(cfg.epsilons) * sum(lens) * (2 + steps + 1)
           + sum(2 * (s.prompt.numel() + cfg.max_new_tokens - 1) for s in prompts)
           + sum(tl) * (1 + cfg.targeted_steps + 1) + sum(x - 1 for x in tl))
    turn = G.UserTurn(tok, cfg.prompts[0])
    real, clean = turn.ids([g["suffix_text"], ""])
    transfer = real.numel() + clean.numel() + 2 * T + real.numel() + T - 1
    fwd += len(others) * per + len(adv["variants"]) * transfer
    bwd += len(others) * (steps + cfg.targeted_steps)
    defence = adv["adversarial_training"]["defence"]
    if defence != "none":
        train = cfg.n_windows * (cfg.prompt_len + cfg.continuation_len)
        every = sum(lens) + train
        fwd += 2 * every * (1 + steps + 1)  # PGD before and after: clean, steps, final
        bwd += 2 * steps
        per_step = 1 if defence == "free" else steps + 1  # Free-AT: the training pass is the attack's
        fwd += cfg.defence_steps * train * per_step
        bwd += cfg.defence_steps * per_step
    return fwd, bwd


def _ratio(measured: float, least: float) -> float:
    """measured / minimum; a minimum of zero is met (1) by zero and missed (inf) by anything."""
    if least == 0:
        return 1.0 if measured == 0 else math.inf
    return measured / least


def _report(counts: dict, budget: str, total: float) -> float:
    """Print the table; return the worst ratio."""
    print(f"tiny Llama (4 x 64), {budget} budget profile, {total:.1f} s on CPU")
    print(f"{'step':12s} {'fwd tok':>10s} {'min':>10s} {'fwd':>7s} {'batch':>7s} {'bwd':>6s} {'min':>6s} {'ratio':>6s}")
    worst = 0.0
    for name in M.ALL_STEPS:
        if name not in counts:
            continue
        c = counts[name]
        fmin, bmin = c["min"]
        ratio = max(_ratio(c["fwd_tokens"], fmin), _ratio(c["bwd"], bmin))
        worst = max(worst, ratio)
        print(f"{name:12s} {c['fwd_tokens']:10.0f} {fmin:10.0f} {c['fwd_passes']:7.1f} {c['mean_batch']:7.1f} "
              f"{c['bwd']:6d} {bmin:6d} {ratio:6.3f}")
    missing = [n for n in M.ALL_STEPS if n not in counts]
    if missing:
        print(f"steps that did not run: {', '.join(missing)}")
        worst = math.inf
    print(f"worst ratio {worst:.3f} over {len(counts)} steps (target <= 1.25)")
    return worst


def _counted(name: str, adapter, counts: dict):
    """The step's adapter, with its passes counted and its minimum computed afterwards."""
    def counted(run, mod, cfg):
        t = time.perf_counter()
        counter = PassCounter(run.model)
        try:
            adapter(run, mod, cfg)
        finally:
            counts[name] = counter.close()
            counts[name]["seconds"] = time.perf_counter() - t
        counts[name]["min"] = minimum(name, run, cfg)
    return counted


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="gpu", choices=("gpu", "cpu"))
    p.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    p.add_argument("--defence", default=None, choices=("free", "pgd", "none"),
                   help="the adversarial step's defence (default: the budget's)")
    a = p.parse_args(argv)
    C.setup_logging("WARNING")
    # A 64-wide model's matmuls are too small to split: a second thread only adds sync, and on
    # a shared 2-core machine its spin-waits made a forward 10x slower (220 vs 21 ms, measured).
    torch.set_num_threads(1)
    work = Path(a.out or tempfile.mkdtemp(prefix="bench_passes."))
    model_dir = work / "model"
    make_llama(layers=4, hidden=64).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    text = WIKI.read_text()[:400_000] if WIKI.is_file() else D.embedded_corpus("test")
    train = VALID.read_text()[:400_000] if VALID.is_file() else D.embedded_corpus("train")
    (work / "eval.txt").write_text(text)
    (work / "train.txt").write_text(train)
    # lm-eval resolves a task's data files against the working directory: a copy of the task
    # whose YAML names its JSONL by absolute path runs from anywhere.
    (work / "tasks").mkdir(exist_ok=True)
    yaml = (TASKS / f"{TASK}.yaml").read_text()
    (work / "tasks" / f"{TASK}.yaml").write_text(yaml.replace(f"bench/tasks/{TASK}.jsonl", str(TASKS / f"{TASK}.jsonl")))
    # The GPU profile's structure (step counts, windows, batch shapes) at short token lengths.
    argv = ["--model", str(model_dir), "--device", "cpu", "--budget", a.budget, "--output-dir", str(work / "out"),
            "--dataset", str(work / "eval.txt"), "--train-dataset", str(work / "train.txt"),
            "--log-level", "WARNING", "--seq-len", "256", "--eval-tokens", "8192", "--ft-seq-len", "64",
            "--ft-steps", "100", "--calib-seq-len", "64", "--sweep-tokens", "1024", "--sweep-seq-len", "256",
            "--noise-fisher-seq-len", "64", "--map-tokens", "1024", "--analysis-seq-len", "64",
            "--analysis-eval-tokens", "1024", "--analysis-eval-seq-len", "256", "--max-new-tokens", "16",
            "--attack-prompt-len", "64",  # windows stay longer than the chat prompt rows, as on a GPU
            "--gcg-steps", "20", "--defence-steps", "10", "--hessian-probes", "20", "--hessian-tol", "0",
            # the quantized variant with everything that costs passes: GPTQ, super weights, keep, Fisher bits
            "--quant-method", "gptq", "--protect-super-weights", "auto", "--quant-keep-fraction", "0.001",
            "--bit-allocation", "fisher", "--avg-bits", "3.5",
            "--steps", ",".join(M.ALL_STEPS), "--tasks", TASK, "--tasks-include", str(work / "tasks"), "--export"]
    if a.defence:
        argv += ["--defence", a.defence]
    counts = {}
    total = run_wrapped(argv, lambda n, adapter: _counted(n, adapter, counts))
    worst = _report(counts, a.budget, total)
    (work / "passes.json").write_text(json.dumps(counts, indent=2, default=str))
    return 0 if worst <= 1.25 else 1


if __name__ == "__main__":
    logging.disable(logging.WARNING)
    sys.exit(main())
