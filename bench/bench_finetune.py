"""Full fine-tune step time against Hugging Face's Trainer on the very same batches.

    python bench/bench_finetune.py [--model ...] [--steps 8] [--batch-size 4] [--seq-len 128] [--rounds 2]

Both train the same model from the same weights with AdamW (fused where the device has it:
ours and Trainer's default ``adamw_torch_fused``), linear warm-up, gradient clipping at 1.0,
on the windows our loop draws (``llm_finetune._batch``), which Trainer reads in order.
Interleaved: ours, Trainer, ours, Trainer...; each run's step times after two warm-up steps,
median over all. Prints both, the ratio Trainer/ours of the medians, and the median of the
rounds' paired ratios, which load drift between rounds does not move (target >= 1.0: we are
not slower).
Our loop also measures the held-out loss and saves nothing here; neither is timed.
"""
import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import llm_common as C  # noqa: E402
import llm_data as D  # noqa: E402
import llm_finetune as FT  # noqa: E402
import llm_model as LM  # noqa: E402
from llm_config import FinetuneConfig  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def ours(model, ids, cfg) -> list[float]:
    times = []
    FT.train(model, ids, cfg, on_step=lambda s: times.append(time.perf_counter()))
    return [b - a for a, b in zip(times[2:], times[3:])]


def trainer(model, ids, cfg) -> tuple[list[float], str]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    batches = [FT._batch(ids, s, cfg) for s in range(cfg.steps)]
    rows = [{"input_ids": w, "labels": w} for b in batches for w in b]  # step s reads rows s*B .. s*B+B-1
    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    class InOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=cfg.batch_size, max_steps=cfg.steps,
                                 learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps, lr_scheduler_type="cosine",
                                 weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip, save_strategy="no",
                                 logging_steps=10_000, report_to="none", dataloader_num_workers=0,
                                 use_cpu=LM.input_device(model).type == "cpu", disable_tqdm=True, seed=cfg.seed)
        t = InOrder(model=model, args=args, train_dataset=rows, callbacks=[Clock()])
        t.train()
        optim = str(args.optim)
    return [b - a for a, b in zip(times[2:], times[3:])], optim


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    C.setup_logging("WARNING")
    base, tok, label = LM.load_model(LM.LoadConfig(model=a.model, device=a.device))
    text = WIKI.read_text() if WIKI.is_file() else D.embedded_corpus("train")
    ids = D.tokenize_corpus(tok, text)
    cfg = FinetuneConfig(mode="full", steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=5e-5,
                         save_every_s=0, log_every=10_000, output_dir=tempfile.mkdtemp() + "/ft")
    cfg = FT.resolve_config(base, cfg)
    mine, theirs, paired, optim = [], [], [], ""
    for r in range(a.rounds):
        m = ours(copy.deepcopy(base).train(), ids, cfg)
        t, optim = trainer(copy.deepcopy(base).train(), ids, cfg)
        mine, theirs = mine + m, theirs + t
        # a round's two runs sit side by side in time, so their ratio is the least touched by load drift
        paired.append(statistics.median(t) / statistics.median(m))
        print(f"round {r + 1}: ours {statistics.median(m):.3f} s/step, Trainer {statistics.median(t):.3f} s/step, "
              f"Trainer/ours {paired[-1]:.3f}", flush=True)
    o, t = statistics.median(mine), statistics.median(theirs)
    print(f"model {label} on {LM.input_device(base)}, full fine-tune, {a.batch_size} x {a.seq_len} tokens per step, "
          f"{a.steps} steps x {a.rounds} rounds (first two steps of each run not timed); Trainer optim {optim}")
    print(f"ours {o:.3f} s/step   Trainer {t:.3f} s/step   ratio of medians Trainer/ours {t / o:.3f}; "
          f"median of the {a.rounds} paired round ratios {statistics.median(paired):.3f}, "
          f"{sum(x >= 1.0 for x in paired)} of {a.rounds} rounds >= 1.0 (target >= 1.0)")


if __name__ == "__main__":
    main()
