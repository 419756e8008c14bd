"""The quantize step (issue 25): GPTQ against an independent transcription of the reference
``fasterquant``, RTN vs GPTQ reconstruction, the greedy mixed precision on a planted problem,
and the quantized variant through the pipeline, stored as codes and rebuilt bit for bit."""
import json
import math

import pytest
import torch

import llm_common as C
import llm_compress as LC
import llm_model as LM
from llm_quantize_model import allocate_bits


# ----------------------------------------------------------------- the reference, transcribed

class RefQuantizer:
    """IST-DASLab/gptq quant.py ``Quantizer`` (perchannel=True, sym=False, weight=True)."""

    def __init__(self, bits):
        self.maxq = torch.tensor(2 ** bits - 1)

    def find_params(self, x):
        tmp = torch.zeros(x.shape[0], dtype=x.dtype)
        xmin = torch.minimum(x.min(1)[0], tmp)
        xmax = torch.maximum(x.max(1)[0], tmp)
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp], xmax[tmp] = -1, +1
        self.scale = ((xmax - xmin) / self.maxq).unsqueeze(1)
        self.zero = torch.round(-xmin / self.scale.flatten()).unsqueeze(1)


def ref_quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def ref_fasterquant(W, H, bits, blocksize=128, percdamp=.01, groupsize=-1, actorder=False):
    """gptq.py ``GPTQ.fasterquant``, transcribed line by line (returns Q)."""
    W = W.clone()
    H = H.clone()
    quantizer = RefQuantizer(bits)
    quantizer.find_params(W)
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1 and (i1 + i) % groupsize == 0:
                quantizer.find_params(W[:, (i1 + i):(i1 + i + groupsize)])
            q = ref_quantize(w.unsqueeze(1), quantizer.scale, quantizer.zero, quantizer.maxq).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, torch.argsort(perm)]
    return Q


def _layer(seed=0, out=24, inp=96, tokens=400):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    mix = torch.eye(inp, dtype=torch.float64) + 0.3 * torch.randn(inp, inp, generator=g, dtype=torch.float64)
    X = (torch.randn(tokens, inp, generator=g, dtype=torch.float64) @ mix) * (torch.rand(inp, generator=g,
                                                                                       dtype=torch.float64) * 3)
    X[:, 5] = 0  # a dead input
    return W, X, 2 * X.T @ X / tokens


@pytest.mark.parametrize("group,blocksize,act_order", [(0, 128, False), (32, 32, False), (32, 64, False),
                                                       (16, 128, True), (0, 40, True)])
def test_gptq_equals_the_reference_fasterquant(group, blocksize, act_order):
    W, X, H = _layer()
    want = ref_fasterquant(W, H, 3, blocksize, 0.01, group or -1, act_order)
    got = LC.gptq_quantize(W, H, 3, group, blocksize, 0.01, act_order)
    assert torch.allclose(got.dequantized, want, atol=1e-6, rtol=0)
    # The codes and grids alone give the same values (float32 storage of the grids).
    assert torch.allclose(got.dequantize(torch.float64), want, atol=1e-5, rtol=0)


def test_gptq_reconstructs_better_than_rtn_and_keeps_super_weights():
    W, X, H = _layer(seed=1)
    W, X, H = W.float(), X.float(), H.float()
    keep = torch.zeros_like(W, dtype=torch.bool)
    keep[3, 7] = True
    W[3, 7] = 30.0  # a super weight
    for bits in (2, 3, 4):
        g = LC.gptq_quantize(W, H, bits, 32, keep=keep)
        r = LC.rtn_quantize(W, bits, 32, keep=keep)
        err = lambda q: float(((W - q.dequantize(torch.float32)) @ X.T).norm())  # noqa: E731
        assert err(g) < 0.8 * err(r), bits  # correlated inputs: OBS updates pay off
        assert r.dequantize(torch.float32)[3, 7] == 30.0
        assert len(torch.unique(g.codes)) <= 2 ** bits


