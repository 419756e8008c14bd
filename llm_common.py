"""What every module shares: the user-facing error, seeding, logging, provenance (git commit,
library versions), whether the hub is reachable, and rank sharding under ``accelerate launch``.

The rest of the old grab bag lives by concern in ``llm_io`` (files), ``llm_model`` (loading and
the architecture map), ``llm_variants`` (variants in place) and ``llm_data`` (corpora). The old
names still resolve here for one release, with a DeprecationWarning naming their new home.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import random
import socket
import subprocess
import warnings
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("llm")


REPO_DIR = Path(__file__).resolve().parent


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2, no traceback."""


def error_line(e: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"``, cut to ``limit`` characters: how a library's
    exception is quoted inside one of our one-line errors or recorded reasons."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run can be repeated exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_deterministic(seed: int) -> None:
    """Seed everything and ask torch for deterministic kernels (warning where none exists)."""
    seed_everything(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    torch.use_deterministic_algorithms(True, warn_only=True)


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1).

    Under ``accelerate launch`` (or torchrun) sweeps split their jobs across ranks.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launch_rank() -> int:
    """This process's rank as ``accelerate launch``/torchrun set it (``RANK``), readable before
    the process group is joined; 0 in a plain run."""
    return int(os.environ.get("RANK", "0"))


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


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick check so offline machines go to the local cache in seconds, not after minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    return reachable(urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname, timeout)


def reachable(host: str, timeout: float = 3.0, port: int = 443) -> bool:
    """Whether ``host`` answers on ``port`` within ``timeout`` seconds."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


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


# The names that moved out of this module, by their new home: ``C.load_model`` keeps working for one release.
_MOVED_TO = {
    "llm_io": """atomic_path clean_stale_temps ensure_writable_dir existing_parent fault_point load_tensors
        MAX_JSON_BYTES no_space_left output_lock private_umask read_json save_tensors sigint_as_interrupt
        TMP_PREFIX to_strict_json write_json write_text _alive _harden _umask""",
    "llm_model": """attention_implementation auto_batch_size block_linears context_length decoder_layers decoder_linears
        DEFAULT_CACHE_DIR embedded_gguf_path EMBEDDED_NAME EMBEDDED_PACKAGE eval_mode fp32_master_weights
        free_memory_bytes input_device is_cuda_model is_linear load_model LoadConfig low_precision_dtype
        mlp_down_proj MODEL_FILES model_identity out_in peak_memory_mb reset_peak_memory resolve_device
        resolve_dtype resolve_model_source SAMPLE_PROMPT trainable_only use_cache WEIGHT_SUFFIXES
        weight_view weights_dir _dequantize_gguf_to_cache _gguf_cache_dir""",
    "llm_variants": """applied_variant load_masks masked_weights named_tensors restored_on_exit save_masks store_variant
        swapped_weights variant_weights""",
    "llm_data": """C4_EVAL_WINDOWS calibration_windows check_corpus_spec Corpus corpus_overlap datasets_offline
        embedded_corpus HUB_CORPORA hub_corpus json_corpus JSON_SUFFIXES load_corpus load_texts
        OVERLAP_DOCUMENTS sample_windows tokenize_corpus _default_train_text _document_prefix_ids
        _file_digest _hub_text _text_files _tokenize""",
}
_HOME = {name: module for module, names in _MOVED_TO.items() for name in names.split()}


def __getattr__(name: str):
    """``llm_common.<moved name>``: the object from its new home, with a DeprecationWarning."""
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"llm_common.{name} moved to {module}.{name}; import it from there (the old name goes "
                  "in the next release)", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), name)
