"""load_or_train_model: it learns, it resumes exactly, it loads instead of retraining, LoRA merges."""
import json

import pytest
import torch

import llm_common as C
import llm_data as D
from llm_finetune import FinetuneConfig, load_or_train_model, train
from llm_plots import plot_training_curve


class Killed(Exception):
    pass


def _ids(tok, sample_text):
    return D.tokenize_corpus(tok, sample_text[:12000])


def _cfg(tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), steps=6, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1,
                holdout_windows=4, save_every=2, seed=1)
    base.update(kw)
    return FinetuneConfig(**base)


def test_finetuning_lowers_heldout_loss(tok, sample_text, tmp_path, tiny_llama):
    model, res = load_or_train_model(tiny_llama(), tok, _ids(tok, sample_text), _cfg(tmp_path, "ft", steps=30))
    assert res.heldout_loss_after < res.heldout_loss_before - 0.5
    assert len(res.train_losses) == 30 and not res.loaded_existing
    manifest = json.loads((tmp_path / "ft" / "manifest.json").read_text())
    assert manifest["seed"] == 1 and manifest["steps"] == 30
    assert manifest["heldout_loss_after"] == pytest.approx(res.heldout_loss_after)
    assert not any(p.requires_grad for p in model.parameters())
    png = plot_training_curve(manifest, tmp_path / "curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_killed_run_resumes_to_identical_weights(tok, sample_text, tmp_path, tiny_llama):
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


def test_existing_finetune_is_loaded_not_retrained(tok, sample_text, tmp_path, tiny_llama):
    ids = _ids(tok, sample_text)
    trained, first = load_or_train_model(tiny_llama(), tok, ids, _cfg(tmp_path, "ft", steps=2))

    def never(step):
        raise AssertionError("retrained")

    loaded, second = load_or_train_model(tiny_llama(), tok, ids, _cfg(tmp_path, "ft", steps=2), on_step=never)
    assert second.loaded_existing
    assert second.heldout_loss_after == pytest.approx(first.heldout_loss_after)
    for (k, a), (_, b) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_lora_runs_and_merges(tok, sample_text, tmp_path, tiny_gpt2, tiny_llama):
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
                                    (dict(seq_len=500), "too short")])
def test_bad_finetune_input(tok, sample_text, tmp_path, kw, msg, tiny_llama):
    with pytest.raises(C.UserError, match=msg):
        load_or_train_model(tiny_llama(), tok, _ids(tok, sample_text)[:600], _cfg(tmp_path, "x", **kw))


def test_the_fine_tune_window_is_clamped_to_the_context_by_its_own_flag(tok, sample_text, tmp_path, tiny_gpt2, caplog):
    """A GPT-2 with 512 positions and --ft-seq-len 600 trains on 512-token windows, with a warning
    that names --ft-seq-len (it used to end in an IndexError after loading)."""
    with caplog.at_level("WARNING"):
        _, res = load_or_train_model(tiny_gpt2(), tok, _ids(tok, sample_text), _cfg(tmp_path, "g", seq_len=600, steps=1,
                                                                                    batch_size=1, save_every=0))
    assert res.config["seq_len"] == 512 and "--ft-seq-len" in caplog.text and "--seq-len:" not in caplog.text


def test_existing_non_model_directory_is_refused(tok, sample_text, tmp_path, tiny_llama):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(C.UserError, match="not a finished fine-tuned model"):
        load_or_train_model(tiny_llama(), tok, _ids(tok, sample_text), _cfg(tmp_path, "junk"))


def test_bf16_training_applies_small_updates_like_fp32(tok, sample_text, tmp_path, tiny_llama):
    """A bf16 model trains through fp32 master weights: one AdamW step of lr 1e-5 (about
    +-1e-5 per weight) moves the master weights like the fp32 path does, although such a
    step is below half a bf16 ulp for most weights and would round away if applied to them."""
    import copy

    from llm_finetune import train

    ids = _ids(tok, sample_text)
    bf16 = tiny_llama(hidden=64).to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()  # same starting values, exactly representable in both
    w0 = {n: p.detach().float().clone() for n, p in fp32.named_parameters()}
    cfg = _cfg(tmp_path, "unused", steps=1, lr=1e-5, warmup_steps=1, save_every=0, save_every_s=0)
    master = {}

    def grab(step):  # inside the loop the bf16 model's parameters are the fp32 masters
        master.update({n: p.detach().clone() for n, p in bf16.named_parameters()})

    trained32, _, _, _ = train(fp32, ids, cfg)
    trained16, _, _, _ = train(bf16, ids, cfg, on_step=grab)
    assert all(v.dtype == torch.float32 for v in master.values())
    assert all(p.dtype == torch.bfloat16 for p in trained16.parameters())  # rounded back at the end
    name = "model.layers.0.mlp.down_proj.weight"
    d32 = dict(trained32.named_parameters())[name].detach() - w0[name]
    d16 = master[name] - w0[name]
    moved = d32.abs() > 5e-6
    assert moved.float().mean() > 0.9  # the fp32 path moves nearly every weight by ~lr
    assert (d16.abs() > 5e-6).float().mean() > 0.9  # and so do the masters of the bf16 path
    assert (torch.sign(d16[moved]) == torch.sign(d32[moved])).float().mean() > 0.9
    # Applied to the bf16 weights themselves the same step would change few of them: the
    # property that made the old loop (Adam directly on bf16) mostly a no-op.
    w = w0[name].to(torch.bfloat16)
    naive = (w.float() - 1e-5 * torch.sign(d32)).to(torch.bfloat16)
    assert (naive != w).float().mean() < 0.3