def _q4_1(W: torch.Tensor):
    """W [out, in] through the gguf package's own Q4_1: (dequantized W, fp16 d and m per block
    of 32 as float32 [out, in / 32]), from its raw 20-byte blocks (d, m fp16, then 16 bytes of codes)."""
    from gguf import GGMLQuantizationType as T, dequantize, quantize
    import numpy as np

    raw = quantize(W.numpy(), T.Q4_1)
    blocks = raw.reshape(-1, 20)
    d, m = (torch.from_numpy(blocks[:, a:a + 2].copy().view(np.float16).astype(np.float32)).reshape(W.shape[0], -1)
            for a in (0, 2))
    return torch.from_numpy(dequantize(raw, T.Q4_1)).reshape(W.shape), d, m


def test_float_zero_point_reproduces_the_gguf_q4_1_grid_and_integer_does_not():
    """The weights of a Q4_1 file (as the embedded model's) are fixed points of the float-zero
    quantizer at 4 bits, group 32: the same fp16 scale and minimum as the file, bit for bit
    the same values, with RTN and with GPTQ (no error, so nothing to feed back)."""
    pytest.importorskip("gguf")
    torch.manual_seed(0)
    W = torch.randn(48, 96) * 0.05 + 0.01 * torch.randn(48, 1)
    W[0, :32] = torch.linspace(0.2, 0.5, 32)  # a block far from 0: GPTQ's grid must stretch to 0
    G, d, m = _q4_1(W)
    r = LC.rtn_quantize(G, 4, 32, zero_point="float")
    assert r.zero_point == "float" and torch.equal(r.scale, d) and torch.equal(r.zero, m)
    assert torch.equal(r.dequantize(torch.float32), G)
    X = torch.randn(256, 96) @ torch.randn(96, 96)  # correlated inputs, none dead (GPTQ zeroes dead columns)
    g = LC.gptq_quantize(G, 2 * X.T @ X / 256, 4, 32, zero_point="float")
    assert torch.equal(g.dequantize(torch.float32), G) and torch.equal(g.dequantized, G)
    i = LC.rtn_quantize(G, 4, 32).dequantize(torch.float32)
    assert (i == G).float().mean() < 0.2 and not torch.equal(i[0, :32], G[0, :32])
    # Off the grid: the float zero's values are code * scale + min with codes in [0, 15], and it
    # is at least as close as the integer zero on a block that does not straddle 0.
    f = LC.rtn_quantize(W, 4, 32, zero_point="float")
    q = f.codes.float().reshape(48, 3, 32) * f.scale[..., None] + f.zero[..., None]
    assert torch.equal(f.dequantize(torch.float32), q.reshape(48, 96)) and int(f.codes.max()) <= 15
    e = lambda q: float((q.dequantize(torch.float32)[0, :32] - W[0, :32]).norm())  # noqa: E731
    assert e(f) < 0.75 * e(LC.rtn_quantize(W, 4, 32))  # step 0.3 / 15 against 0.5 / 15


def test_float_zero_point_gptq_feeds_back_its_own_grid_and_survives_storage(tmp_path):
    W, X, H = _layer(seed=2)
    W, X, H = W.float(), X.float(), H.float()
    g = LC.gptq_quantize(W, H, 3, 32, zero_point="float")
    # The kernel's values are the stored codes on the float grid, and GPTQ beats RTN on that grid.
    assert torch.equal(g.dequantize(torch.float32), g.dequantized)
    err = lambda q: float(((W - q.dequantize(torch.float32)) @ X.T).norm())  # noqa: E731
    assert err(g) < 0.8 * err(LC.rtn_quantize(W, 3, 32, zero_point="float"))
    (tmp_path / "checkpoints").mkdir()
    LC.save_codes(tmp_path, "v", {"a.weight": g, "b.weight": LC.rtn_quantize(W, 3, 32)})
    back = LC.load_codes(tmp_path / "checkpoints" / "v.safetensors")
    assert back["a.weight"].zero_point == "float" and back["b.weight"].zero_point == "integer"
    assert torch.equal(back["a.weight"].dequantize(torch.float32), g.dequantized)


