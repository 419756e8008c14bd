#!/usr/bin/env bash
# GPU acceptance check (one H100-class GPU, < 8 minutes): the whole pipeline on the embedded
# model in bf16 on CUDA, the perplexity parity check against a plain HF loop, and tokens/s and
# peak GPU memory per step (from results.json's manifest).
#   bash bench/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/gpu_check}
PY=${PY:-python}
WIKI=../shared/data/wikitext-2-raw/wiki.test.raw
DATA=$([ -f "$WIKI" ] && echo "$WIKI" || echo embedded)
VALID=../shared/data/wikitext-2-tokenized/valid.txt
TRAIN=$([ -f "$VALID" ] && echo "$VALID" || echo embedded)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.version.cuda)"
time "$PY" llm_main_v4.py --device cuda --dtype bfloat16 --dataset "$DATA" --train-dataset "$TRAIN" \
    --eval-tokens 65536 --ft-steps 100 --calib-samples 32 --output-dir "$OUT" --log-level WARNING
"$PY" bench/parity_eval.py "$OUT/results.json" --dataset "$DATA" --variant fine-tuned --model-dir "$OUT/finetuned" || true
"$PY" - "$OUT/results.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
for step, s in r["manifest"]["steps"].items():
    print(f"{step:12s} {s['wall_s']:8.1f} s  peak GPU memory {s['peak_memory_mb']:9.0f} MiB")
for name, ev in r["evaluation"].items():
    print(f"{name:12s} perplexity {ev['perplexity']:.4f}  {ev['tokens_per_s']:.0f} tokens/s")
PYEOF
