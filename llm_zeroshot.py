"""The zeroshot step: zero-shot accuracy of every variant through lm-evaluation-harness.

    res = evaluate_zeroshot(model, tokenizer, {"base": None, "pruned": "pruned.safetensors"},
                            ZeroShotConfig(tasks=("boolq", "rte")), parents={"pruned": "base"})
    res.mean["pruned"]["acc"], res.tasks["pruned"]["rte"]["acc"]

The protocol of the Wanda, SparseGPT and Super Weight papers: EleutherAI's lm-evaluation-harness
(``lm_eval``) scores multiple-choice tasks by the log-likelihood of each choice, zero-shot, with
its own prompts, metrics and standard errors. We do not re-implement any of that: the live model
and tokenizer are wrapped in lm-eval's ``HFLM`` class and handed to ``lm_eval.simple_evaluate``,
one variant at a time, with the variant's weights swapped in (in place, restored on exit), so no
variant is saved and reloaded to be scored. A number here is lm-eval's number for that model.

Where a task cannot be had (offline and not in the ``datasets`` cache, an unknown name, lm-eval
not installed), the task is listed under ``unavailable`` with the reason, logged as a warning,
and the other tasks still run: nothing is dropped silently.

Every variant whose parent was scored in the same call is tested against it on the same
questions: lm-eval's per-sample outputs give each question's correctness (``questions``), and
``paired`` holds McNemar's exact test (``llm_stats.mcnemar_exact``) per task and for the mean,
whose test pools the questions of every task.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import importlib.metadata
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional
from unittest import mock

import numpy as np
import torch

import llm_common as C
import llm_data as D
import llm_model as LM
import llm_variants as V
from llm_config import ZEROSHOT_TASKS, ZeroShotConfig
from llm_run import Run
from llm_stats import mcnemar_exact

__all__ = ["ZEROSHOT_TASKS", "ZeroShotConfig", "ZeroShotResult", "evaluate_zeroshot", "task_metrics"]

log = logging.getLogger("llm.zeroshot")


@dataclass
class ZeroShotResult:
    status: str                    # "ran", "off" or "unavailable" (the reason is in ``reason``)
    tasks: dict = field(default_factory=dict)        # variant -> task -> metrics (acc, acc_stderr, acc_norm, ..., n)
    mean: dict = field(default_factory=dict)         # variant -> {acc, acc_stderr, acc_norm, acc_norm_stderr, tasks}
    unavailable: dict = field(default_factory=dict)  # task -> why it could not be evaluated
    parents: dict = field(default_factory=dict)      # variant -> the variant it was derived from
    protocol: dict = field(default_factory=dict)     # lm-eval version, task versions, shots, limit, seeds
    reason: str = ""
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    # variant -> leaf task -> {"metric": "acc", "correct": "0110..." (one character per question, in
    # doc_id order), "doc_ids": [...] only where they are not 0..n-1}: a string, not a list, so
    # results.json keeps ten thousand questions on one line.
    questions: dict = field(default_factory=dict)
    # variant -> leaf task -> requests whose tokens lm-eval cut from the left to fit the model's
    # max length (``protocol["max_length"]``): their scores saw part of the question only.
    truncated: dict = field(default_factory=dict)
    # variant -> {task: mcnemar_exact(parent, variant) + "metric", "mean": the same over the pooled
    # questions of every task, "parent": its name}, for each variant whose parent was scored too.
    paired: dict = field(default_factory=dict)


# The per-question metric the paired test reads, in order of preference: the one the tables report.
PAIRED_METRICS = ("acc", "exact_match")


def task_metrics(row: Mapping) -> dict:
    """lm-eval's per-task result row -> {metric: value, metric_stderr: value}. lm-eval keys
    metrics as "name,filter"; the default filter "none" is dropped from the name, others are
    kept as "name/filter". Non-numeric stderrs ("N/A") become None."""
    out = {}
    for key, v in row.items():
        if "," not in key or isinstance(v, bool):
            continue
        name, filt = key.split(",", 1)
        name = name if filt == "none" else f"{name}/{filt}"
        out[name] = float(v) if isinstance(v, (int, float)) else None
    return out


def _task_mean(per_task: Mapping[str, dict]) -> dict:
    """Unweighted mean over tasks, as the papers average: acc over every task that has it, and
    acc_norm where a task reports it, acc elsewhere. Its stderr treats tasks as independent."""
    out = {"tasks": len(per_task)}
    for key, pick in (("acc", lambda m: m.get("acc")),
                      ("acc_norm", lambda m: m.get("acc_norm", m.get("acc")))):
        rows = [(pick(m), m.get(f"{key}_stderr", m.get("acc_stderr"))) for m in per_task.values()]
        vals = [v for v, _ in rows if v is not None]
        out[key] = sum(vals) / len(vals) if vals else None
        ses = [s for v, s in rows if v is not None]
        out[f"{key}_stderr"] = (math.sqrt(sum(s * s for s in ses)) / len(ses)
                                if ses and all(isinstance(s, float) for s in ses) else None)
    return out


@contextlib.contextmanager
def _quiet():
    """lm-eval logs every prompt it builds and warns, once per variant, that a model object was
    passed instead of a name (what we mean to do): keep our log to what matters. Restored on exit."""
    quiet = {"lm_eval": logging.WARNING, "lm_eval.models.huggingface": logging.ERROR,
             "lm_eval.evaluator": logging.ERROR}  # "overwriting num_fewshot from None to 0": zero-shot is what we ask
    loggers = [logging.getLogger(n) for n in quiet]
    levels = [lg.level for lg in loggers]
    for lg, lv in zip(loggers, quiet.values()):
        lg.setLevel(lv)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _count_truncated(lm, counts: dict) -> None:
    """Count, per task, the requests that ``lm`` (an HFLM) will truncate, into ``counts``
    {task: n}, by wrapping its methods on this instance. A log-likelihood request is cut where
    context + continuation tokens exceed max_length + 1 (HFLM ``_loglikelihood_tokens``; we see
    its own encodings); a generation request where its context tokens exceed max_length minus
    its max_gen_toks (HFLM ``generate_until``). lm-eval's own warnings name no task, and our
    log filter keeps them out of the log."""
    ll, tokens, gen, tasks = lm.loglikelihood, lm._loglikelihood_tokens, lm.generate_until, []

    def loglikelihood(requests, *a, **k):
        tasks[:] = [r.task_name for r in requests]  # its ``_loglikelihood_tokens`` keeps this order
        try:
            return ll(requests, *a, **k)
        finally:
            tasks.clear()

    def loglikelihood_tokens(reqs, *a, **k):
        for task, (_, ctx, cont) in zip(tasks or [None] * len(reqs), reqs):
            counts[task] = counts.get(task, 0) + (len(ctx) + len(cont) > lm.max_length + 1)
        return tokens(reqs, *a, **k)

    def generate_until(requests, *a, **k):
        for r in requests:
            context, kw = r.args[0], r.args[1] if len(r.args) > 1 and isinstance(r.args[1], dict) else {}
            room = lm.max_length - int(kw.get("max_gen_toks", lm.max_gen_toks))
            counts[r.task_name] = counts.get(r.task_name, 0) + (len(lm.tok_encode(context)) > room)
        return gen(requests, *a, **k)

    lm.loglikelihood, lm._loglikelihood_tokens, lm.generate_until = loglikelihood, loglikelihood_tokens, generate_until


def _one_process():
    """lm-eval returns results only where LOCAL_RANK is 0: it takes the ranks of a torchrun
    launch for shards of one tensor-parallel model. Our ranks each score whole variants of their
    own (``shard_jobs``), so each is a single process to lm-eval. Restored on exit."""
    return mock.patch.dict(os.environ, {"LOCAL_RANK": "0"})


def _available(task_manager, tasks) -> tuple[list, list, dict]:
    """Load each task alone: the specs whose data can be had, the result rows that stand for
    them (a task's own name, also for a YAML path; a group's aggregate row, not its subtasks),
    and why the others cannot be had."""
    ok, rows, missing = [], [], {}
    for name in tasks:
        try:
            loaded = task_manager.load([name])
        except Exception as e:  # noqa: BLE001 - any failure to get a task's data means "unavailable"
            missing[name] = C.error_line(e)
            log.warning("zero-shot task %s unavailable (%s); the other tasks still run", name, missing[name])
            continue
        ok.append(name)
        children = {c for cs in (loaded.get("group_map") or {}).values() for c in cs}
        rows += [g for g in loaded.get("groups") or {} if g not in children] or list(loaded.get("tasks") or {})
    return ok, rows, missing


def _scored(out: dict) -> tuple[dict, dict, dict]:
    """One ``simple_evaluate`` output, cut to what is kept (small, so ranks can gather it):
    ({task: metrics and n}, {"versions", "seeds", "subtasks"}, {leaf task: its questions})."""
    got, n = out["results"], out.get("n-samples", {})
    seeds = {k: (out.get("config") or {}).get(k) for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")}
    return ({t: {**task_metrics(got[t]), "n": n.get(t, {}).get("effective")} for t in got},
            {"versions": out.get("versions") or {}, "seeds": seeds, "subtasks": out.get("group_subtasks") or {}},
            {t: q for t, rows in (out.get("samples") or {}).items() if (q := task_questions(rows)) is not None})


def task_questions(samples: list) -> Optional[dict]:
    """lm-eval's logged samples of one task -> {"metric", "correct": "0110..."} in doc_id order
    (plus "doc_ids" where they are not 0..n-1), for the first metric of ``PAIRED_METRICS`` that
    every sample has as 0 or 1, under the first filter; None when no metric is (the task then
    gets no paired test, which the report shows as "-")."""
    if not samples:
        return None
    filt = samples[0].get("filter")
    rows = sorted((s for s in samples if s.get("filter") == filt), key=lambda s: s["doc_id"])
    for metric in PAIRED_METRICS:
        vals = [s.get(metric) for s in rows]
        if all(isinstance(v, (bool, int, float)) and v in (0, 1) for v in vals):
            ids = [int(s["doc_id"]) for s in rows]
            return {"metric": metric, "correct": "".join("1" if v else "0" for v in vals),
                    **({} if ids == list(range(len(ids))) else {"doc_ids": ids})}
    log.info("zero-shot: no 0/1 metric (%s) per question: no paired test", ", ".join(PAIRED_METRICS))
    return None


def _leaves(task: str, questions: Mapping, subtasks: Mapping, seen: frozenset = frozenset()) -> list:
    """The leaf tasks whose questions make up a result row (the task itself, or a group's subtasks)."""
    if task in questions:
        return [task]
    return [leaf for c in subtasks.get(task, ()) if c not in seen
            for leaf in _leaves(c, questions, subtasks, seen | {task})]


def paired_tests(parent: Mapping, variant: Mapping, rows: list, subtasks: Mapping) -> dict:
    """McNemar's exact test of ``variant`` against ``parent`` (each: leaf task -> questions) on
    every result row whose questions both have, the same ones under the same metric, and on
    the pooled questions of all of them ("mean"). Rows that cannot be paired are left out."""
    def same(t):
        a, b = parent.get(t), variant.get(t)
        return bool(a and b) and (a["metric"], len(a["correct"]), a.get("doc_ids")) == (
            b["metric"], len(b["correct"]), b.get("doc_ids"))

    def bits(q, ts):
        return np.concatenate([np.frombuffer(q[t]["correct"].encode(), np.uint8) - ord("0") for t in ts])

    out, pooled = {}, []
    for row in rows:
        leaves = _leaves(row, variant, subtasks)
        if leaves and all(same(t) for t in leaves):
            out[row] = {**mcnemar_exact(bits(parent, leaves), bits(variant, leaves)),
                        "metric": variant[leaves[0]]["metric"]}
            pooled += [t for t in leaves if t not in pooled]
    if pooled:
        out["mean"] = {**mcnemar_exact(bits(parent, pooled), bits(variant, pooled)), "tasks": len(pooled),
                       "pooled": "the questions of every task, in one test"}
    return out


def evaluate_zeroshot(model, tokenizer, variants: Mapping[str, object], config: ZeroShotConfig = ZeroShotConfig(),
                      parents: Optional[Mapping[str, Optional[str]]] = None) -> ZeroShotResult:
    """lm-eval accuracy of every variant of ``model`` (see ``llm_common.applied_variant`` for
    what a variant may be) on ``config.tasks``. The model is changed in place for each variant
    and restored bit for bit; the tokenizer is copied, since lm-eval sets its padding token.
    Under ``accelerate launch`` or torchrun the ranks take disjoint variants and every rank
    gets all the results."""
    config = config.for_model(model)
    parents = {n: (parents or {}).get(n) for n in variants}
    res = ZeroShotResult("off", parents=parents, config=asdict(config))
    if not config.enabled:
        res.reason = "off (the CPU default); --zeroshot on or --tasks turns it on"
        log.info("zero-shot evaluation %s", res.reason)
        return res
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        res.status, res.reason = "unavailable", f"lm-eval is not installed ({C.error_line(e)}); pip install lm_eval"
        log.warning("zero-shot evaluation skipped: %s", res.reason)
        return res
    t0 = time.perf_counter()
    offline = not C.hub_reachable()
    with D.datasets_offline(offline), _quiet():
        manager = TaskManager(include_path=config.include_path)
        names, rows, res.unavailable = _available(manager, config.tasks)
        if offline and res.unavailable:
            log.warning("the hub is unreachable: only tasks in the local datasets cache can be evaluated")
        if not names:
            unknown = [t for t in config.tasks if t not in manager.all_tasks and not os.path.isfile(os.path.expanduser(t))]
            if unknown:  # a misspelled name is the user's error, not missing data: stop, as lm-eval's CLI does
                close = {t: difflib.get_close_matches(t, manager.all_tasks, n=1) for t in unknown}
                raise C.UserError("--tasks: no requested task could run; lm-eval knows no task named " + ", ".join(
                    f"{t!r}" + (f" (did you mean {close[t][0]!r}?)" if close[t] else "") for t in unknown))
            res.status, res.reason = "unavailable", "no task could be loaded (see unavailable)"
            return res
        batch = config.batch_size or ("auto" if LM.is_cuda_model(model) else 1)
        multiturn = config.apply_chat_template and config.fewshot_as_multiturn is not False  # auto: as lm-eval's CLI
        mine = []  # under accelerate launch / torchrun each rank takes every world_size-th variant
        for i, (name, weights) in C.shard_jobs(list(variants.items())):
            log.info("zero-shot: variant %r on %s", name, ", ".join(names))
            with V.applied_variant(model, weights), torch.no_grad(), _one_process():
                lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch)
                cut: dict = {}
                _count_truncated(lm, cut)
                out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager,
                                              num_fewshot=config.num_fewshot, limit=config.limit or None,
                                              apply_chat_template=config.apply_chat_template,
                                              fewshot_as_multiturn=multiturn,
                                              log_samples=True)  # per question: the paired tests
            cut.pop(None, None)  # rolling log-likelihood windows: fitted to max_length, never cut
            if any(cut.values()):
                log.warning("zero-shot: variant %r: lm-eval truncated %s from the left to the model's %d tokens; "
                            "those questions were scored on part of their text", name, ", ".join(
                                f"{n} requests of {t}" for t, n in sorted(cut.items()) if n), lm.max_length)
            mine.append((i, (name, *_scored(out), {"truncated": cut, "max_length": lm.max_length})))
    runs = C.gather_jobs(mine)
    for name, tasks, _, questions, cut in runs:
        res.tasks[name] = tasks
        res.truncated[name] = cut["truncated"]
        res.mean[name] = _task_mean({t: tasks[t] for t in rows if t in tasks})
        res.questions[name] = questions
    first = runs[0][2]
    for name, parent in parents.items():
        if parent in res.questions and name in res.questions:
            tests = paired_tests(res.questions[parent], res.questions[name], rows, first["subtasks"])
            if tests:
                res.paired[name] = {**tests, "parent": parent}
    res.status, res.seconds = "ran", time.perf_counter() - t0
    res.protocol = {"lm_eval": importlib.metadata.version("lm_eval"), "tasks": rows, "specs": names,
                    "task_versions": first["versions"], "num_fewshot": config.num_fewshot,
                    "limit": config.limit or None, "batch_size": str(batch), "offline": offline,
                    "seeds": first["seeds"], "apply_chat_template": config.apply_chat_template,
                    "fewshot_as_multiturn": multiturn, "max_length": runs[0][4]["max_length"],
                    "truncated_requests": sum(n for cut in res.truncated.values() for n in cut.values())}
    return res


