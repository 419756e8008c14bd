"""Corpora as the pruning papers load them (WikiText-2, C4, PTB through ``HUB_CORPORA``; local
text and JSON-lines files; the embedded pydoc corpus), the overlap check between calibration and
evaluation text, tokenization, and calibration windows (their ``get_wikitext2``/``get_c4``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

import llm_common as C
from llm_common import UserError, error_line, log


@dataclass
class Corpus:
    """A text corpus. ``name`` is what was asked for, ``source`` what was actually read.

    A *document corpus* (C4, a local JSON-lines shard) holds ``docs``, a sequence of document
    strings indexed without reading the rest (a memory-mapped ``datasets`` column), and no
    joined ``text``: calibration draws windows from the documents it picks, as the papers'
    ``get_c4`` does, so its cost grows with the windows drawn, not with the shard's size.
    ``digest`` is then the hash of the files read. Any other corpus is one joined ``text``.
    """

    name: str
    split: str
    text: str
    source: str
    fallback: Optional[str] = None  # why we fell back to the embedded corpus, if we did
    replaced: Optional[str] = None  # which default corpus was unavailable, and why, if one was
    docs: Optional[Sequence[str]] = None  # the documents of a document corpus (text is then "")
    digest: Optional[str] = None  # hash of the files read, where ``text`` is not held
    protocol: Optional[str] = None  # the published loader this corpus follows, in words
    eval_windows: Optional[int] = None  # windows the papers score of it (C4: the first 256)
    _tokens: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def documents(self) -> Optional[int]:
        return len(self.docs) if self.docs is not None else None

    def describe(self) -> dict:
        return {"name": self.name, "split": self.split, "source": self.source,
                "chars": None if self.docs is not None else len(self.text), "fallback": self.fallback,
                "replaced": self.replaced, "sha256": self.sha256, "documents": self.documents,
                "protocol": self.protocol}

    @functools.cached_property
    def sha256(self) -> str:
        """Hash of what was actually read (the text, or a document corpus's files): what the
        resume fingerprint keys on, not the flag."""
        return self.digest or hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()


def embedded_corpus(split: str) -> str:
    """The standard library's pydoc topics (about 465k characters), split by topic.

    Topics are sorted by name; every fifth one goes to ``test``, the others to
    ``train``. Some topics repeat whole paragraphs of others, so paragraphs that
    occur in the test part are removed from the train part: the two share no text.
    """
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    keys = sorted(topics)
    test = [p for i, k in enumerate(keys) if i % 5 == 0 for p in topics[k].strip().split("\n\n")]
    if split == "test":
        return "\n\n".join(test)
    seen = set(test)
    train = [p for i, k in enumerate(keys) if i % 5 != 0 for p in topics[k].strip().split("\n\n")]
    return "\n\n".join(p for p in train if p not in seen)


def _text_files(path: Path) -> list[str]:
    if path.is_file():
        return [str(path)]
    files = sorted(str(p) for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"corpus folder {path} holds no files")
    return files


OVERLAP_DOCUMENTS = 20_000  # documents of a document corpus that the overlap check reads


def corpus_overlap(train: Corpus, evaluation: Corpus, allow: bool = False, min_chars: int = 200) -> dict:
    """How much of the evaluation text the calibration / fine-tuning text also holds: the
    evaluation paragraphs (blank-line separated paragraphs and single lines, at least
    ``min_chars`` long, so headings and boilerplate do not count) that occur verbatim among
    the training ones (of a document corpus, among its first ``OVERLAP_DOCUMENTS`` documents,
    recorded as ``train_documents_checked``). Above 1%, or
    for the very same text, raises UserError unless ``allow``."""
    def paragraphs(text: str) -> list[str]:
        # Blank-line chunks (blank lines may hold spaces, as WikiText's " \n \n"); a chunk with
        # long lines is one paragraph per line (the shared WikiText copies), else wrapped text.
        units = []
        for chunk in re.split(r"\n\s*\n", text):
            lines = [ln.strip() for ln in chunk.splitlines()]
            units += lines if any(len(ln) >= min_chars for ln in lines) else [" ".join(lines)]
        return list(dict.fromkeys(u for u in units if len(u) >= min_chars))

    train_text, checked = train.text, None
    if train.docs is not None:  # a whole shard would cost minutes: its first documents, stated
        checked = min(len(train.docs), OVERLAP_DOCUMENTS)
        train_text = "\n\n".join(train.docs[:checked])
    seen = set(paragraphs(train_text))
    ev = paragraphs(evaluation.text)
    shared = sum(p in seen for p in ev)
    out = {"eval_paragraphs": len(ev), "shared": shared, "fraction": shared / len(ev) if ev else 0.0,
           "same_text": train.sha256 == evaluation.sha256, "min_chars": min_chars, "allowed": allow,
           "train_documents_checked": checked}
    if (out["same_text"] or out["fraction"] > 0.01) and not allow:
        raise UserError(f"the calibration/fine-tuning text holds {shared} of the {len(ev)} evaluation paragraphs"
                        f"{' (it is the same text)' if out['same_text'] else ''}: give disjoint texts, or "
                        "--allow-overlap to run anyway")
    return out


def check_corpus_spec(spec: str) -> None:
    """Fail early, in one line, on a corpus that is neither a known name nor an existing path."""
    if spec not in (*HUB_CORPORA, "embedded") and not Path(spec).expanduser().exists():
        raise UserError(f"corpus not found: {spec!r} is neither one of {', '.join(HUB_CORPORA)}, 'embedded' "
                        "nor an existing path")


# The hub corpora, as the pruning papers' code loads them (SparseGPT's datautils, Wanda's data.py),
# one row each: (dataset, config, data files per split, hub split per split, text column,
# joiner per split, documents kept per split, protocol in words). A corpus whose calibration
# split has no joiner is a document corpus: windows are drawn document by document (their get_c4).
HUB_CORPORA = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", None, {}, "text", {"train": " ", "test": "\n\n"}, {},
                  "get_wikitext2 (GPTQ, SparseGPT, Wanda): test rows joined by blank lines, train rows by spaces"),
    "c4": ("allenai/c4", None, {"train": "en/c4-train.00000-of-01024.json.gz",
                                "test": "en/c4-validation.00000-of-00008.json.gz"}, {}, "text",
           {"test": " "}, {"test": 1100},
           "get_c4 (SparseGPT, Wanda): calibration windows drawn document by document from one train shard; "
           "evaluation on the first 1,100 validation documents joined by spaces, first 256 windows scored"),
    "ptb": ("ptb_text_only", "penn_treebank", None, {}, "sentence", {"train": " ", "test": " "}, {},
            "get_ptb_new (SparseGPT's datautils, the LLaMA tables): test split, sentences joined by spaces"),
}


C4_EVAL_WINDOWS = 256  # the papers score valenc[:, :256 * seqlen] of C4's validation text


@contextlib.contextmanager
def datasets_offline(offline: bool) -> Iterator[Any]:
    """With ``offline``, ``datasets`` reads only its local cache for the body (no retries against
    an unreachable hub, which cost half a minute per dataset); restored in ``finally``. Yields
    the ``datasets`` module, imported here because it is slow to import (a second or more)."""
    import datasets

    saved = datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield datasets
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def _hub_text(name: str, split: str, offline: bool) -> "Corpus":
    """A corpus of ``HUB_CORPORA`` through ``datasets``, its exact source recorded (files, hub
    split, version and the hub commit read); ``offline`` reads only the local cache. A split
    without a joiner is kept as a document corpus over the memory-mapped table."""
    repo, config, files, splits, column, joiners, keep, protocol = HUB_CORPORA[name]
    hub_split = splits.get(split, split)
    with datasets_offline(offline) as datasets:
        if files:  # one shard, as the papers use: the split is the shard's single "train" split
            ds = datasets.load_dataset(repo, data_files={split: files[split]}, split=split)
        else:
            ds = datasets.load_dataset(repo, config, split=hub_split)
    n = keep.get(split)
    where = f"{repo}/{files[split]}" if files else f"{repo}:{config or ''}[{hub_split}]"
    version = getattr(getattr(ds, "info", None), "version", None)
    # datasets caches a hub dataset under .../<version>/<the repo's commit>/: the revision read.
    cached = getattr(ds, "cache_files", None) or []
    commit = Path(cached[0]["filename"]).parent.name if cached else None
    tags = [f"version {version}"] * bool(version) + [f"hub commit {commit}"] * bool(commit)
    where += (f"[:{n} documents]" if n else "") + (f" ({', '.join(tags)})" if tags else "")
    eval_windows = C4_EVAL_WINDOWS if (name, split) == ("c4", "test") else None
    if split not in joiners:  # document corpus: the table stays on disk, rows read by index
        digest = hashlib.sha256(f"{where}\n{getattr(ds, '_fingerprint', '')}".encode()).hexdigest()
        return Corpus(name, split, "", where, docs=ds[column], digest=digest, protocol=protocol)
    rows = ds[column][:n] if n else ds[column]
    return Corpus(name, split, joiners[split].join(rows), where, protocol=protocol, eval_windows=eval_windows)


# Where ``--data-dir`` (or LLM_DATA_DIR) holds each named corpus, per split: the files' names as
# their publishers ship them (the WikiText zip, allenai/c4's shards, the PTB text files).
LOCAL_FILES = {"wikitext2": {"test": "wikitext-2-raw/wiki.test.raw", "train": "wikitext-2-raw/wiki.train.raw"},
               "c4": {"test": "c4/c4-validation.00000-of-00008.json.gz", "train": "c4/c4-train.00000-of-01024.json.gz"},
               "ptb": {"test": "ptb/ptb.test.txt", "train": "ptb/ptb.train.txt"}}


def data_dir(given: Optional[str] = None) -> Optional[Path]:
    """The folder that holds named corpora locally: ``given`` (--data-dir), else $LLM_DATA_DIR."""
    d = given or os.environ.get("LLM_DATA_DIR")
    return Path(d).expanduser() if d else None


def local_corpus(name: str, split: str, folder: Path) -> Optional[Corpus]:
    """A corpus of ``HUB_CORPORA`` from its publisher's files in ``folder`` (``LOCAL_FILES``; C4
    also as ``.json`` / ``.jsonl``), read the way the papers' loaders read the hub's rows: one row
    per line (one document per JSON row), joined by the split's joiner, C4 sampled document by
    document. None when the file is not there. A copy whose rows differ from the hub's (e.g.
    WikiText without its empty rows) gives slightly different numbers: its path is recorded."""
    rel = Path(LOCAL_FILES[name][split])
    stem = rel.name.split(".json")[0]
    found = [folder / rel] + [folder / rel.parent / (stem + ext) for ext in (".json", ".jsonl") if name == "c4"]
    path = next((p for p in found if p.is_file()), None)
    if path is None:
        return None
    if name == "c4":
        corpus = json_corpus(path, split, [str(path)])
        corpus.name = name
        return corpus
    *_, joiners, _, protocol = HUB_CORPORA[name]
    rows = checked_text(_read_utf8(path), path).splitlines(keepends=True)
    return Corpus(name, split, joiners[split].join(rows), f"{path} (local copy, one row per line)",
                  protocol=protocol)


def offline_hint(name: str, split: str, local: Optional[str] = None) -> str:
    """How to point a named corpus at local files, for the error of one that cannot be had."""
    folder = data_dir(local)
    where = f"not in {folder / LOCAL_FILES[name][split]} either; " if folder else ""
    return (f"{where}put {LOCAL_FILES[name][split]} under a folder and pass --data-dir FOLDER (or set "
            f"LLM_DATA_DIR), or pass the file itself as --dataset / --train-dataset")


def hub_corpus(name: str, split: str, local: Optional[str] = None) -> Corpus | str:
    """A corpus of ``HUB_CORPORA`` from the hub, or offline from the local ``datasets`` cache;
    where neither has it, the reason, in one line."""
    offline = not C.hub_reachable()
    try:
        return _hub_text(name, split, offline)
    except Exception as e:  # noqa: BLE001 - any hub or cache failure means "unavailable"
        return f"offline, and not in the local datasets cache; {offline_hint(name, split, local)}" if offline else \
            error_line(e, 160)


JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


def _file_digest(files: Sequence[str]) -> str:
    """sha256 over the files' names and bytes (read in 1 MiB blocks: a 300 MB shard in about a second)."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def json_corpus(path: Path, split: str, files: Sequence[str]) -> Corpus:
    """A local C4-style shard (``.json``, ``.jsonl`` or ``.json.gz`` rows with a ``text`` field,
    or a folder of them) as a document corpus, sampled exactly like ``c4``. ``datasets``
    converts it to a memory-mapped table once (cached); rows are then read by index."""
    try:
        with datasets_offline(True) as datasets:  # a local file: nothing to ask the hub
            datasets.disable_progress_bars()
            ds = datasets.load_dataset("json", data_files=list(files), split="train")
    except Exception as e:  # noqa: BLE001 - malformed JSON fails inside the builder
        raise UserError(f"corpus {path} is not JSON lines ({error_line(e, 120)})")
    if "text" not in ds.column_names:
        raise UserError(f"corpus {path}: its JSON rows have no 'text' field (fields: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise UserError(f"corpus {path} is empty")
    if split == "test":  # evaluation text as the papers' C4 validation: 1,100 documents joined by spaces
        n = min(len(ds), HUB_CORPORA["c4"][6]["test"])
        return Corpus(str(path), split, checked_text(" ".join(ds["text"][:n]), path), f"{path}[:{n} documents]",
                      protocol=f"local JSON-lines, evaluated as get_c4's validation text: the first {n} documents "
                               f"joined by spaces, first {C4_EVAL_WINDOWS} windows scored",
                      eval_windows=C4_EVAL_WINDOWS)
    return Corpus(str(path), split, "", str(path), docs=ds["text"], digest=_file_digest(files),
                  protocol="local JSON-lines documents, sampled like get_c4 (document by document)")


def load_corpus(name: str, split: str = "test", fallback: bool = True, local: Optional[str] = None) -> Corpus:
    """Load ``name`` for ``split`` ("train" or "test"): a name of ``HUB_CORPORA`` (wikitext2, c4,
    ptb, each as its ``protocol`` says), 'embedded', a text file or folder, or a local JSON-lines
    shard (``.json``, ``.jsonl``, ``.json.gz``, or a folder of them; see ``json_corpus``).

    Hub corpora come from the folder ``local`` (--data-dir, else $LLM_DATA_DIR; ``local_corpus``)
    when it holds their files, else from the hub or, offline (no route to the hub, or HF_*_OFFLINE
    set), from the local ``datasets`` cache. When none has it, the embedded corpus is used with
    a warning and ``Corpus.fallback`` records why; with ``fallback=False`` that is an error.
    """
    if split not in ("train", "test"):
        raise ValueError(split)
    if name == "embedded":
        return Corpus(name, split, embedded_corpus(split), f"pydoc_data.topics[{split}]")
    if name in HUB_CORPORA:
        folder = data_dir(local)
        got = (local_corpus(name, split, folder) if folder else None) or hub_corpus(name, split, local)
        if isinstance(got, Corpus):
            return got
        reason = got
        if not fallback:
            raise UserError(f"{name} unavailable ({reason}); it was named explicitly (or --no-fallback), so the "
                            "embedded corpus is not used in its place")
        log.warning("%s unavailable (%s); falling back to the embedded corpus", name, reason)
        return Corpus(name, split, embedded_corpus(split), f"pydoc_data.topics[{split}]", fallback=reason)
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"corpus not found: {name!r} is neither one of {', '.join(HUB_CORPORA)}, 'embedded' "
                        "nor an existing path")
    files = _text_files(path)
    if all(f.endswith(JSON_SUFFIXES) for f in files):
        return json_corpus(path, split, files)
    # sample_by="document" keeps each file whole, line breaks included, so that the
    # text matches the file byte for byte.
    try:
        with datasets_offline(True) as datasets:  # a local file: nothing to ask the hub
            datasets.disable_progress_bars()  # a one-file "split generation" bar is noise
            ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train")
    except Exception as e:  # noqa: BLE001 - binary or UTF-16 files fail inside the builder
        raise UserError(f"corpus {path} is not readable as UTF-8 text ({type(e).__name__})")
    return Corpus(name, split, checked_text("\n\n".join(ds["text"]), path), str(path))


