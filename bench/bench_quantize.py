"""The quantize step (RTN, GPTQ) against a plain transcription loop on the same layers.

    python bench/bench_quantize.py [--layers N] [--repeats 3] [--calib-samples 32] [--seq-len 512]
                                   [--wbits 4] [--group 128] [--methods rtn,gptq] [--model ...]

The plain loops, written here from the papers' code and sharing nothing with the tool:
    rtn   per linear, groups of ``--group`` consecutive input columns, min-max with 0 in the range
          (GPTQ's ``Quantizer``, sym=False), codes clamp(round(w / scale) + zero), weights written.
    gptq  the reference's sequential driver (IST-DASLab/gptq ``llama_sequential`` without
          --true-sequential): block 0's inputs, per block one calibration pass accumulating
          H = 2 X X^T / n per linear, ``fasterquant`` (blocks of 128 columns, 1% dampening, groups
          found as the loop reaches them), then the block's quantized outputs feed the next.
Each repeat runs the tool's step (``quantize_model``) and the plain loop on the same model
weights and calibration windows, in alternating order, restoring the weights in between, and
checks that they agree (RTN: the same weights bit for bit; GPTQ: nearly all codes the same,
float32 rounding may flip a few). Medians over the repeats.

The tool's step also measures each linear's output error on calibration and held-out windows
(issue 34: a copy of the weights before quantization, a held-out draw, and two passes of
``--error-windows`` windows through the model: the step's ``--quant-error-windows``, 2 on CPU and 8 on
GPU by default), which the plain loop does not do; that part is
timed on its own and the ratios are printed with and without it. The last
line holds the ratios (targets: RTN <= 1.5x, GPTQ <= 1.2x its plain transcription).
``--layers 2`` keeps the first two decoder blocks: a smoke run in a minute or two.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llm_common as C  # noqa: E402
import llm_data as D  # noqa: E402
import llm_model as LM  # noqa: E402
import llm_quantize_model as Q  # noqa: E402
import llm_variants as V  # noqa: E402
from llm_config import QuantizeConfig  # noqa: E402

VALID = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-tokenized" / "valid.txt"


# ----------------------------------------------------------------- the plain loops


@torch.no_grad()
def plain_rtn(model, bits: int, group: int) -> dict:
    """RTN of every decoder linear in place, one reshape per matrix; returns the codes."""
    maxq, codes = 2 ** bits - 1, {}
    for name, mod in LM.decoder_linears(model).items():
        W = LM.weight_view(mod)
        out, cols = W.shape
        c = torch.empty(out, cols, dtype=torch.uint8)
        for s, e in ((0, cols // group * group), (cols // group * group, cols)):
            if e == s:
                continue
            x = W[:, s:e].float().reshape(out, -1, min(group, e - s))
            xmin = x.amin(-1, keepdim=True).clamp(max=0)
            xmax = x.amax(-1, keepdim=True).clamp(min=0)
            scale = ((xmax - xmin) / maxq).clamp(min=1e-10)
            zero = torch.round(-xmin / scale)
            q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
            c[:, s:e] = q.reshape(out, e - s)
            W[:, s:e] = (scale * (q - zero)).reshape(out, e - s).to(W.dtype)
        codes[name] = c
    return codes


def _find_params(x, maxq):
    """gptq quant.py ``Quantizer.find_params`` (perchannel, sym=False, weight=True)."""
    xmin = torch.minimum(x.min(1).values, torch.zeros(x.shape[0], device=x.device))
    xmax = torch.maximum(x.max(1).values, torch.zeros(x.shape[0], device=x.device))
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1, 1
    scale = ((xmax - xmin) / maxq)[:, None]
    return scale, torch.round(-xmin[:, None] / scale)


@torch.no_grad()
def fasterquant(W, H, bits, groupsize, blocksize=128, percdamp=0.01):
    """gptq.py ``GPTQ.fasterquant`` (no act order), in place on W [out, in]; returns the codes."""
    maxq = 2 ** bits - 1
    Wf = W.float().clone()
    H = H.clone()
    cols = Wf.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Wf[:, dead] = 0
    scale, zero = _find_params(Wf, maxq)
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(cols, device=H.device)
    H[idx, idx] += damp
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Qw = torch.zeros_like(Wf)
    codes = torch.zeros_like(Wf)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wf[:, i1:i2].clone()
        Q1, C1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if groupsize and (i1 + i) % groupsize == 0:
                scale, zero = _find_params(Wf[:, i1 + i:i1 + i + groupsize], maxq)
            c = torch.clamp(torch.round(w[:, None] / scale) + zero, 0, maxq)
            q = (scale * (c - zero)).flatten()
            C1[:, i], Q1[:, i] = c.flatten(), q
            err = (w - q) / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Qw[:, i1:i2], codes[:, i1:i2] = Q1, C1
        Wf[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W.copy_(Qw.to(W.dtype))
    return codes.to(torch.uint8)


@torch.no_grad()
def plain_gptq(model, windows, bits: int, group: int) -> dict:
    """The reference's sequential driver around ``fasterquant``; returns the codes."""
    layers, dev, inputs, kw = LM.decoder_layers(model), LM.input_device(model), [], {}

    class Stop(Exception):
        pass

    def catch(mod, args, kwargs):
        inputs.append(args[0] if args else kwargs.pop("hidden_states"))
        kw.update({k: v for k, v in kwargs.items() if k != "hidden_states"} if not kw else {})
        raise Stop

    h = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    for w in windows:
        try:
            model(input_ids=w[None].to(dev), use_cache=False)
        except Stop:
            pass
    h.remove()
    for k in ("past_key_values", "past_key_value", "cache"):
        kw.pop(k, None)
    kw["use_cache"] = False
    names, codes = LM.module_names(model), {}
    for layer in layers:
        lin = {n: m for n, m in layer.named_modules() if n and LM.is_linear(m)}
        H, n_tok, hooks = {}, {}, []

        def add_batch(mod, args, out, n=None):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            H[n] = H.get(n, 0) + 2 * x.t() @ x
            n_tok[n] = n_tok.get(n, 0) + x.shape[0]
        for n, m in lin.items():
            hooks.append(m.register_forward_hook(lambda mod, a, o, n=n: add_batch(mod, a, o, n)))
        for x in inputs:
            layer(x, **kw)
        for hk in hooks:
            hk.remove()
        for n, m in lin.items():
            codes[names[m]] = fasterquant(LM.weight_view(m), H[n] / n_tok[n], bits, group)
        del H
        inputs = [LM_out(layer(x, **kw)) for x in inputs]
    return codes


