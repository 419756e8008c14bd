"""Issue 25's compression tables on the embedded model: perplexity and zero-shot accuracy of
quantized (RTN / GPTQ, mixed precision) and pruned (Wanda / SparseGPT x allocation) models.

    flock /tmp/model.lock python bench/compress_table.py --what quant \\
        --text WIKI/wiki.test.raw --calib WIKI/valid.txt --out /tmp/compress_quant.json

--what quant  3 and 2 bits, group 128, RTN vs GPTQ, each without and with the super weight
              kept in full precision (--protect-super-weights auto). 4 bits would be trivial:
              the embedded model's weights already sit on a Q4_1 grid.
--what mixed  equal size around 3.25 code bits per weight: uniform 3-bit at group 128 (the
              reference, 0.25 bits less), then "uniform 3-bit + extra" spent two ways (group 64,
              or the top saliency fraction kept in full precision) vs Hessian and Fisher mixed
              precision at --avg-bits 3.25, group 128; RTN and GPTQ.
--what prune  60% and 70% unstructured, Wanda and SparseGPT x allocation uniform/owl/hessian/fisher.

Perplexity: disjoint --seq-len windows over the first --eval-tokens tokens of --text.
Calibration: the step's own CPU default drawing from --calib, as the pipeline draws it
(``calibration_windows``: 8 windows x 512 tokens, seed 0). Zero-shot: ``evaluate_zeroshot``
on --tasks from --tasks-include, as the pipeline's zeroshot step, all examples unless
--tasks-limit. Rows are written (atomically) after each one, and a markdown table beside
--out.
"""
import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

import llm_common as C  # noqa: E402
import llm_data as D  # noqa: E402
import llm_io as IO  # noqa: E402
import llm_model as LM  # noqa: E402
import llm_variants as V  # noqa: E402
from llm_config import EvalConfig, PruneConfig, QuantizeConfig, ZeroShotConfig  # noqa: E402
from llm_perplexity import evaluate_model  # noqa: E402
from llm_prune_model import prune_model  # noqa: E402
from llm_compress import KEPT_BITS  # noqa: E402
from llm_quantize_model import quantize_model  # noqa: E402
from llm_zeroshot import evaluate_zeroshot  # noqa: E402

log = logging.getLogger("bench.compress")


def jobs(what: str) -> list[tuple[str, dict]]:
    if what == "quant":
        return [("quant", dict(method=m, wbits=b, group=128, protect=p))
                for b in (3, 2) for m in ("rtn", "gptq") for p in ((), "auto")]
    if what == "mixed":
        # 0.25 extra bits per weight: group 64 costs 32/64 - 32/128 = 0.25 bits of grid per
        # weight; a kept weight costs KEPT_BITS, so 0.25 / KEPT_BITS of the weights.
        out = []
        for m in ("rtn", "gptq"):
            out += [("quant", dict(method=m, wbits=3, group=128)),
                    ("quant", dict(method=m, wbits=3, group=64)),
                    ("quant", dict(method=m, wbits=3, group=128, keep_fraction=0.25 / KEPT_BITS)),
                    ("quant", dict(method=m, wbits=3, group=128, bit_allocation="hessian", avg_bits=3.25)),
                    ("quant", dict(method=m, wbits=3, group=128, bit_allocation="fisher", avg_bits=3.25))]
        return out
    # 70% first: OWL's headline setting, and the rows that matter most if a run is cut short
    return [("prune", dict(method=m, sparsity=s, allocation=a)) for s in (0.7, 0.6) for m in ("wanda", "sparsegpt")
            for a in ("uniform", "owl", "hessian", "fisher")]


