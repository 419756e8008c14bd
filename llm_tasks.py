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
import re
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


class _TaskYamlLoader(yaml.SafeLoader):
    """lm-eval's task YAML, read as data: a tag such as ``!function utils.process_docs`` becomes
    the text "!function utils.process_docs" (nothing is imported)."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, tag, node: f"!{tag} {loader.construct_scalar(node)}"
                                      if isinstance(node, yaml.ScalarNode) else f"!{tag}")


def local_task_files(tasks: tuple, include_path: Optional[str]) -> tuple[list, list]:
    """(every local file the zero-shot tasks read, sorted: the YAMLs in ``include_path`` and those
    named by path, with every file or folder a YAML names (data files, included YAMLs, the Python
    module of a ``!function``); the YAMLs among them that run Python code). lm-eval's own task
    folder is left out: its files come with the library and its version is recorded."""
    own = _lm_eval_tasks_dir()
    files, code, queue = set(), [], []
    folder = os.path.expanduser(include_path or "")
    if folder and os.path.isdir(folder):
        for root, dirs, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                if _regular(path, "--tasks-include"):
                    files.add(path)
                    queue += [path] if name.endswith(_YAML_SUFFIXES) else []
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
            text = f.read(IO.MAX_JSON_BYTES).decode("utf-8", "replace")
        if re.search(r"!function\b", text):
            code.append(path)
        try:
            doc = yaml.load(text, Loader=_TaskYamlLoader)
        except yaml.YAMLError:
            continue  # lm-eval reports it when it loads the task
        for value in _strings(doc):
            if value.startswith("!function "):  # module.function, the module beside the YAML
                value = value.split(" ", 1)[1].rsplit(".", 1)[0].replace(".", os.sep) + ".py"
            ref = os.path.join(os.path.dirname(path), os.path.expanduser(value))
            if len(value) > 4096 or "\n" in value or value.strip() in ("", ".", "..") or not os.path.lexists(ref):
                continue
            refs = [os.path.join(r, n) for r, _, ns in os.walk(ref) for n in ns] if os.path.isdir(ref) else [ref]
            for r in refs:
                if r not in files and _regular(r, f"zero-shot task {path}"):
                    files.add(r)
                    queue += [r] if r.endswith(_YAML_SUFFIXES) else []
    return sorted(files), sorted(code)


def _strings(doc) -> list:
    """Every string value in a parsed YAML document, nested ones included."""
    if isinstance(doc, str):
        return [doc]
    if isinstance(doc, dict):
        return [s for v in doc.values() for s in _strings(v)]
    if isinstance(doc, list):
        return [s for v in doc for s in _strings(v)]
    return []
