"""The finetune step: load a fine-tuned causal LM, or fine-tune the base model when none exists.

    model, result = load_or_train_model(model, tokenizer, train_corpus_or_ids, FinetuneConfig(...))

Training is a plain causal-LM loop driven by ``accelerate`` (mixed precision, DDP under
``accelerate launch``). Batches are drawn from a generator seeded by (seed, step), and
the learning rate is a pure function of the step, so a run resumed from a checkpoint
sees exactly the batches and rates an uninterrupted run would, and ends with the same
weights. Resume checkpoints hold tensors and plain numbers only (``weights_only=True``).

The finished model is saved with ``save_pretrained`` (sharded safetensors, tokenizer,
``manifest.json``) into a temporary directory that is renamed into place at the end:
a directory with a manifest is finished, anything else is not.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

import llm_common as C
import llm_data as D
import llm_io as IO
import llm_model as LM
import llm_train as TR
import llm_variants as V
from llm_config import EvalConfig, FinetuneConfig
from llm_knobs import fingerprint, trackers_of
from llm_perplexity import evaluate_model
from llm_run import Run
from llm_tracking import mlflow_store, reachable_trackers, wandb_mode

log = logging.getLogger("llm.finetune")

MANIFEST = "manifest.json"


@dataclass
class FinetuneResult:
    model_dir: str
    loaded_existing: bool               # True: a finished fine-tune was found and loaded
    mode: str
    steps: int = 0
    resumed_from_step: int = 0
    heldout_loss_before: Optional[float] = None  # mean nll per token, nats
    heldout_loss_after: Optional[float] = None
    heldout_ppl_before: Optional[float] = None
    heldout_ppl_after: Optional[float] = None
    heldout_token_set: str = ""                  # what the held-out loss is scored on
    heldout_loss_adapters: Optional[float] = None  # LoRA: the adapters before merging, same tokens
    merge: dict = field(default_factory=dict)    # LoRA: dtype of the merged model, rounding of a native merge
    train_tokens: int = 0                        # tokens of training text read (a document corpus: a prefix)
    train_losses: list = field(default_factory=list)  # per step
    seconds: float = 0.0
    manifest: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # the resolved FinetuneConfig


def resolve_config(model, config: FinetuneConfig) -> FinetuneConfig:
    """``config`` with budgets for the model's device, the window clamped to the model's context
    (``for_model``, as every step), ``mode="auto"`` decided by size (full below 1.5B parameters,
    else LoRA) and the learning rate by mode; validated."""
    cfg = config.for_model(model)
    if cfg.mode == "auto":
        cfg = replace(cfg, mode="full" if sum(p.numel() for p in model.parameters()) < 1.5e9 else "lora")
    if cfg.lr is None:
        cfg = replace(cfg, lr=2e-4 if cfg.mode == "lora" else 5e-5)
    cfg.validate()
    return cfg


def train_tokens_needed(cfg: FinetuneConfig) -> int:
    """Tokens of a document corpus to read: every step's batch once over, plus the held-out tail."""
    return math.ceil(cfg.steps * cfg.batch_size * cfg.seq_len / (1 - cfg.holdout_fraction)) + 2 * cfg.seq_len


def is_finished(path: Path) -> bool:
    return (path / MANIFEST).is_file() and (path / "config.json").is_file()


def lr_at(step: int, cfg: FinetuneConfig) -> float:
    """Linear warm-up then cosine decay to 10% of the peak; a pure function of the step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def split_holdout(ids: torch.Tensor, cfg: FinetuneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids, held-out ids): the held-out part is the contiguous tail of the text."""
    n_hold = max(int(ids.numel() * cfg.holdout_fraction), cfg.seq_len)
    train, hold = ids[:-n_hold], ids[-n_hold:]
    if train.numel() < cfg.seq_len + 1:
        raise C.UserError(f"training text has {ids.numel()} tokens: too short for a held-out part "
                          f"and one batch of windows of {cfg.seq_len} tokens")
    return train, hold