def score(model, tok, ids, ecfg, zcfg) -> dict:
    """Perplexity and zero-shot accuracy of the model as it is now."""
    t = time.perf_counter()
    ppl = evaluate_model(model, tok, ids, ecfg).perplexity
    t_ppl = time.perf_counter() - t
    zs = evaluate_zeroshot(model, tok, {"row": None}, zcfg)
    if zs.status != "ran":
        raise C.UserError(f"zero-shot did not run: {zs.reason} {zs.unavailable}")
    task = zcfg.tasks[0]
    got = zs.tasks["row"][task]
    return {"perplexity": ppl, "acc": got["acc"], "acc_stderr": got.get("acc_stderr"), "acc_n": got["n"],
            "ppl_seconds": t_ppl, "zeroshot_seconds": zs.seconds}


def run_job(model, tok, calib, kind: str, kw: dict) -> dict:
    if kind == "quant":
        r = quantize_model(model, tok, calib, QuantizeConfig(progress=False, **kw))
        return {"avg_code_bits": r.avg_code_bits, "avg_bits": r.avg_bits, "kept_weights": r.kept_weights,
                "super_weights": r.super_weights, "bits_count": {b: list(r.bits.values()).count(b)
                                                                 for b in sorted(set(r.bits.values()))},
                "layer_bits": r.layer_bits, "objective": r.objective, "calibration": r.calibration,
                "step_seconds": r.seconds}
    r = prune_model(model, tok, calib, PruneConfig(progress=False, **kw))
    return {"overall_sparsity": r.overall_sparsity, "pruned_weights": r.pruned_weights,
            "target_weights": r.target_weights, "layer_sparsity": r.layer_sparsity,
            "calibration": r.calibration, "step_seconds": r.seconds}


def label(kw: dict) -> str:
    skip = {"group": 128, "protect": (), "wbits": None}
    parts = [f"{k}={'auto' if v == 'auto' else v}" for k, v in kw.items() if skip.get(k, object()) != v]
    return " ".join(parts)


def markdown(doc: dict) -> str:
    what = doc["what"]
    if what == "prune":
        head = "| method | target | allocation | overall sparsity | perplexity | acc | s |\n|---|---|---|---|---|---|---|"
        fmt = (lambda r: f"| {r['method']} | {r['sparsity']:.0%} | {r['allocation']} | {r['overall_sparsity']:.6f} | "
               f"{r['perplexity']:.2f} | {r['acc']:.3f} | {r['seconds']:.0f} |")
    else:
        head = ("| method | bits | group | allocation | kept | avg code bits | avg bits (with scales, zeros, kept) "
                "| perplexity | acc | s |\n|---|---|---|---|---|---|---|---|---|---|")
        fmt = (lambda r: f"| {r['method']} | {r.get('avg_bits_budget') or r['wbits']} | {r['group']} | "
               f"{r.get('bit_allocation', 'uniform')} | "
               f"{'super weight' if r.get('protect') == 'auto' else ''}"
               f"{' top %.4f%%' % (100 * r['keep_fraction']) if r.get('keep_fraction') else ''} "
               f"({r['kept_weights']}) | {r['avg_code_bits']:.3f} | {r['avg_bits']:.3f} | {r['perplexity']:.2f} | "
               f"{r['acc']:.3f} | {r['seconds']:.0f} |")
    base = doc["base"]
    lines = [f"{doc['model']}: {doc['evaluation']}; calibration {doc['calibration']}; zero-shot {doc['zeroshot']}.",
             "", f"Dense: perplexity {base['perplexity']:.2f}, acc {base['acc']:.3f} (n={base['acc_n']}).", "",
             head]
    lines += [fmt(r) for r in doc["rows"]]
    return "\n".join(lines) + "\n"


