"""Pruning cost: the tool's Wanda and SparseGPT against llm-compressor's, and against a forward pass.

    python bench/bench_prune.py [--windows 8] [--seq-len 512] [--methods wanda,sparsegpt] [--repeats 3]
                                [--llmc-python /work/venv-llmc/bin/python | --no-llmc]
    python bench/bench_prune.py --windows 2 --seq-len 128 --repeats 1 --eval-tokens 2048   # a smoke run

At 50% unstructured sparsity, on the same calibration windows (WikiText-2 validation, seed 0),
each method runs ``--repeats`` times, interleaved: the tool's ``prune_model`` on a copy of the
model (timed around the call), then llm-compressor's ``WandaPruningModifier`` /
``SparseGPTModifier`` through ``oneshot`` in its own venv (``bench/llmc_prune_worker.py``: it
pins a transformers the project does not use; timed around the ``oneshot`` call only, not the
process start or the model load). Both pruned models are then scored by the tool's evaluator on
held-out text (WikiText-2 raw test split, disjoint from the calibration text).

Prints, in this order: the model and calibration set; the plain forward pass over the calibration
windows; per method and repeat, both wall times; per method, both perplexities (and the unpruned
model's), their relative difference and whether it is within 0.5%, each side's sparsity over the
linears (min and max per linear), and the mask agreement (fraction of weights pruned by both or
kept by both); peak memory of the tool's step against the model's size; and LAST the ratios: per
method, the tool's median against llm-compressor's median as "tool speed N x llm-compressor's"
(llmc seconds / tool seconds: >= 1.0 means the tool is at least as fast; the issue's target is
>= 1.0 at equal perplexity, within 0.5%, which the bench counts as met also where the tool's
perplexity is lower than theirs by more), and the tool's median against the forward pass (Wanda target
<= 2x). Without llm-compressor (no venv at --llmc-python, --no-llmc, or a failing worker) one line
says so and the rest runs.
"""
import argparse
import atexit
import copy
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llm_common as C  # noqa: E402
import llm_data as D  # noqa: E402
import llm_model as LM  # noqa: E402
from llm_config_measure import EvalConfig  # noqa: E402
from llm_perplexity import evaluate_model  # noqa: E402
from llm_prune_model import PruneConfig, prune_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VALID = SHARED / "wikitext-2-tokenized" / "valid.txt"
TEST = SHARED / "wikitext-2-raw" / "wiki.test.raw"
WORKER = Path(__file__).resolve().parent / "llmc_prune_worker.py"
TOLERANCE = 0.005  # "equal perplexity": within 0.5%, as the issue asks