def plain_rtn(W, bits, group, symmetric=False, keep=None):
    """RTN with groups of ``group`` consecutive input columns (a narrower tail), transcribed
    group by group: the range includes 0 (GPTQ's ``Quantizer``; symmetric: [-max|w|, max|w|] and
    the middle code as zero), kept entries out of the range and left as they are. Returns the
    codes and the dequantized values."""
    maxq = 2 ** bits - 1
    codes, values = torch.zeros(W.shape, dtype=torch.uint8), torch.zeros_like(W)
    for s in range(0, W.shape[1], group):
        x = W[:, s:s + group].float()
        k = keep[:, s:s + group] if keep is not None else torch.zeros_like(x, dtype=torch.bool)
        xmin = torch.minimum(torch.where(k, math.inf, x).min(1).values, torch.zeros(x.shape[0]))
        xmax = torch.maximum(torch.where(k, -math.inf, x).max(1).values, torch.zeros(x.shape[0]))
        if symmetric:
            xmax = torch.maximum(-xmin, xmax)
            xmin = -xmax
        scale = ((xmax - xmin) / maxq).clamp(min=1e-10)[:, None]
        zero = torch.full_like(scale, 2 ** (bits - 1)) if symmetric else torch.round(-xmin[:, None] / scale)
        q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
        codes[:, s:s + group] = q.to(torch.uint8)
        values[:, s:s + group] = torch.where(k, x, scale * (q - zero)).to(W.dtype)
    return codes, values


@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_step_equals_a_plain_transcription_bit_for_bit(tok, sample_text, symmetric):
    """Issue 41: the RTN step's codes and written weights are exactly a plain group-by-group loop's,
    with a tail group (width 80 at group 32) and a protected coordinate kept in full precision;
    the stored codes rebuild the same weights through ``Quantized.dequantize``'s group view, and
    through its general (gathering) path when the column groups are shuffled."""
    from conftest import make_llama

    from llm_config import QuantizeConfig
    from llm_quantize_model import quantize_model

    m = make_llama(seed=5, hidden=80)
    before = {n: LM.weight_view(mod).detach().clone() for n, mod in LM.decoder_linears(m).items()}
    kept = "model.layers.1.mlp.down_proj"
    cfg = QuantizeConfig(method="rtn", wbits=3, group=32, symmetric=symmetric, protect=((kept, 4, 70),),
                         calib_samples=2, calib_seq_len=32, progress=False)
    res = quantize_model(m, tok, torch.tensor(tok(sample_text[:3000]).input_ids), cfg)
    assert res.kept_weights == 1
    for n, mod in LM.decoder_linears(m).items():
        keep = None
        if n == kept:
            keep = torch.zeros_like(before[n], dtype=torch.bool)
            keep[4, 70] = True
        codes, values = plain_rtn(before[n], 3, 32, symmetric, keep)
        q = res.quantized[n + ".weight"]
        assert torch.equal(q.codes[~keep] if keep is not None else q.codes, codes[~keep] if keep is not None else codes)
        assert torch.equal(LM.weight_view(mod).detach(), values), n
        assert torch.equal(q.dequantize(torch.float32), values), n
        assert res.rel_error[n] == pytest.approx(float((values - before[n]).norm() / before[n].norm()), rel=1e-6)
    # The general path: columns whose groups are not consecutive (as act order's) gather scale and zero.
    q = res.quantized["model.layers.0.mlp.up_proj.weight"]
    perm = torch.randperm(q.codes.shape[1], generator=torch.Generator().manual_seed(0))
    shuffled = LC.Quantized(q.codes[:, perm], q.scale, q.zero, q.g_idx[perm], symmetric=q.symmetric)
    assert torch.equal(shuffled.dequantize(torch.float32), q.dequantize(torch.float32)[:, perm])


def test_one_quantizer_for_the_analysis_study():
    import llm_integrated_analysis as A

    assert A.quantize_rtn_ is LC.quantize_rtn_ and A.rtn_groups is LC.rtn_groups