def _one_task_manager() -> None:
    """lm-eval indexes every task YAML it ships when a TaskManager is built (about 30 s on a
    busy 2-core machine); the zeroshot step builds one per call, which the pipeline makes once
    but this table once per row. Memoized here, by include path, for this process only."""
    import lm_eval.tasks

    made, cls = {}, lm_eval.tasks.TaskManager

    def manager(*args, **kw):
        key = repr((args, sorted(kw.items())))
        if key not in made:
            made[key] = cls(*args, **kw)
        return made[key]

    lm_eval.tasks.TaskManager = manager


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", required=True, help="quant, mixed, prune, or a comma list run in that order "
                                                  "in one process (one model load)")
    p.add_argument("--text", required=True, help="evaluation text (WikiText-2 test, raw)")
    p.add_argument("--calib", required=True, help="calibration text (e.g. WikiText-2 validation)")
    p.add_argument("--out", required=True, help="JSON output, '{what}' in it replaced by the table's name; the "
                                                 "markdown table goes beside it (.md)")
    p.add_argument("--cache-dir", default="data/cache", help="dequantized GGUF cache of the embedded model")
    p.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2)")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--tasks", default="trivia_mc")
    p.add_argument("--tasks-include", default=str(ROOT / "bench" / "tasks"))
    p.add_argument("--tasks-limit", type=int, default=0, help="examples per task (0: all)")
    p.add_argument("--rows", default="", help="first:last row indices to run (timing), default all")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    whats = a.what.split(",")
    if not set(whats) <= {"quant", "mixed", "prune"} or (len(whats) > 1 and "{what}" not in a.out):
        sys.exit("error: --what takes quant, mixed, prune or a comma list of them; several need '{what}' in --out")
    C.setup_logging("WARNING")
    torch.set_num_threads(a.threads)
    text, calib_path, cache = (Path(x).resolve() for x in (a.text, a.calib, a.cache_dir))
    outs = {w: Path(a.out.replace("{what}", w)).resolve() for w in whats}
    os.chdir(ROOT)  # lm-eval resolves a local task's data_files against the working directory
    try:
        model, tok, name = LM.load_model(LM.LoadConfig(model=a.model, cache_dir=str(cache)))
        ids = D.tokenize_corpus(tok, D.load_corpus(str(text), "test"))
        calib = D.load_corpus(str(calib_path), "train")
    except C.UserError as e:
        sys.exit(f"error: {C.error_line(e)}")
    ecfg = EvalConfig(seq_len=a.seq_len, eval_tokens=a.eval_tokens, max_new_tokens=0, progress=False)
    zcfg = ZeroShotConfig(enabled=True, tasks=tuple(a.tasks.split(",")), include_path=a.tasks_include,
                          limit=a.tasks_limit, progress=False)
    _one_task_manager()
    names = [n + ".weight" for n in LM.decoder_linears(model)]
    t = time.perf_counter()
    base = {**score(model, tok, ids, ecfg, zcfg), "seconds": time.perf_counter() - t}
    print(f"dense: {base}", flush=True)
    for what in whats:
        doc = {"model": name, "what": what,
               "evaluation": f"WikiText-2 test ({text.name}), perplexity over disjoint {a.seq_len}-token windows of "
                             f"the first {a.eval_tokens} tokens",
               "calibration": f"{calib_path.name}, the step's default CPU drawing (see rows' calibration)",
               "zeroshot": f"{a.tasks} (local lm-eval task), limit {a.tasks_limit or 'all'}",
               "threads": a.threads, "base": base, "rows": []}
        todo = jobs(what)
        lo, hi = (int(x) for x in a.rows.split(":")) if a.rows else (0, len(todo))
        for kind, kw in todo[lo:hi]:
            t = time.perf_counter()
            with V.restored_on_exit(model, names):
                extra = run_job(model, tok, calib, kind, kw)
                scored = score(model, tok, ids, ecfg, zcfg)
            # kw's avg_bits is the budget; the achieved one (extra's) overwrites it under that name
            row = {**kw, "avg_bits_budget": kw.get("avg_bits"), **extra, **scored,
                   "seconds": time.perf_counter() - t}
            doc["rows"].append(row)
            print(f"{what} {label(kw):60s} ppl {scored['perplexity']:9.3f} acc {scored['acc']:.3f} "
                  f"{row['seconds']:6.0f} s", flush=True)
            save(outs[what], doc)
        save(outs[what], doc)


def save(out: Path, doc: dict) -> None:
    """The JSON and its markdown table, each written atomically (a killed run keeps its rows)."""
    IO.write_json(out, doc)
    with IO.atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(doc))


if __name__ == "__main__":
    main()
