"""2:4 semi-structured sparsity: measured speed-up against dense on the same GPU, same run.

    python bench/bench_2of4.py --shape 7b          # Llama-2-7B-shaped random model, bf16 (about 14 GB)
    python bench/bench_2of4.py --shape 1b --layers 4

Prints, for one decoder linear of each shape (Wanda's Table: q/k/v/o 4096x4096, up/gate
11008x4096, down 4096x11008) the dense and 2:4 matmul time and their ratio, then the whole
model's forward tokens/s at batch 1 and 16, dense against 2:4 (``llm_export.semi_structured``,
the conversion ``--export-2of4`` uses). Weights are random and pruned 2:4 by magnitude: the
kernel's speed does not depend on the values. Needs CUDA (compute capability 8.0+); on CPU it
says so and exits 0.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from torch.sparse import to_sparse_semi_structured

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llm_export as E  # noqa: E402
import llm_model as LM  # noqa: E402

SHAPES = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
          "1b": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4)}


def prune_2of4_(w: torch.Tensor) -> None:
    """Keep the 2 largest |w| of every 4 consecutive input weights of each row, in place."""
    g = w.data.view(-1, 4)
    g.scatter_(1, g.abs().argsort(1)[:, :2], 0)


def matmul_ms(w: torch.Tensor, x: torch.Tensor, iters: int = 50) -> float:
    for _ in range(5):
        torch.nn.functional.linear(x, w)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        torch.nn.functional.linear(x, w)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="7b")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the random model")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=2048, help="rows of the matmul benchmark")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        print("2:4 semi-structured kernels need CUDA (compute capability 8.0+): nothing measured on this machine")
        return 0
    from transformers import LlamaConfig, LlamaForCausalLM

    dev, dt = torch.device("cuda"), torch.bfloat16
    s = SHAPES[args.shape]
    print(torch.cuda.get_device_name(dev), "torch", torch.__version__)
    x = torch.randn(args.tokens, s["hidden_size"], device=dev, dtype=dt)
    xi = torch.randn(args.tokens, s["intermediate_size"], device=dev, dtype=dt)
    for name, (out, inp, inputs) in {"q/k/v/o": (s["hidden_size"], s["hidden_size"], x),
                                     "up/gate": (s["intermediate_size"], s["hidden_size"], x),
                                     "down": (s["hidden_size"], s["intermediate_size"], xi)}.items():
        w = torch.randn(out, inp, device=dev, dtype=dt)
        prune_2of4_(w)
        dense = matmul_ms(w, inputs)
        sparse = matmul_ms(to_sparse_semi_structured(w), inputs)
        print(f"matmul {name:8s} {out}x{inp}, {args.tokens} tokens: dense {dense:.3f} ms, 2:4 {sparse:.3f} ms, "
              f"speed-up {dense / sparse:.3f}x")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, num_hidden_layers=args.layers, max_position_embeddings=4096, **s)
    model = LlamaForCausalLM(cfg).to(dev, dt).eval()
    with torch.no_grad():
        for m in LM.decoder_linears(model).values():
            prune_2of4_(m.weight)
    for b in (1, 16):
        dense = E.tokens_per_second(model, b, args.seq_len)
        with E.semi_structured(model) as done:
            sparse = E.tokens_per_second(model, b, args.seq_len)
        print(f"model forward ({args.layers} layers, {len(done)} linears 2:4), batch {b} x {args.seq_len}: "
              f"dense {dense:.0f} tokens/s, 2:4 {sparse:.0f} tokens/s, speed-up {sparse / dense:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
