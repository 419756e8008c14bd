"""Corpora at any size: C4 and local JSON-lines shards are sampled document by document as the
papers' get_c4, reading only the documents drawn; protocols by name (C4's 256 windows, PTB's
get_ptb_new); a notebook call draws the pipeline's windows."""
import gzip
import json
import random

import pytest
import torch

import llm_common as C
import llm_config as K
import llm_data as D
import llm_main_v4
import llm_model as LM
import llm_variants as V


def get_c4_windows(tok, docs, n, seq_len, seed):
    """The papers' loop, as SparseGPT's datautils.py / Wanda's data.py write it (global random)."""
    random.seed(seed)
    out = []
    for _ in range(n):
        while True:
            i = random.randint(0, len(docs) - 1)
            enc = tok(docs[i], return_tensors="pt").input_ids
            if enc.shape[1] > seq_len:
                break
        i = random.randint(0, enc.shape[1] - seq_len - 1)
        out.append(enc[:, i:i + seq_len])
    return torch.cat(out)


def write_shard(path, docs):
    """A C4-shaped JSON-lines file: text, timestamp and url per row."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{i}"}) + "\n")
    return path


def stand_in_docs(n, seed=0):
    rng = random.Random(seed)
    words = "the of a model weight sparsity layer token window corpus calibration".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) for _ in range(n)]


class CountingTokenizer:
    """Wraps a tokenizer and counts the characters it is asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.chars, self.calls = tok, 0, 0

    def __call__(self, text, *a, **k):
        self.chars += len(text) if isinstance(text, str) else sum(map(len, text))
        self.calls += 1
        return self.tok(text, *a, **k)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_c4_calibration_draws_windows_document_by_document_like_get_c4(byte_tokenizer, monkeypatch):
    """C4's calibration windows are those of get_c4 (transcribed above); other corpora keep
    uniform windows over the joined text (get_wikitext2)."""
    import datasets

    tok = byte_tokenizer()
    docs = [("short doc " * k)[: 7 * k] for k in range(1, 40)]  # many shorter than a window
    monkeypatch.setattr(C, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: type("Fake", (dict,), {})({"text": docs}))
    corpus = D.load_corpus("c4", "train")
    assert corpus.documents == len(docs) and corpus.describe()["documents"] == len(docs)
    assert torch.equal(D.calibration_windows(tok, corpus, 6, 64, seed=0), get_c4_windows(tok, docs, 6, 64, 0))
    plain = D.Corpus("x", "train", " ".join(docs), "x")
    ids = D.tokenize_corpus(tok, plain)
    assert torch.equal(D.calibration_windows(tok, plain, 6, 64, seed=0), D.sample_windows(ids, 6, 64, seed=0))
    assert torch.equal(D.calibration_windows(tok, ids, 6, 64, seed=0), D.sample_windows(ids, 6, 64, seed=0))
    with pytest.raises(C.UserError, match="no document"):
        D.calibration_windows(tok, corpus, 1, 10_000, seed=0)


def test_local_json_gz_shard_is_sampled_like_get_c4_and_recorded(byte_tokenizer, tmp_path):
    """Offline clusters keep a C4 shard on disk: a local .json.gz whose rows carry `text` is a
    document corpus, its JSON syntax never enters the text, its windows are get_c4's, and its
    file hash is recorded; as evaluation text it is C4's validation protocol."""
    tok = byte_tokenizer()
    docs = stand_in_docs(400)
    shard = write_shard(tmp_path / "c4-train.00000-of-01024.json.gz", docs)
    corpus = D.load_corpus(str(shard), "train")
    assert corpus.docs is not None and corpus.documents == 400 and list(corpus.docs[:3]) == docs[:3]
    assert torch.equal(D.calibration_windows(tok, corpus, 8, 96, seed=0), get_c4_windows(tok, docs, 8, 96, 0))
    win = D.calibration_windows(tok, corpus, 8, 96, seed=0)
    assert not any(b'"url"' in tok.decode(w).encode() or "timestamp" in tok.decode(w) for w in win)
    d = corpus.describe()
    assert d["sha256"] == D._file_digest([str(shard)]) and d["documents"] == 400 and "get_c4" in d["protocol"]
    write_shard(shard, docs[:-1] + ["changed"])  # another file, another hash: the step reruns
    assert D.load_corpus(str(shard), "train").sha256 != d["sha256"]
    ev = D.load_corpus(str(write_shard(tmp_path / "val.jsonl", docs)), "test")
    assert ev.text == " ".join(docs) and ev.eval_windows == 256 and ev.docs is None
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "a.json.gz", docs[:200])
    write_shard(folder / "b.json.gz", docs[200:])
    assert list(D.load_corpus(str(folder), "train").docs) == docs
    (tmp_path / "bad.jsonl").write_text('{"content": "no text field"}\n')
    with pytest.raises(C.UserError, match="no 'text' field"):
        D.load_corpus(str(tmp_path / "bad.jsonl"), "train")


