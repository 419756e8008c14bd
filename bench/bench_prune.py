"""Pruning cost against one plain forward pass over the same calibration set.

    python bench/bench_prune.py [--windows 8] [--seq-len 512] [--methods wanda,sparsegpt]

Prints each method's wall time, its ratio to the forward pass (Wanda target <= 2x), and
peak memory (max RSS on CPU, allocator peak on CUDA) against the model's size.
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llm_common as C  # noqa: E402
import llm_data as D  # noqa: E402
import llm_model as LM  # noqa: E402
from llm_prune_model import PruneConfig, prune_model  # noqa: E402

VALID = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-tokenized" / "valid.txt"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    C.setup_logging("WARNING")
    model, tok, label = LM.load_model(LM.LoadConfig(model=a.model, device=a.device))
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
    print(f"model {label} ({size_mb:.0f} MiB of weights), {a.windows} x {a.seq_len} calibration tokens on {dev}")
    print(f"plain forward pass: {fwd:.1f} s")
    for method in a.methods.split(","):
        m = copy.deepcopy(model)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        res = prune_model(m, tok, windows, PruneConfig(method=method, sparsity=0.5, progress=False))
        print(f"{method:10s} {res.seconds:7.1f} s  ratio {res.seconds / fwd:5.2f}x forward  "
              f"peak memory {res.peak_memory_mb:.0f} MiB = {res.peak_memory_mb / size_mb:.2f}x model size "
              f"(process-wide on CPU: includes the copies this script holds)")
        del m


if __name__ == "__main__":
    main()
