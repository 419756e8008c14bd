"""evaluate_model throughput against a plain Hugging Face loop on the same windows.

    python bench/bench_eval.py [--seq-len 1024] [--windows 4] [--model ...]

Prints tokens/s for both, their ratio (target >= 1.0), and the effective GFLOP/s
(2 x parameters x tokens / s) against a plain fp32 matmul measured in the same run.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llm_common as C  # noqa: E402
from llm_evaluate_models import EvalConfig, evaluate_model  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def hf_loop(model, ids, seq_len, n):
    t = time.perf_counter()
    with torch.no_grad():
        for s in range(0, n * seq_len, seq_len):
            w = ids[s:s + seq_len][None].to(C.input_device(model))
            model(input_ids=w, labels=w).loss.item()
    return n * seq_len / (time.perf_counter() - t)


def matmul_gflops(device, dtype, n=None, reps=10):
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    C.setup_logging("WARNING")
    model, tok, label = C.load_model(C.LoadConfig(model=a.model, device=a.device))
    text = WIKI.read_text() if WIKI.is_file() else C.embedded_corpus("test")
    ids = C.tokenize_corpus(tok, text)[: a.seq_len * a.windows]
    n_params = sum(p.numel() for p in model.parameters())
    cfg = EvalConfig(seq_len=a.seq_len, eval_tokens=0, max_new_tokens=0, progress=False)
    evaluate_model(model, tok, ids[: a.seq_len], cfg)  # warm-up
    hf_loop(model, ids, a.seq_len, 1)
    # Interleave the two so that machine noise hits both alike.
    ours, base = [], []
    for _ in range(2):
        ours.append(evaluate_model(model, tok, ids, cfg).tokens_per_s)
        base.append(hf_loop(model, ids, a.seq_len, a.windows))
    o, b = max(ours), max(base)
    dev = C.input_device(model)
    peak = matmul_gflops(dev, next(model.parameters()).dtype)
    eff = 2 * n_params * o / 1e9
    print(f"model {label}, {n_params / 1e6:.1f}M params, {a.windows} windows x {a.seq_len} tokens on {dev}")
    print(f"evaluate_model: {o:.1f} tok/s   plain HF loop: {b:.1f} tok/s   ratio {o / b:.3f} (target >= 1.0)")
    print(f"effective {eff:.1f} GFLOP/s vs plain matmul {peak:.1f} GFLOP/s: {eff / peak:.2%} of matmul peak")


if __name__ == "__main__":
    main()
