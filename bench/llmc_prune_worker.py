"""llm-compressor's one-shot pruning of a model on given calibration windows, for bench/bench_prune.py.

    /work/venv-llmc/bin/python bench/llmc_prune_worker.py MODEL_DIR WINDOWS.safetensors OUT.safetensors \
        --method wanda|sparsegpt [--sparsity 0.5] [--block-size 128] [--dampening 0.01]

Runs in llm-compressor's own venv (it pins a transformers the project does not use), so it imports
only torch, transformers, datasets, safetensors and llmcompressor, nothing of the project.
WINDOWS.safetensors holds one int64 tensor "input_ids" [n, seq_len]: the bench's calibration windows,
given as they are (no shuffling, no re-tokenization). Prunes every Linear of the decoder blocks to
the target sparsity, unstructured ("0:0"), lm_head excluded, with the "sequential" pipeline (block
by block, each block's pruned outputs feeding the next: propagate_error, its default). Saves the
pruned decoder-linear weights to OUT.safetensors under their model.named_parameters() names and
prints one JSON line last: {"seconds": wall time of the oneshot call alone, ...}.
"""
import argparse
import json
import os
import time

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("windows")
    p.add_argument("out")
    p.add_argument("--method", choices=("wanda", "sparsegpt"), required=True)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--dampening", type=float, default=0.01)
    a = p.parse_args()
    # llm-compressor logs each linear (INFO, and its METRIC level 38) to stdout, whose last line
    # the bench parses: errors only.
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    ids = load_file(a.windows)["input_ids"].to(torch.int64)
    n, seq_len = ids.shape
    # Already tokenized: oneshot uses a dataset with an input_ids column as it is.
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    # lm_head is a Linear, and SmolLM2 ties it to the embeddings: it must not be pruned (the tool
    # prunes only the decoder blocks' linears).
    common = dict(sparsity=a.sparsity, mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"])
    if a.method == "wanda":
        recipe = WandaPruningModifier(**common)
    else:
        recipe = SparseGPTModifier(**common, block_size=a.block_size, dampening_frac=a.dampening)
    t0 = time.perf_counter()
    oneshot(model=model, recipe=recipe, dataset=ds, num_calibration_samples=n, max_seq_length=seq_len,
            shuffle_calibration_samples=False, batch_size=1, pipeline="sequential")
    seconds = time.perf_counter() - t0
    weights = {name + ".weight": mod.weight.detach().contiguous().clone()
               for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and ".layers." in name and not name.endswith("lm_head")}
    save_file(weights, a.out)
    print(json.dumps({"seconds": seconds, "method": a.method, "windows": n, "seq_len": seq_len,
                      "pipeline": "sequential", "linears": len(weights), "threads": torch.get_num_threads(),
                      "pid": os.getpid()}))


if __name__ == "__main__":
    main()
