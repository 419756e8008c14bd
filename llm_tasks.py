"""Local lm-evaluation-harness task files: which files a zero-shot task reads, and which run code.

A task YAML may name data files, other YAMLs and, through ``!function``, a Python module that
lm-eval would import. The zero-shot config hashes every such file into its resume fingerprint
(an edited task reruns the step) and refuses tasks that run code without ``--trust-remote-code``.
The YAML is read as data here: nothing is imported.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import stat
from typing import Optional

import yaml

import llm_io as IO
from llm_common import UserError

log = logging.getLogger("llm.config")

_YAML_SUFFIXES = (".yaml", ".yml")


def _lm_eval_tasks_dir() -> Optional[str]:
    """lm-eval's own installed task folder (its tasks' code ships with the library), found
    without importing lm_eval (seconds)."""
    spec = importlib.util.find_spec("lm_eval")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return os.path.realpath(os.path.join(locations[0], "tasks")) if locations else None


def _regular(path: str, what: str) -> bool:
    """Whether ``path`` is a regular file (links followed). A task YAML that is not (a FIFO would
    hang lm-eval, a dangling link fails inside it) is refused; other entries are skipped."""
    try:
        ok = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        ok = False
    if not ok and path.endswith(_YAML_SUFFIXES):
        raise UserError(f"{what}: {path} is not a regular file (a dangling link, a FIFO or a device); remove it")
    if not ok:
        log.warning("%s: skipping %s, which is not a regular file", what, path)
    return ok


class _Function(str):
    """What lm-eval's loader would import: the ``module.function`` text of a ``!function`` node."""


# lm-eval's own base (lm_eval.tasks._yaml_loader): the same parser resolves the same tags.
_Base = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader


class _TaskYamlLoader(_Base):
    """lm-eval's task YAML, read as data with the constructor lm-eval adds in place, refused: the
    check is made on the tag the parser resolves, not on its spelling, so ``!function``,
    ``!f%75nction``, ``!<!function>`` and a ``%TAG`` handle all give a ``_Function`` and nothing is
    imported. Other tags become text."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: _Function(
    loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else "?"))
_TaskYamlLoader.add_multi_constructor("!", lambda loader, tag, node: f"!{tag} {loader.construct_scalar(node)}"
                                      if isinstance(node, yaml.ScalarNode) else f"!{tag}")
_TaskYamlLoader.add_multi_constructor("tag:", lambda loader, tag, node: f"tag:{tag}")


def _walk(folder: str):
    """Every file under ``folder``, links to folders followed as lm-eval's ``glob("**")`` does,
    each real folder once (a link cycle ends)."""
    seen = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield from (os.path.join(root, n) for n in names)


def local_task_files(tasks: tuple, include_path: Optional[str]) -> tuple[list, list]:
    """(every local file the zero-shot tasks read, sorted: the YAMLs in ``include_path`` and those
    named by path, with every file or folder a YAML names (data files, included YAMLs, the Python
    module of a ``!function``), relative to the YAML's folder or, as lm-eval resolves them, to
    its real folder behind links; the YAMLs among them that run Python code). lm-eval's own task
    folder is left out: its files come with the library and its version is recorded."""
    own = _lm_eval_tasks_dir()
    files, code, queue = set(), [], []
    folder = os.path.expanduser(include_path or "")
    if folder and os.path.isdir(folder):
        for path in _walk(folder):
            if _regular(path, "--tasks-include"):
                files.add(path)
                queue += [path] if path.endswith(_YAML_SUFFIXES) else []
    for t in tasks:
        path = os.path.expanduser(t)
        if (t.endswith(_YAML_SUFFIXES) or os.sep in t) and os.path.lexists(path) and _regular(path, "--tasks"):
            files.add(path)
            queue.append(path)
    seen = set()
    while queue:
        path = queue.pop()
        real = os.path.realpath(path)
        if real in seen or (own and real.startswith(own + os.sep)):
            continue
        seen.add(real)
        with open(path, "rb") as f:
            raw = f.read(IO.MAX_JSON_BYTES)
        try:  # bytes, as lm-eval reads them: the parser finds a UTF-16 file's encoding by its BOM
            doc = yaml.load(raw, Loader=_TaskYamlLoader)
        except (yaml.YAMLError, RecursionError):
            continue  # lm-eval's loader, on the same parser, fails on it too
        values = _strings(doc)
        if any(isinstance(v, _Function) for v in values):
            code.append(path)
        for value in values:
            if isinstance(value, _Function):  # module.function, the module beside the real YAML
                value = value.rsplit(".", 1)[0].replace(".", os.sep) + ".py"
            if len(value) > 4096 or "\n" in value or "\0" in value or value.strip() in ("", ".", ".."):
                continue
            for base in dict.fromkeys((os.path.dirname(path), os.path.dirname(real))):
                ref = os.path.join(base, os.path.expanduser(value))
                if not os.path.lexists(ref):
                    continue
                for r in _walk(ref) if os.path.isdir(ref) else [ref]:
                    if r not in files and _regular(r, f"zero-shot task {path}"):
                        files.add(r)
                        queue += [r] if r.endswith(_YAML_SUFFIXES) else []
    return sorted(files), sorted(code)


def _strings(doc) -> list:
    """Every string in a parsed YAML document, keys and nested ones included."""
    if isinstance(doc, str):
        return [doc]
    if isinstance(doc, dict):
        return [s for kv in doc.items() for v in kv for s in _strings(v)]  # a key is constructed too
    if isinstance(doc, list):
        return [s for v in doc for s in _strings(v)]
    return []
