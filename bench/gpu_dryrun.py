"""The GPU default pipeline, dry-run on CPU: every step with --budget gpu on a tiny model, its
passes and tokens counted, then extrapolated to Llama-2-7B on one H100.

    python bench/gpu_dryrun.py [--steps finetune,prune,...] [--tasks DIR] [--out DIR]

The run: a tiny random Llama (4 layers, hidden 64, 4,096 positions so no GPU window is clamped)
with the byte tokenizer, the GPU budget column of every step (500 fine-tune steps of 8 x 1024,
128 x 2048 calibration, full WikiText-2 test at 2048, the GPU attack, GCG and Hessian budgets),
calibration from a synthetic C4-shaped local shard (sampled document by document), zero-shot on
the local task in ``bench/tasks`` when it is there. The fine-tune runs 25 of its 500 steps (all
alike in shape) and its counts are scaled by 20, so the whole dry run takes minutes, not an hour. Per step it prints the forward tokens and
passes, backward passes and tokens (first-order backward hooks on the blocks; a Hessian-vector
product's double backward is counted as one more backward of the same tokens), and peak RSS.

The estimate for Llama-2-7B (6.74e9 parameters, 32 layers, d 4096) on one H100 (989 TFLOP/s
dense bf16) takes FLOPs as 2N + 2 L s d per forward token (s the window) and twice that per
backward token, at the MFU measured on the H200 (README): 61.9% for forward-only steps,
41.9% for steps that train or backpropagate, 46% for the layer-wise prune. Token counts of
the evaluation text are converted from bytes to Llama-2 tokens (WikiText-2 test: 166 windows
of 2048, as the papers score it, from 1,288,556 characters). Zero-shot is estimated from the
seven tasks' request counts (lm-eval 0.4, one forward per request; mean request lengths are
stated assumptions) rather than from the local stand-in. The per-variant part of the noise,
adversarial and analysis steps (every variant measured beside the live model) is counted apart
and printed as the cost of one more variant.
"""
from __future__ import annotations

import argparse
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import llm_common as C  # noqa: E402
import llm_config as K  # noqa: E402
from llm_knobs import budget_of  # noqa: E402
import llm_data as D  # noqa: E402
import llm_io as IO  # noqa: E402
import llm_model as LM  # noqa: E402
from bench_corpus import write_shard  # noqa: E402
from conftest import make_llama, make_tokenizer  # noqa: E402
from pipeline_counts import run_wrapped  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
N7, LAYERS7, D7 = 6.74e9, 32, 4096
H100 = 989e12
MFU = {"forward": 0.619, "train": 0.419, "prune": 0.46}
KIND = {"finetune": "train", "prune": "prune", "quantize": "prune", "noise": "train", "eval": "forward",
        "zeroshot": "forward",
        "export": "forward", "adversarial": "train", "analysis": "train"}
WIKI_LLAMA2_TOKENS = 166 * 2048  # what the papers score of WikiText-2 test with Llama-2's tokenizer
# Zero-shot: (requests, assumed mean Llama-2 tokens per request) of the seven tasks in lm-eval 0.4.
ZEROSHOT = {"boolq": (3270 * 2, 150), "rte": (277 * 2, 90), "hellaswag": (10042 * 4, 110),
            "winogrande": (1267 * 2, 35), "arc_easy": (2376 * 4, 55), "arc_challenge": (1172 * 4, 60),
            "openbookqa": (500 * 4, 40)}