def _batch(train: torch.Tensor, step: int, cfg: FinetuneConfig) -> torch.Tensor:
    """Windows for ``step``: [batch_size, seq_len]. Depends only on (seed, step)."""
    return D.sample_windows(train, cfg.batch_size, cfg.seq_len, seed=cfg.seed * 1_000_003 + step)


def _heldout_label(hold: torch.Tensor, cfg: FinetuneConfig) -> str:
    n = min(hold.numel(), cfg.holdout_windows * cfg.seq_len) // cfg.seq_len * cfg.seq_len
    return f"{n} tokens held out at the end of the training text, windows of {cfg.seq_len}"


def _heldout(model, tokenizer, hold: torch.Tensor, cfg: FinetuneConfig) -> tuple[float, float]:
    n = min(hold.numel(), cfg.holdout_windows * cfg.seq_len)
    was_training = model.training
    model.eval()
    try:
        r = evaluate_model(model, tokenizer, hold[:n], EvalConfig(seq_len=cfg.seq_len, eval_tokens=0, max_new_tokens=0,
                                                                  progress=False))
    finally:
        model.train(was_training)
    return r.nll, r.perplexity


def _resume_path(cfg: FinetuneConfig) -> Path:
    out = Path(cfg.output_dir)
    return out.with_name(out.name + ".resume.pt")


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}


def run_key(cfg: FinetuneConfig) -> str:
    """What a finished fine-tune or a resume checkpoint must match to be reused: every field
    that can change the weights, and ``cfg.identity`` (the pipeline puts the base model's
    identity and the training text's hash there)."""
    return fingerprint(cfg.fingerprint_dict(), cfg.identity)


def _set_aside(path: Path, why: str) -> None:
    aside = path.with_name(f"{path.name}.stale-{int(time.time())}")
    os.replace(path, aside)
    log.warning("%s; moved %s aside to %s", why, path, aside.name)


def _save_resume(model, optimizer, step: int, losses: list, cfg: FinetuneConfig) -> None:
    """Tensors and numbers only, written atomically; loaded with weights_only=True."""
    state = {"step": step, "losses": list(losses), "model": _trainable_state(model),
             "optimizer": optimizer.state_dict(), "run_key": run_key(cfg)}
    with IO.atomic_path(_resume_path(cfg)) as tmp:
        torch.save(state, tmp)


def _load_resume(model, optimizer, cfg: FinetuneConfig) -> tuple[int, list]:
    """(step, losses) of a resume checkpoint of this very run, loaded into model and optimizer;
    (0, []) when there is none. One from another run (other model, data or config), or one that
    does not load, is moved aside and training starts over."""
    path = _resume_path(cfg)
    if not path.is_file():
        return 0, []
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("run_key") != run_key(cfg):
            _set_aside(path, "the resume checkpoint belongs to another run (model, data or config differ)")
            return 0, []
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in state["model"].items():
                params[k].copy_(v.to(params[k].device))
        optimizer.load_state_dict(state["optimizer"])
    except Exception as e:  # noqa: BLE001 - truncated, hostile, or another shape: start over rather than crash
        _set_aside(path, f"the resume checkpoint does not load ({type(e).__name__})")
        return 0, []
    log.info("resuming fine-tuning from step %d (%s)", state["step"], path)
    return int(state["step"]), list(state["losses"])


