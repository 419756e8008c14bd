"""Calibration cost against corpus size: drawing windows from a C4-shaped shard must cost the
same for 200,000 documents as for 2,000 (only drawn documents are read and tokenized).

    python bench/bench_corpus.py [--docs 200000] [--small 2000] [--windows 128] [--seq-len 2048]
                                 [--tokenizer DIR]

Writes two synthetic C4-shaped JSON-lines shards (text, timestamp, url; document lengths
log-normal around C4's ~2,000 characters), lets ``datasets`` convert each to its memory-mapped
table once (timed, reported apart: a one-time cost per file, paid by the library), then in a
fresh process per shard times ``load_corpus`` + ``calibration_windows`` and the memory they add:
anonymous memory (RssAnon after minus before: what the machine must really hold) and, apart,
the extra peak RSS, which also counts the pages of the memory-mapped table that the random
document reads fault in (RssFile: page cache the kernel reclaims under pressure, and which
grows with how spread out the drawn documents are, not with what is held). Prints both and
their ratios; target <= 2 in time and anonymous memory.
The tokenizer is byte-level unless --tokenizer names a Hugging Face tokenizer folder.
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import llm_data as D
if {tokenizer!r}:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained({tokenizer!r})
else:
    from conftest import make_tokenizer
    tok = make_tokenizer()
tok("warm up")
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) / 1024
anon0, file0 = status("RssAnon"), status("RssFile")
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
corpus = D.load_corpus({path!r}, "train")
t_load = time.perf_counter() - t
w = D.calibration_windows(tok, corpus, {n}, {seq_len}, seed=0)
secs = time.perf_counter() - t
print(json.dumps({{"seconds": secs, "load_s": t_load, "extra_rss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
                  "extra_anon_mb": status("RssAnon") - anon0, "extra_file_mb": status("RssFile") - file0,
                  "shape": list(w.shape), "documents": corpus.documents}}))
"""


def write_shard(path: Path, n_docs: int, seed: int) -> float:
    """A C4-shaped .json.gz of n_docs documents; returns the uncompressed megabytes."""
    rng = np.random.default_rng(seed)
    words = np.array("the of and to in a is that for it as was with be by on not he this are or his from at "
                     "which but have an they you were her she there one all we can their has been if more when "
                     "will would who so no model sparsity weight layer calibration window".split())
    lengths = np.clip(rng.lognormal(np.log(1500), 0.8, n_docs), 50, 60_000).astype(int)  # characters
    total = 0
    with gzip.open(path, "wt", compresslevel=1) as f:
        for i, chars in enumerate(lengths):
            text = " ".join(words[rng.integers(0, len(words), chars // 5 + 1)])[:chars]
            line = json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{i}"})
            total += len(line) + 1
            f.write(line + "\n")
    return total / 2**20


def child(path: Path, a, env) -> dict:
    code = CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"), tokenizer=a.tokenizer or "", path=str(path),
                        n=a.windows, seq_len=a.seq_len)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=200_000)
    p.add_argument("--small", type=int, default=2_000)
    p.add_argument("--windows", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--tokenizer", default=None)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HF_DATASETS_CACHE": f"{tmp}/cache", "HF_DATASETS_OFFLINE": "1"}
        rows = {}
        for label, n in (("small", a.small), ("large", a.docs)):
            path = Path(tmp) / f"c4-{n}.json.gz"
            t = time.perf_counter()
            mb = write_shard(path, n, seed=n)
            t_write = time.perf_counter() - t
            first = child(path, a, env)  # converts the JSON to datasets' table (once per file), then draws
            again = child(path, a, env)  # what every later run pays
            rows[label] = (n, mb, t_write, first, again)
            print(f"{label}: {n} documents, {mb:.0f} MB of JSON (written in {t_write:.1f} s); first run "
                  f"{first['seconds']:.1f} s (of which load and one-time table conversion {first['load_s']:.1f} s); "
                  f"later runs {again['seconds']:.2f} s, extra anonymous memory {again['extra_anon_mb']:.0f} MB, extra peak RSS "
                  f"{again['extra_rss_mb']:.0f} MB (of which mapped table pages {again['extra_file_mb']:.0f} MB), "
                  f"windows {again['shape']}", flush=True)
        s, l_ = rows["small"][4], rows["large"][4]
        print(f"\n{a.windows} x {a.seq_len} calibration windows, {a.docs} vs {a.small} documents "
              f"({a.docs // a.small}x the corpus):")
        print(f"  time ratio   {l_['seconds'] / s['seconds']:.2f}  (target <= 2)")
        print(f"  memory ratio {max(l_['extra_anon_mb'], 1) / max(s['extra_anon_mb'], 1):.2f}  (target <= 2; extra "
              f"anonymous memory {l_['extra_anon_mb']:.0f} MB vs {s['extra_anon_mb']:.0f} MB)")
        print(f"  peak RSS ratio {max(l_['extra_rss_mb'], 1) / max(s['extra_rss_mb'], 1):.2f}  (extra peak RSS "
              f"{l_['extra_rss_mb']:.0f} MB vs {s['extra_rss_mb']:.0f} MB, counting page cache of the mapped table: "
              f"{l_['extra_file_mb']:.0f} MB vs {s['extra_file_mb']:.0f} MB)")
        print(f"  one-time table conversion by datasets: {rows['large'][3]['load_s']:.1f} s vs "
              f"{rows['small'][3]['load_s']:.1f} s (grows with the file, paid once per file)")


if __name__ == "__main__":
    main()