def run_llmc(python: str, model_dir: str, windows_file: Path, out: Path, method: str, timeout: float) -> dict:
    """One llm-compressor run in its own venv; its JSON line (seconds of the oneshot call)."""
    cmd = [python, str(WORKER), model_dir, str(windows_file), str(out), "--method", method,
           "--sparsity", "0.5", "--block-size", "128", "--dampening", "0.01"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: {' | '.join(tail)}")
    return json.loads(lines[-1])


def linear_weights(model) -> dict:
    """{parameter name: [out, in] weight} of the decoder linears (the weights both tools prune)."""
    return {name + ".weight": LM.weight_view(mod) for name, mod in LM.decoder_linears(model).items()}


def sparsity_range(weights: dict) -> tuple[float, float]:
    s = [float((w == 0).float().mean()) for w in weights.values()]
    return min(s), max(s)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--llmc-python", default="/work/venv-llmc/bin/python",
                   help="python of a venv with llmcompressor (it cannot share the project's venv)")
    p.add_argument("--no-llmc", action="store_true", help="skip llm-compressor")
    p.add_argument("--llmc-timeout", type=float, default=1800, help="seconds per llm-compressor run")
    p.add_argument("--eval-tokens", type=int, default=32 * 512, help="held-out tokens scored per model")
    p.add_argument("--eval-seq-len", type=int, default=512)
    a = p.parse_args()
    C.setup_logging("WARNING")
    model, tok, label = LM.load_model(LM.LoadConfig(model=a.model, device=a.device))
    model_dir, _ = LM.resolve_model_source(a.model)
    text = VALID.read_text() if VALID.is_file() else D.embedded_corpus("train")
    windows = D.sample_windows(D.tokenize_corpus(tok, text), a.windows, a.seq_len, seed=0)
    dev = LM.input_device(model)
    size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    with torch.inference_mode():
        model(input_ids=windows[:1].to(dev))  # warm-up
        t = time.perf_counter()
        for w in windows:
            model(input_ids=w[None].to(dev), use_cache=False)
        fwd = time.perf_counter() - t
    print(f"model {label} ({size_mb:.0f} MiB of weights), {a.windows} x {a.seq_len} calibration tokens on {dev}, "
          f"{torch.get_num_threads()} threads")
    print(f"plain forward pass: {fwd:.1f} s")

    llmc = None if a.no_llmc else a.llmc_python
    if llmc and not Path(llmc).is_file():
        print(f"llm-compressor: skipped ({llmc} not found; --llmc-python names a venv with llmcompressor)")
        llmc = None
    elif not llmc:
        print("llm-compressor: skipped (--no-llmc)")
    if llmc and not (Path(model_dir) / "config.json").is_file():
        print(f"llm-compressor: skipped (the model is not a local save_pretrained folder: {model_dir})")
        llmc = None

    tmp = Path(tempfile.mkdtemp(prefix="bench_prune_"))
    # llm-compressor's pruned weights are 400 MB a method: removed however the bench ends
    # (a SIGTERM becomes an exit, so that atexit runs).
    atexit.register(shutil.rmtree, tmp, True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    windows_file = tmp / "windows.safetensors"
    save_file({"input_ids": windows.to(torch.int64).contiguous()}, str(windows_file))
    times: dict = {}     # method -> {"tool": [s], "llmc": [s]}
    pruned: dict = {}    # method -> {"tool": model, "llmc": weights file}
    peaks: dict = {}
    for method in a.methods.split(","):
        times[method], pruned[method] = {"tool": [], "llmc": []}, {}
        for r in range(a.repeats):
            m = copy.deepcopy(model)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            t = time.perf_counter()
            res = prune_model(m, tok, windows, PruneConfig(method=method, sparsity=0.5, progress=False))
            times[method]["tool"].append(time.perf_counter() - t)
            peaks[method] = res.peak_memory_mb
            pruned[method]["tool"] = m  # every repeat prunes the same way: the last one is scored
            del m
            line = f"{method:10s} repeat {r + 1}: tool {times[method]['tool'][-1]:7.1f} s"
            if llmc:
                out = tmp / f"llmc_{method}.safetensors"
                try:
                    info = run_llmc(llmc, model_dir, windows_file, out, method, a.llmc_timeout)
                    times[method]["llmc"].append(info["seconds"])
                    pruned[method]["llmc"] = out
                    line += f"   llm-compressor {info['seconds']:7.1f} s ({info['pipeline']} pipeline)"
                except (RuntimeError, subprocess.TimeoutExpired, ValueError, OSError) as e:
                    print(f"llm-compressor: failed, skipped from here on ({e})")
                    llmc = None
            print(line, flush=True)

    # Perplexity of each pruned model by one evaluator, on text neither side calibrated on.
    eval_text = TEST.read_text() if TEST.is_file() else D.embedded_corpus("test")
    eval_ids = D.tokenize_corpus(tok, eval_text)
    ecfg = EvalConfig(seq_len=a.eval_seq_len, eval_tokens=a.eval_tokens, max_new_tokens=0, progress=False)
    where = TEST.name if TEST.is_file() else "the embedded corpus's test split"
    base = evaluate_model(model, tok, eval_ids, ecfg)
    print(f"perplexity on {base.tokens_scored} held-out tokens of {where} ({base.windows} x {a.eval_seq_len}): "
          f"unpruned {base.perplexity:.3f}")
    verdicts = {}
    for method in times:
        tool_model = pruned[method]["tool"]
        tool_w = linear_weights(tool_model)
        ppl_tool = evaluate_model(tool_model, tok, eval_ids, ecfg).perplexity
        lo, hi = sparsity_range(tool_w)
        print(f"{method:10s} tool:           perplexity {ppl_tool:8.3f}, sparsity per linear {lo:.4f}..{hi:.4f}")
        if "llmc" not in pruned[method]:
            continue
        theirs = load_file(str(pruned[method]["llmc"]))
        if set(theirs) != set(tool_w):
            print(f"{method:10s} llm-compressor: its pruned weights are named differently "
                  f"({len(set(theirs) ^ set(tool_w))} names differ); not scored")
            continue
        llmc_model = copy.deepcopy(model)
        llmc_w = linear_weights(llmc_model)
        with torch.no_grad():
            for name, w in llmc_w.items():
                w.copy_(theirs[name].reshape(w.shape))
        ppl_llmc = evaluate_model(llmc_model, tok, eval_ids, ecfg).perplexity
        lo, hi = sparsity_range(llmc_w)
        agree = {n: int(((tool_w[n] == 0) == (llmc_w[n] == 0)).sum()) for n in tool_w}
        total = sum(w.numel() for w in tool_w.values())
        # Per block as well: if block 0 agrees and later blocks less, the difference compounds
        # through the pruned outputs each block passes on, rather than being a different rule.
        blocks = {}
        for i, layer in enumerate(LM.decoder_layers(model)):
            names = [n + ".weight" for n, mod in LM.decoder_linears(model).items()
                     if any(mod is b for b in LM.block_linears(layer).values())]
            blocks[i] = sum(agree[n] for n in names) / sum(tool_w[n].numel() for n in names)
        last = max(blocks)
        rel = (ppl_tool - ppl_llmc) / ppl_llmc
        # Equal within the tolerance, or lower (better) than theirs: speed must not be bought with quality.
        verdicts[method] = rel <= TOLERANCE
        within = "within" if abs(rel) <= TOLERANCE else ("tool LOWER (better) by more than" if rel < 0
                                                         else "tool HIGHER (worse) by more than")
        print(f"{method:10s} llm-compressor: perplexity {ppl_llmc:8.3f}, sparsity per linear {lo:.4f}..{hi:.4f}")
        print(f"{method:10s} tool vs llm-compressor perplexity {rel:+.2%} ({within} {TOLERANCE:.1%}); "
              f"masks agree on {sum(agree.values()) / total:.4%} of {total} weights "
              f"(block 0 {blocks[0]:.4%}, block {last} {blocks[last]:.4%})")
        del llmc_model
    for method in times:
        peak = peaks[method]
        print(f"{method:10s} tool peak memory {peak:.0f} MiB = {peak / size_mb:.2f}x model size "
              f"(process-wide on CPU: includes the copies this script holds)")

    # The ratios, last.
    for method, t in times.items():
        tool = statistics.median(t["tool"])
        print(f"{method:10s} tool median {tool:.1f} s = {tool / fwd:.2f}x forward pass"
              + ("  (target <= 2x)" if method == "wanda" else ""))
    for method, t in times.items():
        if not t["llmc"]:
            print(f"{method:10s} RATIO: no llm-compressor figure")
            continue
        tool, theirs = statistics.median(t["tool"]), statistics.median(t["llmc"])
        ratio = theirs / tool
        ok = ratio >= 1.0 and verdicts.get(method, False)
        print(f"{method:10s} RATIO: tool speed {ratio:.2f}x llm-compressor's (their median {theirs:.1f} s / our "
              f"median {tool:.1f} s, {len(t['tool'])} repeats; >= 1.0: tool at least as fast); target >= 1.0x "
              f"at perplexity within {TOLERANCE:.1%} or lower: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
