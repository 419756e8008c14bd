"""Variants of a model: applying one in place and restoring the weights bit for bit
(``restored_on_exit``, ``swapped_weights``, ``masked_weights``, ``applied_variant``), and storing
one as a 1-bit mask, as tensors or as a recipe in results.json (``store_variant``,
``variant_weights``, mask I/O).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from safetensors import safe_open

from llm_common import UserError
from llm_io import load_tensors, save_tensors
from llm_model import free_memory_bytes


def save_masks(path: str | os.PathLike, masks: Mapping[str, torch.Tensor]) -> None:
    """Bool masks at 1 bit per entry (numpy.packbits) as tensors-only safetensors, atomically."""
    packed = {n: torch.from_numpy(np.packbits(m.detach().cpu().numpy().ravel())) for n, m in masks.items()}
    shapes = json.dumps({n: list(m.shape) for n, m in masks.items()})
    save_tensors(path, packed, metadata={"format": "mask", "shapes": shapes})


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The bool masks that ``save_masks`` wrote, in their original shapes."""
    packed = load_tensors(path)
    with safe_open(str(path), "pt") as f:
        shapes = json.loads((f.metadata() or {}).get("shapes", "{}"))
    if set(shapes) != set(packed):
        raise UserError(f"{path} is not a mask checkpoint of this tool")
    return {n: torch.from_numpy(np.unpackbits(packed[n].numpy())[:math.prod(shape)].reshape(shape).astype(bool))
            for n, shape in shapes.items()}


@contextlib.contextmanager
def masked_weights(model: torch.nn.Module, masks) -> Iterator[torch.nn.Module]:
    """Zero the entries of the named parameters where ``masks`` (a dict or a ``save_masks``
    file) is True, in place, for the body; the weights are restored bit for bit on exit."""
    masks = masks if isinstance(masks, Mapping) else load_masks(masks)
    state = named_tensors(model)
    with restored_on_exit(model, list(masks)):
        with torch.no_grad():
            for name, m in masks.items():
                state[name][m.to(state[name].device)] = 0
        yield model


def file_stem(name: str) -> str:
    """A variant's name as a file or folder name: ``pruned[wanda,2:4]`` -> ``pruned_wanda_2-4``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace(":", "-")).strip("_") or "variant"


def store_variant(out: Path, name: str, model: torch.nn.Module, changed: Sequence[str], mask: bool) -> dict:
    """Save a variant of ``model`` as it is now: the ``changed`` parameters in full, or (``mask``,
    for variants that only zero weights) a 1-bit mask of their zeros. Returns its record."""
    path, params = Path(out) / "checkpoints" / f"{file_stem(name)}.safetensors", dict(model.named_parameters())
    if mask:
        save_masks(path, {n: params[n].detach() == 0 for n in changed})
    else:
        save_tensors(path, {n: params[n].detach() for n in changed}, metadata={"variant": name})
    return {"checkpoint": str(path.relative_to(out)), "format": "mask" if mask else "tensors"}


def variant_weights(out: Path, record: dict, from_recipe: Optional[Callable] = None,
                    from_codes: Optional[Callable] = None):
    """A variant as the evaluation takes it, from its record in results.json: ``from_recipe(recipe)``
    for a regenerable one, a context manager for a mask, ``from_codes(path)`` for quantization
    codes, the checkpoint path for tensors; None when the file is gone or lies outside
    ``<out>/checkpoints`` (paths there are never trusted)."""
    if record.get("recipe"):
        return from_recipe(record["recipe"])
    ckpt = (Path(out) / str(record.get("checkpoint") or "")).resolve()
    if not (ckpt.is_relative_to((Path(out) / "checkpoints").resolve()) and ckpt.is_file()):
        return None
    if record.get("format") == "codes":
        return from_codes(ckpt) if from_codes is not None else None
    return functools.partial(masked_weights, masks=ckpt) if record.get("format") == "mask" else ckpt


def named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, tied aliases included (lm_head.weight and the embedding)."""
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    return state