def _read_utf8(path: Path) -> str:
    """A local corpus file as UTF-8 text; binary or UTF-16 is one UserError, before any model loads."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"corpus {path} is not UTF-8 text (binary, or UTF-16?)") from None
    except OSError as e:
        raise UserError(f"corpus {path} cannot be read: {e.strerror or error_line(e)}") from None


def checked_text(text: str, path) -> str:
    """``text`` read from ``path`` if it can be scored: not empty (or only blanks) and not binary
    (NUL bytes: binary, or UTF-16 read as UTF-8). Every local text passes here before loading."""
    if not text.strip():
        raise UserError(f"corpus {path} is empty")
    if "\x00" in text:
        raise UserError(f"corpus {path} holds NUL bytes: binary, or UTF-16 rather than UTF-8 text")
    return text


def _default_train_text(name: str, no_fallback: bool, local: Optional[str] = None) -> Corpus:
    """The default calibration text ``name`` (c4 on GPU), or where it cannot be had WikiText-2's
    train split, with the reason logged and recorded in ``Corpus.replaced``."""
    folder = data_dir(local)
    got = (local_corpus(name, "train", folder) if folder else None) or hub_corpus(name, "train", local)
    if isinstance(got, Corpus):
        return got
    log.warning("%s, the default calibration text, is unavailable (%s); using WikiText-2's train split instead",
                name, got)
    corpus = load_corpus("wikitext2", "train", fallback=not no_fallback, local=local)
    corpus.replaced = f"{name} unavailable ({got}); WikiText-2 train used instead"
    return corpus


def load_texts(dataset: Optional[str], train_dataset: Optional[str], which: set, no_fallback: bool = False,
               allow_overlap: bool = False, default_train: str = "wikitext2", local: Optional[str] = None
               ) -> tuple[dict, dict]:
    """The "eval" (``dataset``) and "train" (``train_dataset``) texts in ``which``, and their
    description for results.json, with the overlap check when both are read (see
    ``corpus_overlap``). None means wikitext2 with the embedded fallback; wikitext2 named
    explicitly, or ``no_fallback``, makes an unavailable WikiText an error. A train text left
    unset is ``default_train`` (the pipeline's GPU default is c4, as the pruning papers
    calibrate), and where that cannot be had, WikiText-2's train split, with the reason recorded."""
    specs = {"eval": dataset, "train": train_dataset}
    for w in which:
        check_corpus_spec(specs[w] or "wikitext2")
    texts = {}
    for w in sorted(which):
        if w == "train" and specs[w] is None and default_train != "wikitext2":
            texts[w] = _default_train_text(default_train, no_fallback, local)
        else:
            texts[w] = load_corpus(specs[w] or "wikitext2", "test" if w == "eval" else "train",
                                   fallback=specs[w] is None and not no_fallback, local=local)
    described = {w: t.describe() for w, t in texts.items()}
    if len(texts) == 2:  # calibration text that holds evaluation text inflates every score
        described["overlap"] = corpus_overlap(texts["train"], texts["eval"], allow=allow_overlap)
    return texts, described


