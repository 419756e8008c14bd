"""Shared helpers: corpora, atomic writes, strict JSON, checkpoints, weight swaps."""
import json
import os
import pickle

import pytest
import torch

import llm_common as C
import llm_data as D
import llm_io as IO
import llm_model as LM
import llm_variants as V


def test_embedded_splits_are_disjoint_and_deterministic():
    train, test = D.embedded_corpus("train"), D.embedded_corpus("test")
    assert len(train) > 3 * len(test) > 0
    tr, te = set(train.split("\n\n")), set(test.split("\n\n"))
    assert not (tr & te)
    assert D.embedded_corpus("test") == test


def test_wikitext2_offline_falls_back_and_records(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = D.load_corpus("wikitext2", "test")
    assert c.fallback and "offline" in c.fallback
    assert c.text == D.embedded_corpus("test")
    assert c.describe()["fallback"] == c.fallback


def test_text_file_and_folder_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    (tmp_path / "b.txt").write_text("other file")
    assert D.load_corpus(str(tmp_path / "a.txt")).text == "first line\nsecond line\n"
    assert D.load_corpus(str(tmp_path)).text == "first line\nsecond line\n\n\nother file"
    with pytest.raises(C.UserError, match="corpus not found"):
        D.load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(C.UserError, match="empty"):
        D.load_corpus(str(tmp_path / "empty.txt"))


def test_strict_json(tmp_path):
    IO.write_json(tmp_path / "r.json", {"a": float("inf"), "b": [float("nan"), -float("inf"), 1.5]})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == {"a": "inf", "b": ["nan", "-inf", 1.5]}
    assert "NaN" not in text and "Infinity" not in text


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "f.txt"
    IO.write_text(p, "old")
    with pytest.raises(RuntimeError):
        with IO.atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.txt"]


def test_tensor_checkpoint_round_trip_with_tied_weights(tmp_path, tiny_llama):
    m = tiny_llama(tie_word_embeddings=True)
    sd = m.state_dict()
    IO.save_tensors(tmp_path / "m.safetensors", sd)
    back = IO.load_tensors(tmp_path / "m.safetensors")
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    torch.save({k: v.clone() for k, v in sd.items()}, tmp_path / "m.pth")
    assert torch.equal(IO.load_tensors(tmp_path / "m.pth")["lm_head.weight"], sd["lm_head.weight"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/llm_pwned_marker",))


def test_pickled_code_is_refused(tmp_path):
    marker = "/tmp/llm_pwned_marker"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(C.UserError, match="cannot load checkpoint"):
        IO.load_tensors(path)
    assert not os.path.exists(marker)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "t.safetensors"
    IO.save_tensors(p, {"w": torch.ones(100, 100)})
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(C.UserError, match="cannot load checkpoint"):
        IO.load_tensors(p)


def test_swapped_weights_restores_bit_exact_even_on_error(tiny_llama):
    m = tiny_llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    name = "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(ValueError):
        with V.swapped_weights(m, {name: torch.zeros_like(before[name])}):
            assert m.state_dict()[name].abs().sum() == 0
            raise ValueError
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    with pytest.raises(C.UserError, match="lacks"):
        with V.swapped_weights(m, {"nope": torch.zeros(1)}):
            pass


def test_sample_windows_are_seeded():
    ids = torch.arange(1000)
    a, b = D.sample_windows(ids, 4, 16, seed=3), D.sample_windows(ids, 4, 16, seed=3)
    assert torch.equal(a, b) and a.shape == (4, 16)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 15, dtype=torch.long))
    with pytest.raises(C.UserError, match="shorter than one window"):
        D.sample_windows(ids[:10], 1, 16, seed=0)


def test_model_resolution_errors(tmp_path):
    with pytest.raises(C.UserError, match="does not exist"):
        LM.resolve_model_source(str(tmp_path / "x.gguf"))
    with pytest.raises(C.UserError, match="no config.json"):
        LM.resolve_model_source(str(tmp_path))
    with pytest.raises(C.UserError, match="does not exist"):
        LM.resolve_model_source("./no/such/model")


def test_dtype_and_device_resolution():
    assert LM.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert LM.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(C.UserError):
        LM.resolve_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(C.UserError, match="no CUDA"):
            LM.resolve_device("cuda")