@contextlib.contextmanager
def snapshot(model: torch.nn.Module, names) -> Iterator[Callable[[], None]]:
    """Back up the named tensors (one spare copy) and yield ``restore()``, which puts them back
    bit for bit, in place, whenever the body calls it; they are restored on exit too, also after
    an exception. A sweep perturbs and restores hundreds of times from this one copy."""
    state = named_tensors(model)
    unknown = [n for n in names if n not in state]
    if unknown:
        raise UserError(f"checkpoint names {len(unknown)} tensors the model lacks, e.g. {unknown[0]!r}")
    names = list(dict.fromkeys(names))
    # The spare copy stays on the accelerator when it takes under a third of its free memory:
    # a sweep then never moves gigabytes over PCIe per point; else it goes to the host.
    need: dict[torch.device, int] = {}
    for n in names:
        need[state[n].device] = need.get(state[n].device, 0) + state[n].numel() * state[n].element_size()
    home = {d: d if d.type == "cuda" and b < free_memory_bytes(d) / 3 else torch.device("cpu")
            for d, b in need.items()}
    backup = {n: state[n].detach().to(home[state[n].device], copy=True) for n in names}

    def restore() -> None:
        with torch.no_grad():
            for name, value in backup.items():
                state[name].copy_(value.to(state[name].device))

    try:
        yield restore
    finally:
        restore()


@contextlib.contextmanager
def restored_on_exit(model: torch.nn.Module, names) -> Iterator[torch.nn.Module]:
    """Back up the named tensors (one spare copy) and restore them bit for bit on
    exit, also after an exception. Whatever the body does to them in place is undone."""
    with snapshot(model, names):
        yield model


@contextlib.contextmanager
def swapped_weights(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
    """Temporarily copy ``tensors`` into the model's parameters/buffers, in place;
    the originals are restored bit for bit on exit (see ``restored_on_exit``)."""
    state = named_tensors(model)
    with restored_on_exit(model, list(tensors)):
        with torch.no_grad():
            for name, value in tensors.items():
                if value.shape != state[name].shape:
                    raise UserError(f"checkpoint tensor {name!r} has shape {tuple(value.shape)}, "
                                    f"model has {tuple(state[name].shape)}")
                state[name].copy_(value.to(state[name].device, state[name].dtype))
        yield model


def stacked(*weights):
    """Weights that apply each of ``weights`` in turn, in place (a variant of another variant:
    the base's weights, then the mask pruned from them), for ``applied_variant``."""
    @contextlib.contextmanager
    def apply(model):
        with contextlib.ExitStack() as stack:
            for w in weights:
                stack.enter_context(applied_variant(model, w))
            yield model
    return apply


def applied_variant(model: torch.nn.Module, weights):
    """A context manager that makes ``model`` a variant, in place, and restores it bit for bit on
    exit. ``weights`` is None (the model as it is), a name -> tensor dict, a tensors-only
    checkpoint file or save_pretrained directory (the model's own names only: a directory
    also holds what the model does not, e.g. tied copies), or a callable ``model -> context
    manager`` (a regenerated noise recipe, a pruning mask). Every step that scores or writes
    variants goes through here."""
    if weights is None:
        return contextlib.nullcontext(model)
    if callable(weights):
        return weights(model)
    if not isinstance(weights, Mapping):
        tensors = load_tensors(weights)
        if os.path.isdir(weights):
            state = named_tensors(model)
            tensors = {k: v for k, v in tensors.items() if k in state}
        weights = tensors
    return swapped_weights(model, weights)


def select_variants(names: Sequence[str], patterns: Sequence[str], live: str,
                    flag: str = "--robustness-variants") -> list[str]:
    """The variant names (in ``names``' order) that ``patterns`` choose: ``all`` (every one),
    ``live`` (the live model only), or names and shell-style patterns where ``*`` and ``?`` are
    wildcards and brackets are literal (``pruned[*]``, ``quantized*``). Raises UserError when a
    pattern matches no variant of the run, so a typo never measures nothing in silence."""
    patterns = [p.strip() for p in patterns if p.strip()] or ["all"]
    if "all" in patterns:
        return list(names)
    chosen = set()
    for p in patterns:
        if p == "live":
            hit = {live} & set(names)
        else:
            rx = re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in p) + r"\Z")
            hit = {n for n in names if rx.match(n)}
        if not hit:
            case = " (the words all and live are lower case)" if p.lower() in ("all", "live") else ""
            raise UserError(f"{flag}: {p!r} names no variant of this run (it has "
                            f"{', '.join(names)}){case}")
        chosen |= hit
    return [n for n in names if n in chosen]