def tokenize_corpus(tokenizer, corpus: Corpus | str, max_tokens: Optional[int] = None) -> torch.Tensor:
    """Tokenize a corpus into one 1-D LongTensor of token ids, shape [n_tokens].

    A ``Corpus`` is tokenized once per tokenizer and cached on it. A document corpus has no
    joined text: its first documents, joined by spaces (as C4's text is joined), are tokenized
    until ``max_tokens`` ids are reached, which it then requires, so that the cost grows with
    what is used, never with the shard. For any other text ``max_tokens`` keeps a prefix of the
    full tokenization.
    """
    if isinstance(corpus, Corpus) and corpus.docs is not None:
        return _document_prefix_ids(tokenizer, corpus, max_tokens)
    if isinstance(corpus, Corpus):
        hit = corpus._tokens.get(id(tokenizer))
        if hit is None or hit[0] is not tokenizer:  # the tokenizer itself is kept: its id is then never reused
            hit = corpus._tokens[id(tokenizer)] = (tokenizer, _tokenize(tokenizer, corpus.text))
        ids = hit[1]
    else:
        ids = _tokenize(tokenizer, corpus)
    return ids[:max_tokens] if max_tokens else ids


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    old = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e30)  # silence the "sequence too long" warning
    try:
        return tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids[0]
    finally:
        tokenizer.model_max_length = old