class Counter:
    """Forward tokens/passes and backward tokens/passes through the decoder blocks."""

    def __init__(self, model):
        self.layers = LM.decoder_layers(model)
        self.fwd_tokens = self.fwd_calls = self.bwd_tokens = self.bwd_calls = 0
        self.handles = [layer.register_forward_hook(self._fwd, with_kwargs=True) for layer in self.layers]
        self.handles += [layer.register_full_backward_hook(self._bwd) for layer in self.layers]

    def _fwd(self, module, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        self.fwd_tokens += h.shape[0] * h.shape[1]
        self.fwd_calls += 1

    def _bwd(self, module, grad_in, grad_out):
        g = grad_out[0]
        if g is not None:
            self.bwd_tokens += g.shape[0] * g.shape[1]
            self.bwd_calls += 1

    def close(self) -> dict:
        for h in self.handles:
            h.remove()
        n = len(self.layers)
        return {"fwd_tokens": self.fwd_tokens / n, "fwd_passes": self.fwd_calls / n,
                "bwd_tokens": self.bwd_tokens / n, "bwd_passes": self.bwd_calls / n}


def _counted(name, adapter, counts):
    def counted(run, mod, cfg):
        t, counter = time.perf_counter(), Counter(run.model)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            adapter(run, mod, cfg)
        finally:
            counts[name] = counter.close()
            counts[name].update(seconds=time.perf_counter() - t, window=_window(name, cfg),
                                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                rss_growth_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
            print(f"done {name}: {counts[name]}", file=sys.stderr, flush=True)  # survives a later step's failure
    return counted


# The per-variant part of each step that measures every variant (--robustness-variants).
PER_VARIANT = {"noise": ("llm_robustness_test", "sweep_variants"),
               "adversarial": ("llm_adversarial_test", "attack_variants"),
               "analysis": ("llm_integrated_analysis", "analyse_variants")}


def _count_per_variant(per: dict) -> None:
    """Count the passes of each step's per-variant function apart, with the variants it measured
    beside the live model (whose row reuses the step's own measures)."""
    import importlib

    for step, (module, name) in PER_VARIANT.items():
        mod = importlib.import_module(module)
        orig = getattr(mod, name)

        def wrapped(model, *args, _orig=orig, _step=step, **kw):
            counter = Counter(model)
            try:
                out = _orig(model, *args, **kw)
            finally:
                per[_step] = counter.close()
            per[_step]["added"] = max(len(out) - 1, 1)
            return out
        setattr(mod, name, wrapped)


def _window(step, cfg) -> int:
    for f in ("seq_len", "calib_seq_len", "sweep_seq_len", "prompt_len"):
        v = getattr(cfg, f, None)
        if isinstance(v, int):
            return v
    return 2048


def estimate(step: str, c: dict, eval_scale: float) -> float:
    """Seconds on one H100 for Llama-2-7B."""
    fwd, bwd = c["fwd_tokens"], c["bwd_tokens"]
    if step == "eval":
        fwd *= eval_scale
    per_token = 2 * N7 + 2 * LAYERS7 * c["window"] * D7
    return (fwd + 2 * bwd) * per_token / (H100 * MFU[KIND[step]])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default=",".join(K.ALL_STEPS))
    p.add_argument("--tasks", default=str(ROOT / "bench" / "tasks"), help="local lm-eval task folder")
    p.add_argument("--out", default=None)
    p.add_argument("--ft-steps", type=int, default=25, help="fine-tune steps actually run; the counts are scaled to "
                                                            "the GPU budget's 500 (its steps are identical in shape)")
    a = p.parse_args(argv)
    C.setup_logging("WARNING")
    work = Path(a.out or tempfile.mkdtemp(prefix="gpu_dryrun."))
    model_dir = work / "model"
    make_llama(layers=4, hidden=64, max_position_embeddings=4096).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    text = WIKI.read_text() if WIKI.is_file() else D.embedded_corpus("test")
    (work / "eval.txt").write_text(text)
    shard = work / "c4-train.00000-of-01024.json.gz"
    write_shard(shard, 5000, seed=0)
    steps = [s for s in a.steps.split(",") if s]
    tasks = sorted(p.stem for p in Path(a.tasks).glob("*.yaml")) if Path(a.tasks).is_dir() else []
    if "zeroshot" in steps and not tasks:
        steps.remove("zeroshot")
    argv = ["--model", str(model_dir), "--device", "cpu", "--budget", "gpu", "--output-dir", str(work / "out"),
            "--dataset", str(work / "eval.txt"), "--train-dataset", str(shard), "--log-level", "WARNING",
            "--steps", ",".join(steps), "--allow-overlap", "--ft-steps", str(a.ft_steps)]
    if tasks:
        argv += ["--tasks", ",".join(tasks), "--tasks-include", a.tasks]
    counts, per = {}, {}
    _count_per_variant(per)
    total = run_wrapped(argv, lambda n, adapter: _counted(n, adapter, counts))
    scale = WIKI_LLAMA2_TOKENS / len(text)
    if "finetune" in counts:  # every training step has the same shape: scale the run's steps to the budget's
        c, f = counts["finetune"], budget_of(K.FinetuneConfig, "steps")[1] / a.ft_steps
        held_tokens, held_passes = c["fwd_tokens"] - c["bwd_tokens"], c["fwd_passes"] - c["bwd_passes"]  # before/after
        counts["finetune"] = {**c, "fwd_tokens": c["bwd_tokens"] * f + held_tokens, "bwd_tokens": c["bwd_tokens"] * f,
                              "fwd_passes": c["bwd_passes"] * f + held_passes, "bwd_passes": c["bwd_passes"] * f}
    print(f"tiny Llama (4 x 64, byte tokenizer), --budget gpu, {total:.0f} s on CPU; calibration: {shard.name} "
          f"(5,000 synthetic documents); eval text {len(text):,} characters -> {WIKI_LLAMA2_TOKENS:,} Llama-2 tokens")
    print(f"{'step':12s} {'fwd tok':>11s} {'fwd':>8s} {'bwd tok':>11s} {'bwd':>7s} {'cpu s':>7s} {'RSS MB':>7s} "
          f"{'7B H100 s':>10s}")
    est = {}
    for name in K.ALL_STEPS:
        if name in counts:
            c = counts[name]
            est[name] = estimate(name, c, scale)
            print(f"{name:12s} {c['fwd_tokens']:11.0f} {c['fwd_passes']:8.0f} {c['bwd_tokens']:11.0f} "
                  f"{c['bwd_passes']:7.0f} {c['seconds']:7.1f} {c['peak_rss_mb']:7.0f} {est[name]:10.1f}")
    zs_tokens = sum(n * t for n, t in ZEROSHOT.values())
    zs = zs_tokens * (2 * N7 + 2 * LAYERS7 * 128 * D7) / (H100 * MFU["forward"])
    no_zs = sum(v for k, v in est.items() if k != "zeroshot")
    print(f"\nestimated Llama-2-7B on one H100, GPU defaults without zero-shot: {no_zs / 60:.1f} min "
          f"(target <= 30 min)")
    results = work / "out" / "results.json"
    scored = IO.read_json(results).get("zeroshot", {}).get("tasks", {}) if results.is_file() else {}
    print(f"zero-shot, seven tasks, per variant: {zs_tokens / 1e6:.1f} M request tokens -> {zs / 60:.1f} min at "
          f"{MFU['forward']:.0%} MFU (target <= 10 min per variant)")
    if scored:
        print(f"the dry run scored {len(scored)} variants ({', '.join(scored)}): zero-shot {len(scored) * zs / 60:.1f} "
              f"min, whole GPU default pipeline {(no_zs + len(scored) * zs) / 60:.1f} min")
    if per:  # what one more variant adds: its noise sweep, attacks, curvature and super weights
        add = {k: estimate(k, {**c, "fwd_tokens": c["fwd_tokens"] / c["added"], "window": counts[k]["window"],
                               "bwd_tokens": c["bwd_tokens"] / c["added"]}, scale) for k, c in per.items()
               if k in counts}
        print("per added variant (--robustness-variants): " + ", ".join(f"{k} {v:.1f} s" for k, v in add.items())
              + f"; {sum(add.values()) / 60:.1f} min each (measured over {max(c['added'] for c in per.values())} "
              "variants beside the live model)")
    print("assumptions: MFU as measured on the H200 (README); FLOPs 2N + 2 L s d per forward token, 2x per backward "
          "token; a LoRA backward costs a full backward here (an overestimate); zero-shot request lengths assumed")


if __name__ == "__main__":
    logging.disable(logging.WARNING)
    sys.exit(main())