def _merge_lora(model, cfg: FinetuneConfig):
    """Fold the LoRA adapters into their weights and return the plain model.

    Why fp32: a LoRA update is mostly below half a bf16 ulp of the weight it is added to, so
    merging into bf16 weights rounds most of it away (on SmolLM2, 6 steps: 89% of entries lose
    their update, 10% of the held-out gain is lost). ``lora_merge="fp32"`` (default) upcasts
    the model and merges the fp32 adapters exactly: the fine-tuned model, and every variant
    derived from it, is then held in fp32. ``"native"`` merges into the model's own dtype, as
    PEFT's ``merge_and_unload`` does. Either way ``merge`` records the relative error a native
    merge makes on the update, ||round(W + dW) - (W + dW)|| / ||dW||, over all adapters.
    """
    low = LM.low_precision_dtype(model)
    err2 = upd2 = 0.0
    for m in model.modules():
        if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer") and "default" in getattr(m, "lora_A", {}):
            with torch.no_grad():
                w = m.base_layer.weight.float()
                d = m.get_delta_weight("default").float()
                merged = w + d
                rounded = merged.to(low).float() if low is not None else merged
                err2 += float((rounded - merged).pow(2).sum())
                upd2 += float(d.pow(2).sum())
    keep32 = low is not None and cfg.lora_merge == "fp32"
    if keep32:
        model = model.float()
    model = model.merge_and_unload()  # later steps see a plain model
    info = {"dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "native_merge_update_error": (err2 ** 0.5) / (upd2 ** 0.5) if upd2 > 0 else 0.0}
    if keep32:
        log.info("LoRA merged in float32: the fine-tuned model is held in float32 (a %s merge would have "
                 "rounded the update with relative error %.3f; --lora-merge native keeps %s)",
                 str(low).replace("torch.", ""), info["native_merge_update_error"], str(low).replace("torch.", ""))
    return model, info


def _needs_checkpointing(model, cfg: FinetuneConfig) -> bool:
    """Gradient checkpointing costs a third forward pass: turn it on only when the
    activations of one batch would not fit beside the weights and optimizer state."""
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing
    if not LM.is_cuda_model(model):
        return False
    return LM.auto_batch_size(model, cfg.seq_len, cfg.batch_size, train=True, fraction=0.7) < cfg.batch_size


class _SaveRequest:
    """SIGUSR1 asks the loop for a resume checkpoint at the end of the current step
    (clusters send it before preemption); the old handler is restored afterwards."""

    def __init__(self):
        self.pending = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR1"):
            self._old = signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "pending", True))
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGUSR1, self._old)


