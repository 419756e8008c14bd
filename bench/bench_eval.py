"""evaluate_model throughput against a plain Hugging Face loop on the same windows.

    python bench/bench_eval.py [--seq-len 1024] [--windows 4] [--model ...]

Prints tokens/s for both, their ratio (target >= 1.0), and the effective GFLOP/s
(2 x parameters x tokens / s) against a plain fp32 matmul measured in the same run.
The two are interleaved window by window (ours on window i, then the plain loop on window i,
the order alternating), so a busy machine slows both alike and the ratio keeps its verdict.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llm_common as C  # noqa: E402
import llm_data as D  # noqa: E402
import llm_model as LM  # noqa: E402
from llm_evaluate_models import EvalConfig, evaluate_model  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def hf_window(model, w) -> float:
    """Seconds for one plain forward with labels on window ``w`` [seq_len], loss read back."""
    t = time.perf_counter()
    with torch.no_grad():
        w = w[None].to(LM.input_device(model))
        model(input_ids=w, labels=w).loss.item()
    return time.perf_counter() - t


def our_window(model, tok, w, cfg) -> float:
    t = time.perf_counter()
    evaluate_model(model, tok, w, cfg)
    return time.perf_counter() - t


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
    model, tok, label = LM.load_model(LM.LoadConfig(model=a.model, device=a.device))
    text = WIKI.read_text() if WIKI.is_file() else D.embedded_corpus("test")
    ids = D.tokenize_corpus(tok, text)[: a.seq_len * a.windows]
    n_params = sum(p.numel() for p in model.parameters())
    cfg = EvalConfig(seq_len=a.seq_len, eval_tokens=0, max_new_tokens=0, progress=False)
    wins = [ids[i * a.seq_len:(i + 1) * a.seq_len] for i in range(a.windows)]
    our_window(model, tok, wins[0], cfg)  # warm-up
    hf_window(model, wins[0])
    ours = base = 0.0
    for r in range(2):
        for i, w in enumerate(wins):  # interleaved per window, the order alternating
            if (i + r) % 2:
                base += hf_window(model, w)
                ours += our_window(model, tok, w, cfg)
            else:
                ours += our_window(model, tok, w, cfg)
                base += hf_window(model, w)
    o, b = 2 * a.windows * a.seq_len / ours, 2 * a.windows * a.seq_len / base
    dev = LM.input_device(model)
    peak = matmul_gflops(dev, next(model.parameters()).dtype)
    eff = 2 * n_params * o / 1e9
    print(f"model {label}, {n_params / 1e6:.1f}M params, {a.windows} windows x {a.seq_len} tokens on {dev}")
    print(f"evaluate_model: {o:.1f} tok/s   plain HF loop: {b:.1f} tok/s   ratio {o / b:.3f} (target >= 1.0)")
    print(f"effective {eff:.1f} GFLOP/s vs plain matmul {peak:.1f} GFLOP/s: {eff / peak:.2%} of matmul peak")


if __name__ == "__main__":
    main()