def test_mixed_precision_meets_its_budget_and_beats_uniform_on_a_planted_problem():
    torch.manual_seed(0)
    Ws = {f"l{i}": torch.randn(64, 128) for i in range(4)}
    sens = {"l0": 100.0, "l1": 1.0, "l2": 1.0, "l3": 1.0}  # one layer 100x more sensitive
    err = {n: {b: float((LC.rtn_quantize(W, b, 32).dequantize(torch.float32) - W).pow(2).sum()) for b in (2, 3, 4, 8)}
           for n, W in Ws.items()}
    sizes = {n: W.numel() for n, W in Ws.items()}
    bits = allocate_bits(sens, err, sizes, 3.25)
    avg = sum(bits[n] * sizes[n] for n in Ws) / sum(sizes.values())
    assert avg <= 3.25 + 1e-9
    obj = lambda b: sum(sens[n] * err[n][b[n]] for n in Ws)  # noqa: E731
    uniform = obj({n: 3 for n in Ws})
    assert obj(bits) < 0.6 * uniform
    assert bits["l0"] == max(bits.values()) and bits["l0"] >= 4
    # Exhaustive search over the 4^4 choices: the greedy answer is the optimum here.
    import itertools
    best = min((obj(dict(zip(Ws, c))), c) for c in itertools.product((2, 3, 4, 8), repeat=4)
               if sum(b * sizes[n] for n, b in zip(Ws, c)) <= 3.25 * sum(sizes.values()))
    assert obj(bits) == pytest.approx(best[0])
    with pytest.raises(C.UserError, match="below the fewest"):
        allocate_bits(sens, err, sizes, 1.5)


def test_keep_fraction_and_fisher_bits_share_one_backward_per_window(monkeypatch):
    """--quant-keep-fraction and --bit-allocation fisher read the same per-window gradients: one
    backward per sensitivity window, not two; the Fisher sensitivities against per-window
    gradients taken by hand."""
    import llm_data as D
    import llm_quantize_model as Q
    from conftest import make_llama, make_tokenizer
    from llm_config import QuantizeConfig

    model, tok = make_llama(layers=2, hidden=32), make_tokenizer()
    ids = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(0))
    cfg = QuantizeConfig(method="rtn", group=16, keep_fraction=0.01, bit_allocation="fisher", avg_bits=3.5,
                         sensitivity_windows=3, calib_samples=3, calib_seq_len=24, progress=False)
    windows = D.calibration_windows(tok, ids, 3, 24, cfg.seed)
    linears = LM.decoder_linears(model)
    by_hand = {n: torch.zeros(LM.weight_view(m).shape) for n, m in linears.items()}
    for w in windows:
        loss = model(input_ids=w[None], labels=w[None]).loss
        grads = torch.autograd.grad(loss, [m.weight for m in linears.values()])
        for (n, m), g in zip(linears.items(), grads):
            by_hand[n] += LM.out_in(m, g).pow(2) / len(windows)
    calls = []
    real = torch.autograd.backward
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    res = Q.quantize_model(model, tok, ids, cfg)
    assert len(calls) == 3  # one per window; the keep mask and the bits used to take three each
    assert res.kept_weights > 0
    for n, g2 in by_hand.items():
        assert res.sensitivity[n] == pytest.approx(float(g2.sum()) / g2.numel(), rel=1e-4)


@pytest.fixture(scope="module")
def qsetup(tmp_path_factory, sample_text):
    from conftest import planted_model_dir

    return planted_model_dir(tmp_path_factory.mktemp("quant"), sample_text[:3000])