def train(model, train_ids: torch.Tensor, cfg: FinetuneConfig, on_step: Optional[Callable[[int], None]] = None,
          before_merge: Optional[Callable] = None):
    """Fine-tune ``model`` in place (full) or through merged LoRA adapters (``_merge_lora``).

    bf16/fp16 models train through fp32 master weights under autocast (``llm_train.training``);
    full fine-tunes are rounded back to their dtype at the end. The loss is kept on the device
    and read back every ``log_every`` steps, so the loop never waits for the GPU otherwise.
    Returns (model, losses, resumed_from_step, merge record). ``on_step(step)`` is called after
    each optimizer step (tests use it to simulate a kill); ``before_merge(model)`` sees the
    trained adapters still unmerged (LoRA only).
    """
    on_cuda = LM.is_cuda_model(model)
    # Autocast is ours, not accelerate's: accelerate's mixed-precision setting is global to
    # the process and cannot change between two trainings in one notebook.
    # --log-to: accelerate's trackers; TensorBoard writes <output_dir>/../tensorboard/finetune.
    trackers, run_dir = list(reachable_trackers(trackers_of(cfg.log_to))), Path(cfg.output_dir).parent
    accel = Accelerator(cpu=not on_cuda, log_with=trackers or None,
                        project_dir=str(run_dir / "tensorboard") if trackers else None)
    if cfg.mode == "lora":
        model = TR.wrap_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.seed)
    checkpointing = _needs_checkpointing(model, cfg)
    if checkpointing:
        log.info("gradient checkpointing on: a batch's activations would not fit in free memory")
        model.gradient_checkpointing_enable()
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    with TR.training(model, params, cfg.lr, cfg.weight_decay) as tr, _SaveRequest() as save_request:
        start, losses = _load_resume(model, tr.optimizer, cfg)
        if "mlflow" in trackers:
            mlflow_store(run_dir)
        if trackers:  # resumed at ``start``: TensorBoard hides the points logged after the last checkpoint
            accel.init_trackers("finetune", init_kwargs={
                "tensorboard": {"purge_step": start + 1} if start else {},
                "wandb": {"dir": str(run_dir), "name": "finetune", "mode": wandb_mode()},
                # a child of the pipeline's run, which is active (MLflow keeps one stack of runs)
                "mlflow": {"logging_dir": str(run_dir / "mlruns"), "nested_run": True}})
        fwd = torch.compile(model) if cfg.compile else model
        if getattr(model, "hf_device_map", None) is None:
            fwd, tr.optimizer = accel.prepare(fwd, tr.optimizer)
        else:
            tr.optimizer = accel.prepare(tr.optimizer)
        optimizer, dev = tr.optimizer, tr.device
        pending: list[torch.Tensor] = []  # per-step losses still on the device

        def flush():
            if pending:
                new = torch.stack(pending).float().cpu().tolist()  # one host sync
                for i, x in enumerate(new, start=len(losses)):  # step i+1 trained at lr_at(i)
                    accel.log({"train/loss": x, "train/lr": lr_at(i, cfg)}, step=i + 1)  # a no-op without trackers
                losses.extend(new)
                pending.clear()
                bad = next((x for x in new if not math.isfinite(x)), None)
                if bad is not None:  # stop before a NaN model can be saved
                    raise C.UserError(f"fine-tuning diverged: loss {bad} by step {len(losses)} "
                                      f"(lower --lr, now {cfg.lr})")

        bar = tqdm(range(start, cfg.steps), desc="fine-tune", unit="step", initial=start, total=cfg.steps,
                   disable=not accel.is_local_main_process)
        last_save = time.monotonic()
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            batch = _batch(train_ids, step, cfg)
            # Under DDP each rank takes a disjoint slice of the global batch.
            batch = batch[accel.process_index::accel.num_processes].to(dev, non_blocking=True)
            with tr.autocast():
                loss = fwd(input_ids=batch, labels=batch, use_cache=False).loss
            tr.step(loss, cfg.grad_clip)  # what accelerate's backward and clip do without DeepSpeed/FSDP/XLA
            pending.append(accel.gather(loss.detach().float()[None]).mean())
            done = step + 1
            if done % max(cfg.log_every, 1) == 0 or done == cfg.steps:
                flush()
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            due = (cfg.save_every and done % cfg.save_every == 0) or save_request.pending or \
                (cfg.save_every_s and time.monotonic() - last_save >= cfg.save_every_s)
            if due and done < cfg.steps and accel.is_main_process:
                flush()
                _save_resume(model, optimizer, done, losses, cfg)
                last_save, save_request.pending = time.monotonic(), False
            if on_step is not None:
                flush()
                on_step(done)
        flush()
        accel.end_training()  # closes the event files
        model = accel.unwrap_model(fwd)
        if checkpointing:
            model.gradient_checkpointing_disable()
        merge = {}
        if cfg.mode == "lora":  # inside the fp32 master weights: the adapters are merged unrounded
            if before_merge is not None:
                model.eval()
                before_merge(model)
            model, merge = _merge_lora(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model, losses, start, merge


def _save_finished(model, tokenizer, cfg: FinetuneConfig, manifest: dict) -> None:
    with IO.atomic_path(cfg.output_dir) as tmp:
        model.save_pretrained(tmp, max_shard_size=cfg.max_shard_size)
        tokenizer.save_pretrained(tmp)
        IO.write_json(tmp / MANIFEST, manifest)
    _resume_path(cfg).unlink(missing_ok=True)


def _check_disk(model, out: Path, cfg: FinetuneConfig) -> None:
    """Refuse to start training when the finished model and one resume checkpoint (trainable
    weights and two AdamW moments, fp32) would not fit on the disk: better now than in hours."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters()) if cfg.mode == "full" else weights // 50  # LoRA: small
    need = weights + 12 * trainable
    free = shutil.disk_usage(IO.existing_parent(out)).free
    if free < need:
        raise C.UserError(f"not enough free disk for the fine-tune: {need / 2**30:.1f} GiB needed beside {out} "
                          f"(model and resume checkpoint), {free / 2**30:.1f} GiB free")


def load_finished(path: Path, like_model):
    """Load a finished fine-tune onto the same devices as ``like_model``, in the dtype it was
    saved in (a LoRA merge kept in fp32 stays fp32), else ``like_model``'s."""
    saved = json.loads((path / MANIFEST).read_text()).get("dtype")
    dtype = getattr(torch, saved) if saved in ("float32", "bfloat16", "float16") else next(like_model.parameters()).dtype
    kw = {"device_map": like_model.hf_device_map} if getattr(like_model, "hf_device_map", None) else {}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kw)
    if not kw:
        model.to(LM.input_device(like_model))
    model.eval()
    model.config.use_cache = False
    return model


