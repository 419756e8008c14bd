"""Perplexity from llm_main_v4.py's results.json against an independent plain HF loop.

    python bench/parity_eval.py out/eval/results.json --dataset ../shared/data/wikitext-2-raw/wiki.test.raw

The loop: disjoint windows, model(input_ids=w, labels=w).loss per window, exp(mean loss).
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llm_common as C  # noqa: E402
import llm_model as LM  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--dataset", required=True)
    p.add_argument("--variant", default="base")
    p.add_argument("--model-dir", default=None, help="model to load instead of results.json's (e.g. OUT/finetuned)")
    a = p.parse_args()
    C.setup_logging("WARNING")
    res = json.loads(Path(a.results).read_text())
    proto = res["protocol"]
    spec = a.model_dir or (None if res["model"] == LM.EMBEDDED_NAME else res["model"])
    model, tok, _ = LM.load_model(LM.LoadConfig(model=spec, device=res.get("device", "auto").split(":")[0],
                                              dtype=res.get("dtype", "torch.float32").replace("torch.", "")))
    ids = tok(Path(a.dataset).read_text(), return_tensors="pt").input_ids[0]
    L, n = proto["seq_len"], (proto["eval_tokens"] or ids.numel())
    losses = []
    with torch.no_grad():
        for s in tqdm(range(0, n - L + 1, L), desc="plain HF loop"):
            w = ids[s:s + L][None].to(LM.input_device(model))
            losses.append(model(input_ids=w, labels=w).loss.item())
    ref = math.exp(sum(losses) / len(losses))
    ours = float(res["perplexity"][a.variant])
    print(f"llm_main_v4 {ours:.4f}   plain HF loop {ref:.4f}   relative difference {abs(ours - ref) / ref:.2e}")


if __name__ == "__main__":
    main()
