"""load_or_train_model: it learns, it resumes exactly, it loads instead of retraining, LoRA merges."""
import json

import pytest
import torch

import llm_common as C
from llm_finetune import FinetuneConfig, load_or_train_model, plot_training_curve


class Killed(Exception):
    pass


def _ids(tok, sample_text):
    return C.tokenize_corpus(tok, sample_text[:12000])


def _cfg(tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), steps=6, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1,
                holdout_windows=4, save_every=2, seed=1)
    base.update(kw)
    return FinetuneConfig(**base)


def test_finetuning_lowers_heldout_loss(tok, sample_text, tmp_path):
    from conftest import tiny_llama

    model, res = load_or_train_model(tiny_llama(), tok, _ids(tok, sample_text), _cfg(tmp_path, "ft", steps=30))
    assert res.heldout_loss_after < res.heldout_loss_before - 0.5
    assert len(res.train_losses) == 30 and not res.loaded_existing
    manifest = json.loads((tmp_path / "ft" / "manifest.json").read_text())
    assert manifest["seed"] == 1 and manifest["steps"] == 30
    assert manifest["heldout_loss_after"] == pytest.approx(res.heldout_loss_after)
    assert not any(p.requires_grad for p in model.parameters())
    png = plot_training_curve(manifest, tmp_path / "curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_killed_run_resumes_to_identical_weights(tok, sample_text, tmp_path):
    from conftest import tiny_llama

    ids = _ids(tok, sample_text)
    straight, _ = load_or_train_model(tiny_llama(), tok, ids, _cfg(tmp_path, "a"))

    def kill(step):
        if step == 4:
            raise Killed

    cfg_b = _cfg(tmp_path, "b")
    with pytest.raises(Killed):
        load_or_train_model(tiny_llama(), tok, ids, cfg_b, on_step=kill)
    assert not (tmp_path / "b").exists()  # nothing half-written where the model goes
    assert (tmp_path / "b.resume.pt").is_file()
    resumed, res = load_or_train_model(tiny_llama(), tok, ids, cfg_b)
    assert res.resumed_from_step == 4
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert not (tmp_path / "b.resume.pt").exists()


def test_existing_finetune_is_loaded_not_retrained(tok, sample_text, tmp_path):
    from conftest import tiny_llama

    ids = _ids(tok, sample_text)
    trained, first = load_or_train_model(tiny_llama(), tok, ids, _cfg(tmp_path, "ft", steps=2))

    def never(step):
        raise AssertionError("retrained")

    loaded, second = load_or_train_model(tiny_llama(), tok, ids, _cfg(tmp_path, "ft", steps=2), on_step=never)
    assert second.loaded_existing
    assert second.heldout_loss_after == pytest.approx(first.heldout_loss_after)
    for (k, a), (_, b) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_lora_runs_and_merges(tok, sample_text, tmp_path):
    from conftest import tiny_gpt2, tiny_llama

    for make in (tiny_llama, tiny_gpt2):
        base = make()
        before = {k: v.clone() for k, v in base.state_dict().items()}
        model, res = load_or_train_model(base, tok, _ids(tok, sample_text),
                                         _cfg(tmp_path, f"lora-{make.__name__}", mode="lora", lr=1e-2, steps=8))
        assert type(model).__name__ == type(base).__name__  # merged: a plain model, no peft wrapper
        assert not any("lora" in k for k in model.state_dict())
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and all("norm" not in k and "wte" not in k and "embed" not in k for k in changed)
        assert res.heldout_loss_after < res.heldout_loss_before


@pytest.mark.parametrize("kw,msg", [(dict(lr=0), "--lr"), (dict(lr=-1), "--lr"), (dict(mode="qlora"), "--finetune"),
                                    (dict(seq_len=4000), "too short")])
def test_bad_finetune_input(tok, sample_text, tmp_path, kw, msg):
    from conftest import tiny_llama

    with pytest.raises(C.UserError, match=msg):
        load_or_train_model(tiny_llama(), tok, _ids(tok, sample_text)[:3000], _cfg(tmp_path, "x", **kw))


def test_existing_non_model_directory_is_refused(tok, sample_text, tmp_path):
    from conftest import tiny_llama

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(C.UserError, match="not a finished fine-tuned model"):
        load_or_train_model(tiny_llama(), tok, _ids(tok, sample_text), _cfg(tmp_path, "junk"))