def load_or_train_model(model, tokenizer, train_data: "D.Corpus | torch.Tensor",
                        config: FinetuneConfig = FinetuneConfig(), on_step: Optional[Callable[[int], None]] = None):
    """Return (fine-tuned model, FinetuneResult).

    If ``config.output_dir`` holds a finished fine-tune it is loaded and nothing is
    trained. Otherwise ``model`` is fine-tuned on ``train_data`` (a corpus, or its token ids
    [n_tokens]; its tail is held out) and saved. A document corpus (C4, a JSON shard) is read
    only as far as training needs (``train_tokens_needed``). ``model`` is changed in place in
    ``full`` mode.
    """
    config = resolve_config(model, config)
    out = Path(config.output_dir)
    t0 = time.perf_counter()
    if config.mode == "none":
        return model, FinetuneResult(model_dir="", loaded_existing=False, mode="none", config=asdict(config))
    train_ids = train_data if isinstance(train_data, torch.Tensor) else D.tokenize_corpus(
        tokenizer, train_data, train_tokens_needed(config) if train_data.docs is not None else None)
    train_part, hold = split_holdout(train_ids, config)
    if out.exists() and not is_finished(out):
        raise C.UserError(f"{out} exists but is not a finished fine-tuned model (no {MANIFEST}); "
                          "move it away or choose another --output-dir")
    if is_finished(out) and json.loads((out / MANIFEST).read_text()).get("run_key") != run_key(config):
        _set_aside(out, "the finished fine-tune was trained from another model, text or config")
    if is_finished(out):
        log.info("loading the finished fine-tune in %s (not retraining)", out)
        manifest = json.loads((out / MANIFEST).read_text())
        model = load_finished(out, model)
        return model, FinetuneResult(model_dir=str(out), loaded_existing=True, mode=manifest.get("mode", "?"),
                                     steps=manifest.get("steps", 0),
                                     heldout_loss_before=manifest.get("heldout_loss_before"),
                                     heldout_loss_after=manifest.get("heldout_loss_after"),
                                     heldout_ppl_before=manifest.get("heldout_ppl_before"),
                                     heldout_ppl_after=manifest.get("heldout_ppl_after"),
                                     heldout_token_set=manifest.get("heldout_token_set", ""),
                                     heldout_loss_adapters=manifest.get("heldout_loss_adapters"),
                                     merge=manifest.get("merge") or {},
                                     train_tokens=manifest.get("train_tokens", 0) + manifest.get("heldout_tokens", 0),
                                     train_losses=manifest.get("train_losses", []),
                                     seconds=time.perf_counter() - t0, manifest=manifest, config=asdict(config))
    _check_disk(model, out, config)
    C.seed_everything(config.seed)
    loss0, ppl0 = _heldout(model, tokenizer, hold, config)
    log.info("held-out loss before fine-tuning: %.4f (perplexity %.3f)", loss0, ppl0)
    adapters = {}
    model, losses, resumed, merge = train(model, train_part, config, on_step=on_step, before_merge=lambda m: adapters
                                          .update(loss=_heldout(m, tokenizer, hold, config)[0]))
    loss1, ppl1 = _heldout(model, tokenizer, hold, config)
    log.info("held-out loss after fine-tuning: %.4f (perplexity %.3f)", loss1, ppl1)
    manifest = {"run_key": run_key(config), "base_model": config.base_model, "data": config.data,
                "seed": config.seed, "mode": config.mode,
                "steps": config.steps, "batch_size": config.batch_size, "seq_len": config.seq_len, "lr": config.lr,
                "train_tokens": int(train_part.numel()), "heldout_tokens": int(hold.numel()),
                "heldout_loss_before": loss0, "heldout_loss_after": loss1,
                "heldout_ppl_before": ppl0, "heldout_ppl_after": ppl1, "heldout_token_set": _heldout_label(hold, config),
                "final_train_loss": losses[-1] if losses else None, "train_losses": losses,
                "heldout_loss_adapters": adapters.get("loss"), "merge": merge,
                "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    _save_finished(model, tokenizer, config, manifest)
    res = FinetuneResult(model_dir=str(out), loaded_existing=False, mode=config.mode, steps=config.steps,
                         resumed_from_step=resumed, heldout_loss_before=loss0, heldout_loss_after=loss1,
                         heldout_ppl_before=ppl0, heldout_ppl_after=ppl1, train_losses=losses,
                         heldout_token_set=manifest["heldout_token_set"], heldout_loss_adapters=adapters.get("loss"),
                         merge=merge, train_tokens=int(train_ids.numel()),
                         seconds=time.perf_counter() - t0, manifest=manifest, config=asdict(config))
    return model, res


def pipeline_step(run: Run, config: FinetuneConfig) -> Optional[str]:
    """The pipeline's fine-tune, in place: trains (or reuses) the model in ``<out>/finetuned``;
    the live model becomes the ``fine-tuned`` variant and the base stays one. "off" for --finetune none."""
    cfg = dataclasses.replace(config, output_dir=str(run.out / "finetuned"), base_model=run.label,
                              data=run.texts["train"].source,
                              identity=fingerprint(run.results["model_identity"], run.texts["train"].sha256))
    base = run.base_weights() if cfg.mode != "none" else None
    run.model, res = load_or_train_model(run.model, run.tokenizer, run.texts["train"], cfg)
    if res.mode == "none":
        return "off"
    run.make_live("fine-tuned", base)
    if not (res.loaded_existing and run.results.get("finetune")):  # keep the record of the training run
        run.results["finetune"] = {k: v for k, v in dataclasses.asdict(res).items() if k != "manifest"}
    return None


def reattach(run: Run) -> None:
    """An earlier run's fine-tuned model becomes the live model again, in place, as when the step
    is skipped, so that the variants derived from it (pruned, noisy) are what they were."""
    ft, path = run.results.get("finetune") or {}, run.out / "finetuned"
    if not isinstance(ft, dict) or ft.get("mode") in (None, "none"):
        return
    if not (path / "config.json").is_file():
        log.warning("the earlier fine-tuned model %s is gone; later steps see the base model only", path)
        return
    base = run.base_weights()
    tensors, state = IO.load_tensors(path), V.named_tensors(run.model)
    with torch.no_grad():
        for name, t in tensors.items():
            if name in state:
                state[name].copy_(t)
    run.make_live("fine-tuned", base)


def planned(config: FinetuneConfig, names: list, live: str) -> tuple[list, str]:
    """Before loading: the live model becomes ``fine-tuned`` (unless --finetune none)."""
    return (names, live) if config.mode == "none" else (names + ["fine-tuned"], "fine-tuned")
