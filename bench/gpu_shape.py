"""Every step on a random-init model of a given shape, at reduced budgets, with MFU and memory.

    python bench/gpu_shape.py --shape 7b      # Llama-2-7B shape, bf16, one GPU (no download)
    python bench/gpu_shape.py --shape tiny    # the same script on CPU in seconds (smoke test)

Per step it prints wall time, tokens/s, MFU (model FLOPs per second over a bf16 matmul rate
measured in the same run), peak GPU memory, and the time extrapolated to the default GPU
budgets (linear in the work, from the measured rate). Model FLOPs per token, as in PaLM's
MFU: forward 2N + 4*L*s*d for attention (QK^T and AV, not halved for causality); full
training 3x the forward; LoRA and attacks on inputs 2x (no weight gradients); a
Hessian-vector product 2x a training step. N counts the decoder matrices and the LM head,
not the embedding.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import llm_adversarial_test as ADV  # noqa: E402
import llm_data as D  # noqa: E402
import llm_finetune as FT  # noqa: E402
import llm_integrated_analysis as A  # noqa: E402
import llm_model as LM  # noqa: E402
import llm_prune_model as P  # noqa: E402
import llm_robustness_test as R  # noqa: E402
import llm_variants as V  # noqa: E402
from llm_perplexity import EvalConfig, evaluate_model  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=320),
}


class ByteTok:
    """Enough tokenizer for the steps on random ids: ids 1..95 are the printable ASCII
    characters (so GCG suffixes round-trip), every other id decodes to nothing."""

    eos_token_id = pad_token_id = 0
    chat_template = None
    all_special_ids = [0]

    def __init__(self, vocab):
        self.vocab = vocab

    def __len__(self):
        return self.vocab

    def decode(self, ids, skip_special_tokens=False):
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return "".join(chr(31 + int(i)) for i in ids if 1 <= int(i) <= 95)

    def batch_decode(self, rows):
        return [self.decode(r) for r in rows]

    def __call__(self, text, add_special_tokens=True, **kw):
        enc = lambda t: [ord(c) - 31 for c in t if 32 <= ord(c) <= 126]  # noqa: E731
        return type("Enc", (), {"input_ids": [enc(t) for t in text] if isinstance(text, list) else enc(text)})


def matmul_rate(device, dtype) -> float:
    """bf16 (or fp32 on CPU) matmul FLOP/s, 8192^3 on GPU, measured after a warm-up."""
    n = 8192 if device.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n ** 3 * 10 / (time.perf_counter() - t)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_eval(c) -> None:
    model, tok, ids, S, tiny, dev, fwd_flops, record = c.model, c.tok, c.ids, c.S, c.tiny, c.dev, c.fwd_flops, c.record
    n_win = 2 if tiny else 32
    ecfg = EvalConfig(seq_len=S, eval_tokens=n_win * S, max_new_tokens=0, progress=False)
    evaluate_model(model, tok, ids[:S], EvalConfig(seq_len=S, max_new_tokens=0, progress=False))  # warm-up
    sync(dev)
    t = time.perf_counter()
    r = evaluate_model(model, tok, ids, ecfg)
    sec = time.perf_counter() - t
    # default: WikiText-2 test (~340k Llama tokens) for base, fine-tuned, pruned and noisy
    record("eval", sec, n_win * S, fwd_flops(n_win * S, S), 4 * 340_000 / (n_win * S),
           f"{n_win} x {S} tokens, batch {r.batch_size}")


def bench_finetune(c) -> None:
    model, ids, tiny, dev, fwd_flops, record = c.model, c.ids, c.tiny, c.dev, c.fwd_flops, c.record
    n_steps, B, Ls = (2, 2, 64) if tiny else (6, 8, 1024)
    with tempfile.TemporaryDirectory() as tmp:
        fc = FT.FinetuneConfig(output_dir=f"{tmp}/ft", mode="lora", steps=n_steps + 2, batch_size=B, seq_len=Ls,
                               lr=2e-4, save_every_s=0, log_every=1000)
        times = []
        FT.train(model, ids[:200_000], fc, on_step=lambda s: (sync(dev), times.append(time.perf_counter())))
    sec = times[-1] - times[1]  # steps after two warm-up steps
    toks = n_steps * B * Ls
    record("finetune (LoRA)", sec, toks, 2 * fwd_flops(toks, Ls), 500 / n_steps,
           f"{n_steps} steps x {B} x {Ls}, default 500 steps")


def bench_prune(c) -> None:
    model, tok, ids, tiny, fwd_flops, record = c.model, c.tok, c.ids, c.tiny, c.fwd_flops, c.record
    n, Lc = (4, 64) if tiny else (16, 2048)
    windows = D.sample_windows(ids, n, Lc, seed=0)
    with V.restored_on_exit(model, [k + ".weight" for k in LM.decoder_linears(model)]):
        t = time.perf_counter()
        P.prune_model(model, tok, windows, P.PruneConfig(method="wanda", sparsity=0.5, progress=False))
        sec = time.perf_counter() - t
    record("prune (Wanda)", sec, n * Lc, 2 * fwd_flops(n * Lc, Lc), 128 / n, f"{n} x {Lc} calib, default 128")


def bench_noise(c) -> None:
    model, tok, ids, S, tiny, L, fwd_flops, record = c.model, c.tok, c.ids, c.S, c.tiny, c.L, c.fwd_flops, c.record
    T = 1024 if tiny else 16384
    ecfg = EvalConfig(seq_len=min(S, T), eval_tokens=T, max_new_tokens=0, progress=False)
    t = time.perf_counter()
    sw = R.noise_sweep(model, tok, ids, [0.05], [0, 1], eval_config=ecfg, progress=False)
    sec = time.perf_counter() - t
    cells = L * 7
    record("noise sweep + map", sec, 3 * T, fwd_flops(3 * T, min(S, T)), (31 + 1 + cells) / 3,
           f"3 evaluations of {T} tokens (clean + 2 points), default 31 + map of {cells} cells; "
           f"ppl {sw.clean['perplexity']:.0f}")


def bench_adversarial(c) -> None:
    model, tok, ids, tiny, fwd_flops, record = c.model, c.tok, c.ids, c.tiny, c.fwd_flops, c.record
    nw, steps_pgd = (2, 2) if tiny else (32, 4)
    acfg = ADV.AdversarialConfig(epsilons=(0.02, 0.05, 0.1), pgd_steps=steps_pgd, n_windows=nw,
                                 prompt_len=32 if tiny else 128, continuation_len=8 if tiny else 32,
                                 prompts=(), targeted_steps=2 * steps_pgd, gcg_steps=2,
                                 gcg_batch=8 if tiny else 128, gcg_topk=8 if tiny else 256,
                                 gcg_suffix_len=4 if tiny else 20, defence_steps=2, max_new_tokens=8,
                                 progress=False)
    t = time.perf_counter()
    res = ADV.test_adversarial_robustness(model, tok, ids[:400_000], acfg)
    sec = time.perf_counter() - t
    row = acfg.prompt_len + acfg.continuation_len
    toks = 3 * 2 * nw * row * (steps_pgd + 1)
    secs = res.seconds
    scale = 20 / steps_pgd  # default 20 PGD steps; GCG 100 steps; defence 50 steps
    est = secs["sweep"] * scale + secs["targeted"] * scale + secs["gcg"] * 50 + secs["defence"] * 25 * scale
    record("adversarial", sec, toks, 2 * fwd_flops(toks, row), est / sec,
           f"sweep {secs['sweep']:.1f} s, targeted {secs['targeted']:.1f} s, GCG {secs['gcg']:.1f} s, "
           f"defence {secs['defence']:.1f} s ({res.adversarial_training['trained']})")


def bench_analysis(c) -> None:
    model, ids, tiny, N, L, record = c.model, c.ids, c.tiny, c.N, c.L, c.record
    nb = 2
    Lw = 64 if tiny else 512
    windows = D.sample_windows(ids, 1 if tiny else 4, Lw, seed=0)
    mods = {n: m for n, m in LM.decoder_linears(model).items() if any(f"layers.{i}." in n for i in range(nb))}
    t = time.perf_counter()
    with LM.attention_implementation(model, "eager"):
        for i in range(nb):
            params = {n: m.weight for n, m in mods.items() if f"layers.{i}." in n}
            with LM.trainable_only(model, list(params.values())):
                A.hutchinson_trace(A.lm_loss_fn(model, windows), params, max_probes=3, tol=0.0, progress=False)
    sec = time.perf_counter() - t
    toks = windows.numel() * nb
    # per block: one forward + backward with the graph (6N/token), then 3 HVPs (~12N/token each)
    record("analysis (Hessian)", sec, toks, toks * N * (6 + 12 * 3), L / nb * (50 + 20 / L) / 4,
           f"{nb} blocks x 3 probes over {windows.shape[0]} x {Lw}; default {L} blocks x 50 probes (+20 power)")


BENCHES = {"eval": bench_eval, "finetune": bench_finetune, "prune": bench_prune,
           "noise": bench_noise, "adversarial": bench_adversarial, "analysis": bench_analysis}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    p.add_argument("--steps", default="eval,finetune,prune,noise,adversarial,analysis")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = LlamaConfig(max_position_embeddings=4096, **SHAPES[a.shape])
    cfg._attn_implementation = "sdpa"
    t = time.perf_counter()
    with torch.device(dev):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
    model.config.use_cache = False
    for q in model.parameters():
        q.requires_grad_(False)
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    N = sum(q.numel() for n, q in model.named_parameters() if "embed_tokens" not in n)
    peak_rate = matmul_rate(dev, dtype)
    tok = ByteTok(V)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (1 << 20,), generator=g)
    print(f"{a.shape}: {N / 1e9:.2f}B matrix params (+ embedding), {dtype}, {dev} "
          f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else ''}; built in {time.perf_counter() - t:.1f} s")
    print(f"matmul rate measured now: {peak_rate / 1e12:.1f} TFLOP/s")
    tiny = a.shape == "tiny"
    S = 256 if tiny else 2048

    def fwd_flops(tokens, seq):
        return tokens * (2 * N + 4 * L * seq * d)

    rows = []

    def record(step, seconds, tokens, flops, default_scale, note):
        sync(dev)
        mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
        rows.append((step, seconds, tokens / seconds, flops / seconds / peak_rate, mem, seconds * default_scale, note))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

    c = SimpleNamespace(model=model, tok=tok, ids=ids, S=S, tiny=tiny, dev=dev, N=N, L=L, fwd_flops=fwd_flops,
                        record=record)
    for step in a.steps.split(","):
        BENCHES[step](c)
    print(f"{'step':20s} {'wall s':>8s} {'tok/s':>10s} {'MFU':>6s} {'peak GiB':>9s} {'default s':>10s}  budget")
    for step, sec, tps, mfu, mem, est, note in rows:
        print(f"{step:20s} {sec:8.1f} {tps:10.0f} {mfu:6.1%} {mem:9.1f} {est:10.0f}  {note}")
    print(f"extrapolated default pipeline (these steps): {sum(r[5] for r in rows) / 60:.1f} min")




if __name__ == "__main__":
    main()
