"""Both adversarial-training defences side by side: held-out PGD delta NLL before and after.

    flock /tmp/model.lock python bench/bench_defence.py [--budget cpu|gpu] [--chars 200000] [--model M]

Runs the adversarial step's defence alone (``_defence``: PGD before, the fine-tune, PGD after,
the weights restored) for ``--defence free`` (Free-AT, one forward+backward per step) and
``--defence pgd`` (PGD-AT, attack steps + 1 backward passes per step) on the same samples and
training windows, with the budget's attack and defence settings, and prints held-out and
trained-on delta NLL, clean NLL, the training passes counted at the decoder, and seconds.
The evaluation text is the first ``--chars`` characters of WikiText-2 test (the local copy
beside the repository, else the embedded corpus).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import llm_adversarial_test as ADV  # noqa: E402
import llm_common as C  # noqa: E402
import llm_data as D  # noqa: E402
import llm_model as LM  # noqa: E402
from llm_config import AdversarialConfig  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--chars", type=int, default=200_000)
    p.add_argument("--model", default=None, help="as --model of the pipeline (default: the embedded SmolLM2)")
    p.add_argument("--cache-dir", default=None)
    a = p.parse_args(argv)
    C.setup_logging("WARNING")
    model, tok, label = LM.load_model(LM.LoadConfig(model=a.model, cache_dir=a.cache_dir))
    text = WIKI.read_text()[:a.chars] if WIKI.is_file() else D.embedded_corpus("test")[:a.chars]
    ids = D.tokenize_corpus(tok, text)
    rows = {}
    for defence in ("free", "pgd"):
        cfg = AdversarialConfig(defence=defence, progress=False).resolved(a.budget == "gpu")
        cfg = cfg.for_model(model)
        C.seed_everything(cfg.seed)
        samples = ADV.build_samples(model, tok, ids, cfg)
        t = time.perf_counter()
        rows[defence] = ADV._defence(model, samples, ADV._windows(ids, cfg.n_windows, cfg, offset=0.5), cfg)
        rows[defence]["seconds"] = time.perf_counter() - t
    r = rows["free"]
    print(f"{label}, {a.budget} budget: {r['steps']} steps, lr {r['lr']}, {r['attack']}, {r['trained_on']}")
    print(f"{'defence':8s} {'held-out dNLL':>22s} {'clean NLL':>18s} {'trained-on dNLL':>18s} "
          f"{'fwd':>5s} {'bwd':>5s} {'s':>7s}")
    for name, r in rows.items():
        tw, ps = r["train_windows"], r["passes"]["training"]
        print(f"{name:8s} {r['delta_nll_before']:10.4f} -> {r['delta_nll_after']:7.4f} "
              f"{r['clean_nll_before']:7.4f} -> {r['clean_nll_after']:7.4f} "
              f"{tw['delta_nll_before']:7.4f} -> {tw['delta_nll_after']:7.4f} {ps['forward']:5d} {ps['backward']:5d} "
              f"{r['seconds']:7.1f}")
    print(json.dumps({k: {x: v[x] for x in ("delta_nll_before", "delta_nll_after", "passes")} for k, v in rows.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