@pytest.mark.parametrize("method,alloc", [("gptq", "uniform"), ("rtn", "fisher")])
def test_quantized_variant_through_the_pipeline(qsetup, pipeline_config, method, alloc, tmp_path):
    import llm_main_v4
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    cfg = pipeline_config(qsetup / "model", qsetup / "text.txt", out, steps=("quantize", "eval", "export"),
                          quantize={"method": method, "wbits": 3, "group": 16, "protect": "auto",
                                    "bit_allocation": alloc, "avg_bits": 3.5, "calib_samples": 4,
                                    "calib_seq_len": 32, "sensitivity_windows": 2},
                          export={"enabled": True})
    llm_main_v4.run_pipeline(cfg, argv=[])
    res = json.loads((out / "results.json").read_text())
    q = res["quantize"]
    assert q["format"] == "codes" and res["variants"]["quantized"] == "base"
    assert math.isfinite(res["perplexity"]["quantized"]) and res["perplexity"]["quantized"] != res["perplexity"]["base"]
    assert q["protected"] and q["kept_weights"] >= 1
    if alloc == "uniform":
        assert q["avg_code_bits"] == 3
    else:
        assert q["avg_code_bits"] <= 3.5 + 1e-9 and set(q["bits"].values()) <= {2, 3, 4, 8}
    assert q["avg_bits"] > q["avg_code_bits"]  # scales and zeros counted
    assert res["plots"]["quantize"] == "plots/quantize_bits_per_layer.png" and "quantized" in res["export"]["variants"]
    # The compact record rebuilds the weights bit for bit: the export holds what the step wrote.
    model, tok, _ = LM.load_model(LM.LoadConfig(model=str(qsetup / "model")))
    with LC.coded_weights(model, out / q["checkpoint"]):
        rebuilt = {n: p.detach().clone() for n, p in model.named_parameters()}
    exported = AutoModelForCausalLM.from_pretrained(out / "export" / "quantized").eval()
    for n, p in exported.named_parameters():
        assert torch.equal(p, rebuilt[n]), n
    # Issue 34: the bytes written per weight (uint8 codes: at least 8) and the output errors per linear
    n = sum(LM.weight_view(mod).numel() for mod in LM.decoder_linears(model).values())
    size = (out / q["checkpoint"]).stat().st_size
    assert q["stored_bits_per_weight"] == pytest.approx(8 * size / n, rel=1e-12)
    assert q["stored_bits_per_weight"] > 8 > q["avg_bits"]
    assert set(q["output_error"]["held_out"]) == set(q["bits"]) == set(q["output_error"]["calibration"])
    sw = q["protected"][0]
    W = LM.weight_view(model.get_submodule(sw[0]))
    assert rebuilt[sw[0] + ".weight"][sw[1], sw[2]] == W[sw[1], sw[2]]  # super weight kept exactly
    ids = torch.randint(0, 256, (1, 16))
    with LC.coded_weights(model, out / q["checkpoint"]), torch.no_grad():
        assert torch.equal(model(ids).logits, exported(ids).logits)
    # A rerun reattaches the stored variant without quantizing again.
    again = llm_main_v4.run_pipeline(cfg, argv=[])
    assert again["manifest"]["steps"]["quantize"]["skipped"] and again["perplexity"] == res["perplexity"]