def test_prune_step_never_tokenizes_a_document_corpus_in_full(byte_tokenizer, tiny_llama, tmp_path):
    """Only drawn documents are tokenized: on a 3,000-document stand-in, drawing 4 windows reads
    a few documents, not the corpus; the fine-tune reads a prefix sized by its steps."""
    import llm_finetune as FT
    import llm_prune_model as P

    docs = stand_in_docs(3000)
    corpus = D.load_corpus(str(write_shard(tmp_path / "c4.json.gz", docs)), "train")
    total = sum(map(len, docs))
    counting = CountingTokenizer(byte_tokenizer())
    P.prune_model(tiny_llama(), counting, corpus, K.PruneConfig(method="wanda", calib_samples=4, calib_seq_len=64,
                                                                progress=False))
    assert 4 <= counting.calls <= 40 and counting.chars < total / 50
    counting.calls = counting.chars = 0
    cfg = K.FinetuneConfig(steps=2, batch_size=2, seq_len=32, output_dir=str(tmp_path / "ft"), mode="full")
    _, res = FT.load_or_train_model(tiny_llama(), counting, corpus, cfg)
    need = FT.train_tokens_needed(FT.resolve_config(tiny_llama(), cfg))
    assert res.train_tokens == need and counting.chars < total / 5


def test_a_notebook_prune_call_gets_the_pipelines_windows_on_a_c4_stand_in(tiny_run_dir, pipeline_config, tmp_path):
    """prune_model(model, tok, corpus, the recorded config) prunes exactly as the pipeline did,
    with windows drawn document by document from a local C4-shaped shard."""
    import llm_prune_model as P

    shard = write_shard(tmp_path / "c4-train.json.gz", stand_in_docs(500))
    out = tmp_path / "out"
    cfg = pipeline_config(tiny_run_dir / "model", tiny_run_dir / "text.txt", out, steps=("prune",),
                          run={"train_dataset": str(shard)}, prune={"protect": (), "method": "wanda"})
    res = llm_main_v4.run_pipeline(cfg, argv=[])
    assert res["prune"]["calibration"]["per_document"] is True
    assert res["dataset"]["train"]["documents"] == 500 and res["dataset"]["train"]["chars"] is None
    model, tok, _ = LM.load_model(LM.LoadConfig(model=str(tiny_run_dir / "model")))
    P.prune_model(model, tok, D.load_corpus(str(shard), "train"), K.PruneConfig.from_dict(res["prune"]["config"]))
    masks = V.load_masks(out / res["prune"]["checkpoint"])
    for name, m in masks.items():
        assert torch.equal(V.named_tensors(model)[name] == 0, m), name  # True: pruned
    model2, tok2, _ = LM.load_model(LM.LoadConfig(model=str(tiny_run_dir / "model")))
    P.prune_model(model2, tok2, D.tokenize_corpus(tok2, " ".join(stand_in_docs(500))),
                  K.PruneConfig.from_dict(res["prune"]["config"]))
    assert any(not torch.equal(V.named_tensors(model2)[n] == 0, m) for n, m in masks.items())  # joined text differs


def test_c4_evaluation_scores_the_first_256_windows_unless_eval_tokens_is_given(tmp_path, monkeypatch):
    """--dataset c4 (and a local JSON shard as evaluation text) scores 256 x --seq-len tokens,
    as the papers cut valenc; --eval-tokens overrides it."""
    shard = write_shard(tmp_path / "val.json.gz", stand_in_docs(50))
    out = tmp_path / "o"
    for eval_tokens, want in ((None, 256 * 128), (1000, 1000)):
        cfg = K.PipelineConfig(run=K.RunConfig(steps=("eval",), dataset=str(shard), output_dir=str(out)),
                               eval=K.EvalConfig(seq_len=128, eval_tokens=eval_tokens))
        configs, texts, _ = llm_main_v4._check_before_loading(cfg, out)
        assert configs["eval"].eval_tokens == want


def test_data_dir_binds_named_corpora_to_local_files(tmp_path, monkeypatch):
    """Issue 32: --data-dir (or LLM_DATA_DIR) holds the publishers' files; wikitext2 is read one row
    per line and joined as get_wikitext2 joins the hub's rows, c4 is a document corpus, and what
    is missing is one error that says where to put it."""
    monkeypatch.setattr(C, "hub_reachable", lambda: False)
    monkeypatch.delenv("LLM_DATA_DIR", raising=False)
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(" = A = \n Alpha beta .\n")
    (tmp_path / "wikitext-2-raw" / "wiki.train.raw").write_text(" one\n two\n")
    test = D.load_corpus("wikitext2", "test", fallback=False, local=str(tmp_path))
    assert test.text == " = A = \n\n\n Alpha beta .\n" and str(tmp_path) in test.source and test.fallback is None
    assert D.load_corpus("wikitext2", "train", local=str(tmp_path)).text == " one\n  two\n"
    (tmp_path / "c4").mkdir()
    write_shard(tmp_path / "c4" / "c4-train.00000-of-01024.json.gz", stand_in_docs(10))
    monkeypatch.setenv("LLM_DATA_DIR", str(tmp_path))
    c4 = D.load_corpus("c4", "train", fallback=False)
    assert c4.name == "c4" and list(c4.docs) == stand_in_docs(10)
    with pytest.raises(C.UserError, match=r"not in .*c4-validation.00000-of-00008.json.gz either; put .* --data-dir"):
        D.load_corpus("c4", "test", fallback=False)
    monkeypatch.setenv("LLM_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(C.UserError, match="no such folder"):
        K.RunConfig().validate()