def test_diverging_loss_stops_training_and_saves_nothing(tok, sample_text, tmp_path, tiny_llama):
    cfg = _cfg(tmp_path, "nan", steps=6, lr=float("inf"), log_every=2, save_every=0, save_every_s=0)
    with pytest.raises(C.UserError, match="--lr must be a finite number"):  # refused before any work
        load_or_train_model(tiny_llama(), tok, _ids(tok, sample_text), cfg)
    # The training loop itself stops on the first non-finite loss it reads back.
    with pytest.raises(C.UserError, match="diverged"):
        train(tiny_llama(), _ids(tok, sample_text), cfg)
    assert not (tmp_path / "nan").exists() and not (tmp_path / "nan.resume.pt").exists()


def test_tensorboard_curves_equal_the_recorded_losses(tok, sample_text, tmp_path, tiny_llama):
    """--log-to tensorboard: the event files, read back by TensorBoard's own reader, hold every
    step's loss exactly as results record it, and the learning-rate schedule; the PNG curve stays."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from llm_finetune import lr_at

    cfg = _cfg(tmp_path, "ft", log_to="tensorboard", log_every=4)
    _, res = load_or_train_model(tiny_llama(), tok, _ids(tok, sample_text), cfg)
    runs = list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert runs, "no event file"
    acc = EventAccumulator(str(runs[0].parent)).Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, cfg.steps + 1))
    assert [e.value for e in loss] == pytest.approx(res.train_losses, rel=1e-6)  # stored as float32
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([lr_at(i, cfg) for i in range(cfg.steps)])
    assert (tmp_path / "ft" / "manifest.json").is_file()


def test_a_bf16_lora_merge_keeps_the_whole_update(tmp_path, tok, tiny_llama, sample_text):
    """bf16 LoRA: the merged model scores what the unmerged adapters score (>= 99% of the held-out
    gain kept), because the adapters are merged in fp32 (W + s B A, checked in float64 against
    the adapters themselves) and the model is then held in fp32; a native bf16 merge rounds the
    update, and the record says by how much. A finished fp32 fine-tune reloads in fp32."""
    import llm_finetune as FT

    ids = _ids(tok, sample_text)
    seen = {}

    def grab(model):  # the trained adapters, before merging, in float64
        for n, m in model.named_modules():
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
                s = m.scaling["default"]
                delta = s * m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double()
                seen[n.split("base_model.model.", 1)[-1]] = m.base_layer.weight.double() + delta

    for merge in ("fp32", "native"):
        seen.clear()
        cfg = _cfg(tmp_path, f"lora-{merge}", mode="lora", steps=20, lr=5e-3, lora_merge=merge, save_every=0)
        orig = FT._merge_lora
        FT._merge_lora = lambda m, c: (grab(m), orig(m, c))[1]
        try:
            model, res = load_or_train_model(tiny_llama().to(torch.bfloat16), tok, ids, cfg)
        finally:
            FT._merge_lora = orig
        gain = res.heldout_loss_before - res.heldout_loss_adapters
        assert gain > 0.1, "the adapters must have learnt something for the test to mean anything"
        kept = (res.heldout_loss_before - res.heldout_loss_after) / gain
        assert res.merge["dtype"] == ("float32" if merge == "fp32" else "bfloat16")
        assert res.merge["native_merge_update_error"] > 0.001
        mods = dict(model.named_modules())
        err = max(float((mods[n].weight.double() - w).abs().max() / w.abs().max()) for n, w in seen.items())
        if merge == "fp32":
            assert kept >= 0.99 and err < 1e-6, (kept, err)
            assert next(model.parameters()).dtype == torch.float32
        else:
            assert err > 1e-4  # bf16 rounding of the merged weights
        reloaded, again = load_or_train_model(tiny_llama().to(torch.bfloat16), tok, ids, cfg)  # finished: loaded
        assert again.loaded_existing and next(reloaded.parameters()).dtype == getattr(torch, res.merge["dtype"])


def test_tensorboard_after_resume_has_each_step_once(tok, sample_text, tmp_path, tiny_llama):
    """Row 14: killed at step 5 after a checkpoint at step 4, resumed: TensorBoard's reader sees
    steps 1..8 once each (the points the killed run logged past its checkpoint are purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, "ft", steps=8, save_every=4, log_every=1, log_to="tensorboard")
    ids = _ids(tok, sample_text)

    def kill(step):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        load_or_train_model(tiny_llama(), tok, ids, cfg, on_step=kill)
    _, res = load_or_train_model(tiny_llama(), tok, ids, cfg)
    assert res.resumed_from_step == 4
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "finetune")).Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 9))
    assert [e.value for e in loss] == pytest.approx(res.train_losses, rel=1e-6)