def test_quantized_variant_is_scored_exported_as_compressed_tensors_reported_and_compared(qsetup, pipeline_config,
                                                                                          tmp_path):
    """The quantized variant like pruned and noisy: zero-shot in memory equals lm-eval's own run
    on its export; the compressed-tensors export is pack-quantized (int32-packed codes, scales and
    zero points, one config group per bit width of the mixed precision), keeps the super weight's
    linear dense, and reloads through compressed-tensors' decompressor to the stored codes'
    logits exactly; the model card, the report and --compare show it."""
    import lm_eval
    from safetensors import safe_open
    from lm_eval.models.huggingface import HFLM
    from test_zeroshot import write_local_task
    from transformers import AutoTokenizer

    import llm_export as E
    import llm_main_v4 as M
    from llm_results import fmt

    folder = tmp_path / "tasks"
    write_local_task(folder)
    runs = {}
    for name, method, alloc in (("a", "gptq", "fisher"), ("b", "rtn", "uniform")):
        cfg = pipeline_config(qsetup / "model", qsetup / "text.txt", tmp_path / name,
                              steps=("quantize", "eval", "zeroshot", "export"),
                              quantize={"method": method, "wbits": 3, "group": 16, "protect": "auto",
                                        "bit_allocation": alloc, "avg_bits": 3.5, "calib_samples": 4,
                                        "calib_seq_len": 32, "sensitivity_windows": 2},
                              zeroshot={"tasks": ("tiny_qa",), "include_path": str(folder)},
                              export={"enabled": True, "quant_format": "compressed-tensors", "dtype": "float32"})
        runs[name] = M.run_pipeline(cfg, argv=["--tasks", "tiny_qa", "--export-quant-format", "compressed-tensors",
                                               "--export-dtype", "float32"])
    res = runs["a"]
    q, zs, path = res["quantize"], res["zeroshot"], tmp_path / "a" / "export" / "quantized"
    assert zs["status"] == "ran" and set(zs["tasks"]) == {"base", "quantized"} and zs["parents"]["quantized"] == "base"
    assert len(set(q["bits"].values())) > 1  # mixed precision: several config groups

    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    by_bits = {g["weights"]["num_bits"]: set(g["targets"]) for g in qc["config_groups"].values()}
    sw = q["protected"][0][0]
    assert sw in qc["ignore"] and all(sw not in t for t in by_bits.values())
    assert by_bits == {b: {n for n, nb in q["bits"].items() if nb == b and n != sw} for b in set(q["bits"].values())}
    assert all(g["weights"]["group_size"] == 16 and not g["weights"]["symmetric"] for g in qc["config_groups"].values())
    name = next(iter(sorted(by_bits[min(by_bits)])))
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        codes, keys = f.get_tensor(name + ".weight_packed"), set(f.keys())
    assert codes.dtype == torch.int32 and {name + ".weight_scale", name + ".weight_zero_point"} <= keys
    assert name + ".weight" not in keys

    model, _, _ = LM.load_model(LM.LoadConfig(model=str(qsetup / "model")))
    exported = E.load_compressed_tensors(path)
    ids = torch.randint(0, 256, (2, 16))
    with LC.coded_weights(model, tmp_path / "a" / q["checkpoint"]), torch.no_grad():
        quantized = model(ids).logits
    assert torch.equal(quantized, exported(ids).logits)
    with torch.no_grad():
        assert not torch.equal(quantized, model(ids).logits)  # restored: the export is not the base model
    lm = HFLM(pretrained=exported, tokenizer=AutoTokenizer.from_pretrained(path), device="cpu")
    own = lm_eval.simple_evaluate(model=lm,
                                  tasks=["tiny_qa"], task_manager=lm_eval.tasks.TaskManager(include_path=str(folder)),
                                  limit=100, log_samples=False)["results"]["tiny_qa"]
    assert zs["tasks"]["quantized"]["tiny_qa"]["acc"] == pytest.approx(own["acc,none"], abs=1e-12)
    assert res["export"]["variants"]["quantized"]["quant_format"]["dense"] == [sw]
    assert res["export"]["variants"]["base"].get("quant_format") is None  # only codes are packed

    card = (path / "README.md").read_text()
    assert "gptq weight quantization, fisher mixed precision at 3.5 code bits per weight, group 16" in card and "| tiny_qa |" in card
    # issue 40: 3-bit asymmetric is refused by vLLM below sm90, and transformers' plain path refuses the packed zero
    assert "asymmetric 3-bit weights have no kernel below compute capability 9.0" in card
    assert "| transformers plain | float32 | **no**" in card and "| transformers dequantize | float32 | yes |" in card
    report = (tmp_path / "a" / "report.md").read_text()
    assert f"GPTQ quantization (fisher mixed precision at 3.5 code bits per weight, group 16: {fmt(q['avg_bits'])} " \
           f"bits per weight as the papers count them) gives perplexity {fmt(res['perplexity']['quantized'])}" in report
    assert [ln for ln in report.splitlines() if ln.startswith("| quantized |") and "±" in ln]
    assert M.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--output-dir", str(tmp_path / "c")]) == 0
    compare = (tmp_path / "c" / "compare.md").read_text()
    assert "| quantization |" in compare and "gptq fisher mixed precision at 3.5" in compare and "rtn 3-bit g16" in compare
    acc = f"{100 * zs['mean']['quantized']['acc']:.1f}"
    assert acc in compare.split("Zero-shot mean accuracy")[1]


@pytest.mark.parametrize("sens_of", [lambda i: 0.0, lambda i: float("nan"), lambda i: -1.0 * i,
                                     lambda i: [0.0, float("nan"), 1.0, -2.0][i]])