def LM_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# ----------------------------------------------------------------- the bench


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder blocks (a smoke run)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--methods", default="rtn,gptq")
    p.add_argument("--device", default="auto")
    p.add_argument("--error-windows", type=int, default=None, help="the output-error diagnostic's windows "
                   "(default: the step's budget, 2 on CPU and 8 on GPU; 0: off)")
    a = p.parse_args()
    C.setup_logging("WARNING")
    model, tok, label = LM.load_model(LM.LoadConfig(model=a.model, device=a.device))
    if a.layers:
        layers = LM.decoder_layers(model)
        del layers[a.layers:]
        model.config.num_hidden_layers = len(layers)
    text = VALID.read_text() if VALID.is_file() else D.embedded_corpus("train")
    ids = D.tokenize_corpus(tok, text)
    names = [n + ".weight" for n in LM.decoder_linears(model)]
    cfgs = {m: QuantizeConfig(method=m, wbits=a.wbits, group=a.group, calib_samples=a.calib_samples,
                              error_windows=a.error_windows,
                              calib_seq_len=a.seq_len, progress=False) for m in a.methods.split(",")}
    windows = D.calibration_windows(tok, ids, a.calib_samples, a.seq_len, cfgs[next(iter(cfgs))].calibration_seed)
    print(f"model {label}, {len(LM.decoder_layers(model))} decoder blocks, {len(names)} linears, "
          f"{a.wbits}-bit g{a.group}, GPTQ calibration {a.calib_samples} x {a.seq_len} tokens, "
          f"{a.repeats} repeats on {LM.input_device(model)}")

    err_s = []
    real = {f: getattr(Q, f) for f in ("output_error", "held_out_windows", "_weights_before")}

    def timed(f):  # the tool's output-error diagnostic (its copy of W, held-out draw and passes), timed apart
        def run(*args, **kw):
            t = time.perf_counter()
            try:
                return real[f](*args, **kw)
            finally:
                err_s[-1] += time.perf_counter() - t
        return run
    for f in real:
        setattr(Q, f, timed(f))

    for method, cfg in cfgs.items():  # warm-up, untimed: the first call of each pays the allocator's page faults
        with V.restored_on_exit(model, names):
            err_s.append(0.0)
            Q.quantize_model(model, tok, ids, cfg)
        with V.restored_on_exit(model, names):
            plain_rtn(model, a.wbits, a.group) if method == "rtn" else plain_gptq(model, windows[:2], a.wbits, a.group)
    times = {m: {"tool": [], "error": [], "plain": []} for m in cfgs}
    agree = {}
    for r in range(a.repeats):
        for method, cfg in cfgs.items():
            order = ("tool", "plain") if r % 2 == 0 else ("plain", "tool")
            got = {}
            for who in order:
                with V.restored_on_exit(model, names):
                    t = time.perf_counter()
                    if who == "tool":
                        err_s.append(0.0)
                        res = Q.quantize_model(model, tok, ids, cfg)
                        times[method]["tool"].append(time.perf_counter() - t)
                        times[method]["error"].append(err_s[-1])
                        got["tool"] = ({n: q.codes for n, q in res.quantized.items()},
                                       {n: LM.weight_view(m).detach().clone() for n, m in
                                        LM.decoder_linears(model).items()})
                    else:
                        codes = plain_rtn(model, a.wbits, a.group) if method == "rtn" else \
                            plain_gptq(model, windows, a.wbits, a.group)
                        times[method]["plain"].append(time.perf_counter() - t)
                        got["plain"] = ({n + ".weight": c for n, c in codes.items()},
                                        {n: LM.weight_view(m).detach().clone() for n, m in
                                         LM.decoder_linears(model).items()})
            (tc, tw), (pc, pw) = got["tool"], got["plain"]
            if method == "rtn":  # the same weights, bit for bit
                assert all(torch.equal(tc[n], pc[n]) for n in tc), "RTN codes differ from the plain loop"
                assert all(torch.equal(tw[n], pw[n]) for n in tw), "RTN weights differ from the plain loop"
                agree[method] = 1.0
            else:  # float32 rounding in H and the updates may flip a few codes
                same = sum(int((tc[n] == pc[n]).sum()) for n in tc) / sum(c.numel() for c in tc.values())
                assert same > 0.99, f"GPTQ codes agree with the plain loop on only {same:.2%}"
                agree[method] = same
            s = times[method]
            print(f"  repeat {r + 1} {method}: tool {s['tool'][-1]:.2f} s (output error {s['error'][-1]:.2f} s), "
                  f"plain {s['plain'][-1]:.2f} s", flush=True)
    for f, fn in real.items():
        setattr(Q, f, fn)
    ratios = {}
    for method, s in times.items():
        tool, err, plain = (statistics.median(s[k]) for k in ("tool", "error", "plain"))
        step = statistics.median(t - e for t, e in zip(s["tool"], s["error"]))
        ratios[method] = (step / plain, tool / plain)
        print(f"{method}: tool {tool:.2f} s = {step:.2f} s quantizing + {err:.2f} s output error; plain loop "
              f"{plain:.2f} s; codes the same as the plain loop's: {agree[method]:.2%}")
    targets = {"rtn": 1.5, "gptq": 1.2}
    print("ratio (median, tool / plain; target in brackets, then with the output-error diagnostic): " + ", ".join(
        f"{m} {q:.2f}x [<= {targets[m]}] ({w:.2f}x)" for m, (q, w) in ratios.items()))


if __name__ == "__main__":
    main()
