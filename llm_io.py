"""Files as the run writes and reads them: atomic files and folders, strict JSON, tensor-only
checkpoints (safetensors, or ``weights_only`` pickles), the output lock, temporaries left by a
killed run, the file-mode rule (umask), Ctrl-C and the crash-test hook.

Nothing here knows about models or corpora.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import math
import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llm_common import UserError, error_line, log


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
    directory is refused while the holder lives, and a dead holder's lock is taken over. Every
    command that writes into a folder (a run, ``--report-only``, ``--compare``) holds it, so two of
    them never rewrite each other's tables. A folder that cannot be written (read-only) is one
    UserError, not an OSError."""
    lock = Path(out) / ".llm-lock"
    for _ in range(2):
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            text = lock.read_text().strip() if lock.is_file() else ""
            if text.isdigit() and _alive(int(text)) and int(text) != os.getpid():
                raise UserError(f"--output-dir {out} is in use by the run with PID {text}; wait for it, or "
                                "choose another --output-dir")
            log.warning("removing the stale lock of PID %s in %s", text or "?", out)
            lock.unlink(missing_ok=True)
        except OSError as e:  # a read-only folder, a file named like the folder, no permission
            raise UserError(f"cannot write into {out}: {e.strerror or error_line(e)} (nothing was changed)")
    else:
        raise UserError(f"cannot take the lock {lock}")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield lock
    finally:
        lock.unlink(missing_ok=True)


# The output folder of the command now running (``writing_into``): every path written inside it is
# checked not to lead out of it through a link, and recorded in its manifest of what we wrote.
_ROOT: contextvars.ContextVar[Optional[Path]] = contextvars.ContextVar("llm_output_root", default=None)
WRITTEN = ".llm-written.json"  # the manifest: paths (relative to the folder) this tool wrote there


@contextlib.contextmanager
def writing_into(out: str | os.PathLike) -> Iterator[Path]:
    """The body writes into the output folder ``out``: a path under it that a symbolic link leads
    out of the folder is refused (``check_inside``), and each file or folder written is recorded in
    ``<out>/.llm-written.json``, so that only what this tool wrote is ever removed or moved aside."""
    root = Path(os.path.abspath(out))
    token = _ROOT.set(root)
    try:
        yield root
    finally:
        _ROOT.reset(token)


def _relative(path: str | os.PathLike, root: Optional[Path]) -> Optional[Path]:
    """``path`` relative to ``root`` by name (no link followed), or None when it lies elsewhere."""
    if root is None:
        return None
    try:
        return Path(os.path.abspath(path)).relative_to(root)
    except ValueError:
        return None


def check_inside(path: str | os.PathLike, root: Optional[str | os.PathLike] = None) -> None:
    """Refuse (UserError) a ``path`` under the output folder ``root`` (default: the one of
    ``writing_into``) whose folders, links followed, lead out of it: a ``tables`` or ``plots`` that
    links elsewhere would have us write and delete files in a folder the user never gave us."""
    root = Path(os.path.abspath(root)) if root is not None else _ROOT.get()
    rel = _relative(path, root)
    if rel is None or not rel.parts:
        return
    here = Path(os.path.abspath(path)).parent
    while here != root and not os.path.lexists(here):  # the deepest folder of the path that exists (or a link)
        here = here.parent
    if here == root:  # nothing below the folder exists yet: no link to follow
        return
    real_root, real = root.resolve(), here.resolve()
    if real != real_root and real_root not in real.parents:
        raise UserError(f"{path} lies behind a symbolic link that leads out of the output folder {root} (to {real}); "
                        "this tool writes only inside it: replace the link with a folder (nothing was changed)")


def written(root: str | os.PathLike) -> set:
    """The paths (relative, as text) that this tool recorded writing into ``root``."""
    try:
        items = read_json(Path(root) / WRITTEN, limit=2 ** 24)
    except (OSError, ValueError):
        return set()
    return {x for x in items if isinstance(x, str)} if isinstance(items, list) else set()


def _save_written(root: Path, items: set) -> None:
    """The manifest itself, written atomically without being recorded in itself."""
    tmp = root / f"{TMP_PREFIX}{os.getpid()}-{WRITTEN}"
    try:
        tmp.write_text(json.dumps(sorted(items), indent=0) + "\n")
        os.replace(tmp, root / WRITTEN)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {root / WRITTEN}: {e.strerror or error_line(e)}")


def _record(path: Path) -> None:
    root = _ROOT.get()
    rel = _relative(path, root)
    if rel is None or not rel.parts or rel.name == WRITTEN:
        return
    have = written(root)
    if rel.as_posix() not in have:
        _save_written(root, have | {rel.as_posix()})


def remove_written(root: str | os.PathLike, rel: str, aside: Optional[str] = None) -> bool:
    """Remove ``<root>/<rel>`` (or, with ``aside``, move it to ``<root>/<aside>/<rel>``) only if this
    tool's manifest says it wrote it; True if there was one to remove. A file of the user's is never
    touched."""
    root = Path(os.path.abspath(root))
    have = written(root)
    path = root / rel
    # An entry that is not a plain path inside the folder ("../x", "/etc/x": an edited manifest) is never
    # acted on.
    if rel not in have or Path(rel).is_absolute() or ".." in Path(rel).parts or _relative(path, root) is None:
        return False
    check_inside(path, root)
    existed = path.exists() or path.is_symlink()
    if aside is not None and existed:
        dest = root / aside / rel
        check_inside(dest, root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(path, dest)
    elif path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    _save_written(root, have - {rel})
    return existed


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
    check_inside(path)  # inside the output folder, no link may lead out of it
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
        _record(path)
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
        # One probe per process: torchrun's ranks probe the same folder at once, and a shared name
        # lets one rank delete the other's probe between its write and its unlink.
        with tempfile.NamedTemporaryFile(dir=path, prefix=f"{TMP_PREFIX}{os.getpid()}-write-probe."):
            pass
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