def pipeline_step(run: Run, config: ZeroShotConfig) -> Optional[str]:
    """The pipeline's zero-shot step: every variant on the tasks; "off" when not asked for."""
    res = evaluate_zeroshot(run.model, run.tokenizer, run.variants, config, run.parents)
    run.results["zeroshot"] = asdict(res)
    return "off" if res.status == "off" else None


def _chat_template_on_disk(model: Optional[str]) -> Optional[bool]:
    """Whether the local ``save_pretrained`` folder ``model`` ships a chat template (in
    tokenizer_config.json, chat_template.jinja or chat_template.json); None where that cannot be
    told before loading (a hub id, a GGUF file, the embedded model)."""
    folder = Path(os.path.expanduser(model)) if model else None
    if folder is None or not (folder / "tokenizer_config.json").is_file():
        return None
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return bool(cfg.get("chat_template")) if isinstance(cfg, dict) else None


_NO_TEMPLATE = ("--apply-chat-template: the tokenizer of {} has no chat template, so lm-eval cannot apply one; drop "
                "--apply-chat-template (and --fewshot-as-multiturn), or use a chat model")


def prepare(config: ZeroShotConfig, asked: ZeroShotConfig, run_config, texts: dict) -> ZeroShotConfig:
    """Before loading: --apply-chat-template with a local model whose tokenizer has no chat template
    is refused now, not by lm-eval after the model has loaded."""
    if config.enabled and config.apply_chat_template and _chat_template_on_disk(run_config.model) is False:
        raise C.UserError(_NO_TEMPLATE.format(run_config.model))
    return config


def check_tokenizer(tokenizer, config: ZeroShotConfig) -> None:
    """Right after loading (a hub model, GGUF): the same refusal, from the loaded tokenizer."""
    if config.enabled and config.apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise C.UserError(_NO_TEMPLATE.format(getattr(tokenizer, "name_or_path", None) or "this model"))