def test_a_budget_that_allows_every_bit_is_spent_whatever_the_sensitivity(sens_of):
    """Issue 33: a layer whose sensitivity is 0, negative or NaN still takes the bits the budget
    leaves: --avg-bits 8 is 8 bits everywhere; a smaller budget is spent up to its last fitting bit."""
    g = torch.Generator().manual_seed(0)
    Ws = {f"l{i}": torch.randn(16, 32, generator=g) for i in range(4)}
    err = {n: {b: float((LC.rtn_quantize(W, b, 32).dequantize(torch.float32) - W).pow(2).sum()) for b in (2, 3, 4, 8)}
           for n, W in Ws.items()}
    sizes = {n: W.numel() for n, W in Ws.items()}
    sens = {f"l{i}": sens_of(i) for i in range(4)}
    assert set(allocate_bits(sens, err, sizes, 8.0).values()) == {8}
    bits = allocate_bits(sens, err, sizes, 4.0)
    assert sum(bits[n] * sizes[n] for n in Ws) == 4 * sum(sizes.values())  # equal sizes: 4.0 is reachable


@pytest.mark.parametrize("flags, named", [
    (("--quant-method", "rtn", "--act-order"), "--act-order"),
    (("--quant-method", "rtn", "--gptq-percdamp", "0.05"), "--gptq-percdamp"),
    (("--quant-method", "rtn", "--gptq-blocksize", "64"), "--gptq-blocksize"),
    (("--quant-method", "rtn", "--avg-bits", "3"), "--avg-bits"),
    (("--quant-method", "gptq", "--bit-allocation", "fisher", "--quant-sensitivity-probes", "3"),
     "--quant-sensitivity-probes"),
    (("--export-quant-format", "compressed-tensors",), "--export-quant-format"),
])
def test_a_flag_the_chosen_method_ignores_is_a_warning(tiny_run_dir, tmp_path, caplog, flags, named):
    """Issue 33: every flag has an effect or a warning (checked before the model loads)."""
    import llm_main_v4 as M
    from conftest import tiny_argv

    steps = "export" if named == "--export-quant-format" else "quantize"
    assert M.main(tiny_argv(tiny_run_dir, tmp_path / "o", "--steps", steps, *flags)) == 0
    assert f"{named} has no effect here" in caplog.text


@pytest.mark.parametrize("flags, named", [(("--sparsity", "0.7"), "--sparsity"), (("--wbits", "3"), "--wbits"),
                                          (("--attack-target", " x"), "--attack-target"), (("--kl",), "--kl")])
def test_a_flag_of_a_step_not_run_is_a_warning(tiny_run_dir, tmp_path, caplog, flags, named):
    import llm_main_v4 as M
    from conftest import tiny_argv

    steps = "prune" if named != "--sparsity" else "noise"
    assert M.main(tiny_argv(tiny_run_dir, tmp_path / "o", "--steps", steps, "--sweep-eps", "0.1", "--sweep-seeds",
                            "1", "--sweep-tokens", "64", "--sweep-seq-len", "32", *flags)) == 0
    line = next(ln for ln in caplog.text.splitlines() if "as step" in ln)
    assert named in line and "is not run" in line


def test_compressed_tensors_without_a_quantized_variant_is_a_warning(tiny_run_dir, tmp_path, caplog):
    import llm_main_v4 as M
    from conftest import tiny_argv

    assert M.main(tiny_argv(tiny_run_dir, tmp_path / "o", "--steps", "export", "--export",
                            "--export-quant-format", "compressed-tensors")) == 0
    assert "--export-quant-format compressed-tensors has no effect here" in caplog.text


def test_calib_seeds_make_one_quantized_variant_per_draw(tiny_run_dir, tmp_path):
    """Issue 31: --calib-seeds builds the quantized variant once per calibration draw: each stored
    variant's codes equal quantize_model's seeded alone with that draw, two draws give other codes,
    and the robustness matrix gives every measure's mean ± std over the draws."""
    import dataclasses

    import llm_config as K
    import llm_data as D
    import llm_main_v4 as M
    import llm_quantize_model as Q
    import llm_variants as V
    from conftest import tiny_argv

    out = tmp_path / "o"
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "quantize,eval", "--quant-method", "gptq",
                            "--quant-group", "16", "--calib-seeds", "3,4")) == 0
    res = json.loads((out / "results.json").read_text())
    names = ["quantized[seed=3]", "quantized[seed=4]"]
    assert set(res["perplexity"]) == {"base", *names}
    grid = res["quantize"]["grid"]
    assert [r["name"] for r in grid] == names and [r["calibration_seed"] for r in grid] == [3, 4]
    assert list(res["robustness"]["draws"]) == ["quantized"]
    model, tok, _ = LM.load_model(LM.LoadConfig(model=str(tiny_run_dir / "model")))
    calib = D.load_corpus(str(tiny_run_dir / "text.txt"), "train")
    cfg = K.QuantizeConfig.from_dict(res["quantize"]["config"])
    codes = []
    for seed, rec in zip((3, 4), grid):
        with V.restored_on_exit(model, [n + ".weight" for n in LM.decoder_linears(model)]):
            alone = Q.quantize_model(model, tok, calib, dataclasses.replace(cfg, calib_seed=seed))
        stored = LC.load_codes(out / rec["checkpoint"])
        assert set(stored) == set(alone.quantized)
        assert all(torch.equal(alone.quantized[n].codes, stored[n].codes) for n in stored)
        codes.append(stored)
    assert any(not torch.equal(codes[0][n].codes, codes[1][n].codes) for n in codes[0])  # other windows


