"""The training loop's pieces, shared by the fine-tune step and the adversarial defences.

    params = trainable_params(model)          # LoRA adapters when wrapped, else every float weight
    with training(model, params, lr) as tr:   # fp32 masters, fused AdamW, train mode restored on exit
        with tr.autocast():
            loss = ...
        tr.step(loss, clip=1.0)               # backward, clip, AdamW step, grads set to None

The recipe is the standard mixed-precision one (Micikevicius et al. 2018; PyTorch's AMP
recipe; nanoGPT's ``train.py``): bf16/fp16 models train fp32 copies of their trainable weights
under autocast, so the matmuls run in the low dtype and the updates accumulate in fp32; fp16
losses are scaled against gradient underflow. Nothing here reads a value back to the host.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from peft import LoraConfig, get_peft_model

import llm_model as LM


def trainable_params(model) -> list[torch.nn.Parameter]:
    """What a training loop updates: the LoRA adapters when ``model`` has them (``wrap_lora``),
    else every floating-point weight."""
    if getattr(model, "peft_config", None):
        return [p for n, p in model.named_parameters() if "lora_" in n]
    return [p for p in model.parameters() if p.is_floating_point()]


def wrap_lora(model, r: int, alpha: int, seed: int):
    """``model`` with fresh LoRA adapters (Hu et al. 2021) of rank ``r`` on every linear layer,
    in place (PEFT's ``get_peft_model``; ``.unload()`` removes them, ``.merge_and_unload()``
    folds them in). The A matrices are random: seeded by ``seed`` so a run, or its resume, is
    repeatable."""
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


def adamw(params, lr: float, weight_decay: float, device: torch.device, fused_on_cpu: bool = True):
    """AdamW fused into one kernel for all parameters where the device has it: CUDA, and CPU
    since torch 2.4 (``fused_on_cpu=False``: the per-tensor CPU kernel, which rounds
    differently in the last bit)."""
    fused = device.type == "cuda" or (device.type == "cpu" and fused_on_cpu)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


@dataclass
class Training:
    """An open training context (``training``): the optimizer over ``params``, the autocast
    dtype (None for fp32 models) and the fp16 loss scaler (disabled otherwise)."""

    optimizer: torch.optim.Optimizer
    params: list
    device: torch.device
    low: Optional[torch.dtype]
    scaler: torch.amp.GradScaler

    def autocast(self):
        """Autocast to the model's own low dtype; a no-op context for fp32 models."""
        if self.low is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.low)

    def step(self, loss: torch.Tensor, clip: float = 0.0) -> None:
        """Backward of ``loss`` (scaled for fp16), gradient-norm clip at ``clip`` (0: none), one
        optimizer step, gradients set to None. Gradients of non-parameters (an attack's delta)
        stay for the caller."""
        self.scaler.scale(loss).backward()
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def training(model, params, lr: float, weight_decay: float = 0.0, fused_on_cpu: bool = True) -> Iterator[Training]:
    """Train ``params`` of ``model``: held in fp32 for the block (``LM.fp32_master_weights``:
    AdamW steps of lr ~1e-5 are below half a bf16 ulp and would round away), rounded back to
    their dtype on exit; the model in train mode, its previous mode restored on exit, also after
    an exception. Learning rates are the caller's (``optimizer.param_groups``)."""
    was_training = model.training
    params = list(params)
    dev, low = LM.input_device(model), LM.low_precision_dtype(model)  # before the upcast hides the model's dtype
    try:
        with LM.fp32_master_weights(params):
            model.train()
            yield Training(adamw(params, lr, weight_decay, dev, fused_on_cpu), params, dev, low,
                           torch.amp.GradScaler(dev.type, enabled=low == torch.float16))  # fp16 gradients underflow
    finally:
        model.train(was_training)