def _document_prefix_ids(tokenizer, corpus: Corpus, max_tokens: Optional[int]) -> torch.Tensor:
    if not max_tokens:
        raise UserError(f"{corpus.source} is a document corpus, sampled document by document: "
                        "a step that reads it as one text must say how many tokens it needs")
    n, ids = 64, None
    while True:  # double the documents read until the prefix is long enough
        k = min(n, len(corpus.docs))
        ids = _tokenize(tokenizer, " ".join(corpus.docs[:k]))
        if ids.numel() >= max_tokens or k == len(corpus.docs):
            return ids[:max_tokens]
        n *= 2


def sample_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` random windows of ``seq_len`` tokens from a 1-D id tensor -> [n, seq_len].

    The GPTQ/SparseGPT/Wanda calibration recipe (their ``get_wikitext2``), draw for draw: Python's
    ``random`` seeded by ``seed``, each start ``randint(0, n_tokens - seq_len - 1)``; from a private
    ``random.Random``, so the global RNG is untouched. Same tokens and seed: their windows.
    """
    if seq_len < 2:
        raise UserError(f"sequence length must be >= 2, got {seq_len}")
    if ids.numel() < seq_len + 1:
        raise UserError(f"corpus has {ids.numel()} tokens, shorter than one window of {seq_len}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seq_len - 1) for _ in range(n)]
    return torch.stack([ids[s:s + seq_len] for s in starts])


def calibration_windows(tokenizer, source: Corpus | torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` calibration windows [n, seq_len] of ``source``, as the pipeline draws them.

    ``source`` is a ``Corpus``, token ids [n_tokens], or windows [n, seq_len] (returned as they
    are). A document corpus (C4, a local JSON-lines shard) follows SparseGPT's and Wanda's
    ``get_c4``: with Python's ``random`` seeded by ``seed``, draw a document index until the
    document has more than ``seq_len`` tokens (tokenized alone, special tokens included), then a
    window start uniformly in it; only drawn documents are read and tokenized. With the same
    tokenizer, documents and seed this gives their windows. Any other corpus or id tensor:
    ``sample_windows`` over its (cached) tokenization, their ``get_wikitext2``.
    """
    if isinstance(source, torch.Tensor):
        return source if source.dim() == 2 else sample_windows(source, n, seq_len, seed)
    if source.docs is None:
        return sample_windows(tokenize_corpus(tokenizer, source), n, seq_len, seed)
    if seq_len < 2:
        raise UserError(f"sequence length must be >= 2, got {seq_len}")
    rng, out, docs = random.Random(seed), [], source.docs
    for _ in range(n):
        for _ in range(1000):
            enc = tokenizer(docs[rng.randint(0, len(docs) - 1)], return_tensors="pt").input_ids[0]
            if enc.numel() > seq_len:
                break
        else:
            raise UserError(f"no document of {source.source} found with more than {seq_len} tokens in 1000 draws: "
                            "lower the window length")
        i = rng.randint(0, enc.numel() - seq_len - 1)
        out.append(enc[i:i + seq_len])
    return torch.stack(out)