def test_output_error_on_calibration_and_held_out_windows(tok, sample_text):
    """Issue 34: quantize_model records each linear's ||(W - Q) X|| / ||W X|| on its calibration
    windows and on a disjoint draw. The held-out figure equals a direct computation (inputs
    hooked in the quantized model, the reference weights kept aside); the held-out windows share
    no 16-token run with the calibration ones; GPTQ, which minimises this error on its
    calibration windows, beats RTN there."""
    from conftest import make_llama

    from llm_config import QuantizeConfig
    from llm_quantize_model import quantize_model

    ids = torch.tensor(tok(sample_text[:6000]).input_ids)
    res, ref = {}, None
    for method in ("rtn", "gptq"):
        m = make_llama(seed=3, hidden=64)
        ref = {n: LM.weight_view(mod).detach().clone() for n, mod in LM.decoder_linears(m).items()}
        cfg = QuantizeConfig(method=method, wbits=3, group=16, calib_samples=6, calib_seq_len=48,
                             error_windows=8, progress=False)
        res[method] = r = quantize_model(m, tok, ids, cfg)
        e = r.output_error
        assert set(e["calibration"]) == set(e["held_out"]) == set(ref)
        assert e["held_out_windows"] == e["calibration_windows"] == 6
    import llm_output_error as OE

    cal = OE.D.calibration_windows(tok, ids, 6, 48, 0)
    held = OE.held_out_windows(tok, ids, cal, 0)
    grams = {tuple(w[i:i + 16].tolist()) for w in cal for i in range(48 - 15)}
    assert held.shape == (6, 48)
    assert not any(tuple(w[i:i + 16].tolist()) in grams for w in held for i in range(33))
    # By hand, on the last (GPTQ) model: every linear's inputs over the held-out windows.
    X, hooks = {}, []
    for n, mod in LM.decoder_linears(m).items():
        hooks.append(mod.register_forward_hook(
            lambda mod, a, o, n=n: X.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]).detach())))
    with torch.no_grad():
        for w in held:
            m(w[None])
    for h in hooks:
        h.remove()
    for n, W in ref.items():
        x = torch.cat(X[n]).double()
        Q = LM.weight_view(m.get_submodule(n)).detach().double()
        want = float(((W.double() - Q) @ x.T).norm() / (W.double() @ x.T).norm())
        assert res["gptq"].output_error["held_out"][n] == pytest.approx(want, rel=1e-4), n
    g, r = (sum(res[k].output_error["calibration"].values()) for k in ("gptq", "rtn"))
    assert 0 < g < r
    # At most --quant-error-windows of each (a forward pass per window: RTN needs no calibration otherwise)
    import dataclasses

    e = quantize_model(make_llama(seed=3, hidden=64), tok, ids, dataclasses.replace(cfg, error_windows=4)).output_error
    assert e["calibration_windows"] == e["held_out_windows"] == 4
    assert e["held_out"] != res["gptq"].output_error["held_out"]  # same quantization, 4 of the 6 windows
    off = quantize_model(make_llama(seed=3, hidden=64), tok, ids, dataclasses.replace(cfg, error_windows=0))
    assert off.output_error == {} and off.rel_error == res["gptq"].rel_error  # off: the same quantization
