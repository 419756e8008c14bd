"""Experiment trackers for the pipeline's numbers, through accelerate's trackers (``--log-to``).

    python llm_main_v4.py --log-to tensorboard,wandb

After each step, what it measured is logged once: every variant's perplexity and zero-shot
accuracies, the step's wall time and peak memory, and the pruned and quantized variants'
achieved sparsity and bits. The fine-tune logs its training curves to the same trackers
(``llm_finetune``). TensorBoard writes ``<output-dir>/tensorboard/pipeline``; W&B writes
``<output-dir>/wandb``, offline when the hub cannot be reached (``wandb sync`` uploads it later);
MLflow writes ``<output-dir>/mlruns/mlflow.db`` (SQLite; ``mlflow ui --backend-store-uri
sqlite:///<output-dir>/mlruns/mlflow.db``) unless MLFLOW_TRACKING_URI names a server, with metric
names in MLflow's alphabet (``perplexity/pruned:wanda:0.5:unstructured``). Only rank 0 logs.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import urllib.parse
from pathlib import Path
from typing import Optional

import llm_common as C
import llm_results as R
from llm_knobs import trackers_of

log = logging.getLogger("llm.tracking")
def open_tracker(name: str, out: Path, run_name: str):
    """One accelerate tracker, started; UserError when its library is not installed."""
    from accelerate import tracking

    try:
        if name == "tensorboard":
            t = tracking.TensorBoardTracker(run_name, logging_dir=str(out / "tensorboard"))
        elif name == "wandb":
            t = tracking.WandBTracker("llm-sensitivity", name=run_name, dir=str(out), mode=wandb_mode())
        else:
            t = tracking.MLflowTracker(experiment_name="llm-sensitivity", logging_dir=str(out / "mlruns"),
                                       run_name=run_name)
            mlflow_store(out)
        t.start()
    except ImportError as e:
        raise C.UserError(f"--log-to {name} needs its library ({e.name}): pip install {INSTALL[name]}")
    return t


_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_installed(names: tuple) -> None:
    """UserError naming the pip command for a tracker whose library is missing (before any model loads)."""
    for n in names:
        if importlib.util.find_spec(_MODULES[n]) is None:
            raise C.UserError(f"--log-to {n} needs its library ({_MODULES[n]}): pip install {INSTALL[n]}")


def _server(url: str) -> Optional[tuple]:
    """(host, port) of an http(s) URL, else None (a local store)."""
    u = urllib.parse.urlparse(url or "")
    if u.scheme not in ("http", "https") or not u.hostname:
        return None
    return u.hostname, u.port or (443 if u.scheme == "https" else 80)


def reachable_trackers(names: tuple) -> tuple:
    """``names`` without MLflow when MLFLOW_TRACKING_URI names a server that does not answer (its
    client would retry for minutes, then raise): a warning, and the run goes on without it. W&B
    falls back to offline instead (``wandb_mode``)."""
    server = _server(os.environ.get("MLFLOW_TRACKING_URI", ""))
    if "mlflow" in names and server and not C.reachable(server[0], port=server[1]):
        log.warning("--log-to mlflow: the MLflow server %s does not answer; not logging to MLflow this run",
                    os.environ["MLFLOW_TRACKING_URI"])
        return tuple(n for n in names if n != "mlflow")
    return names


INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny sqlalchemy alembic"}


def mlflow_store(out: Path) -> None:
    """MLflow's store: MLFLOW_TRACKING_URI when set (a server), else ``<out>/mlruns/mlflow.db``.
    accelerate passes our folder only as the artifact location, so the runs themselves would go
    to the working directory; and MLflow 3 refuses its file store, so the local one is SQLite."""
    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        (out / "mlruns").mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{(out / 'mlruns' / 'mlflow.db').resolve()}")


def mlflow_key(key: str) -> str:
    """A metric name MLflow takes (alphanumerics and ``_-. :/``): ``perplexity/pruned[wanda,0.5,
    unstructured]`` -> ``perplexity/pruned:wanda:0.5:unstructured``."""
    return re.sub(r"[^\w\-. :/]", "_", key.replace("[", ":").replace(",", ":").replace("]", ""))


def wandb_mode() -> str:
    """W&B's mode: offline when its server (WANDB_BASE_URL, else api.wandb.ai) does not answer,
    whatever WANDB_MODE says (online would raise CommError after a minute), else WANDB_MODE or
    online. ``wandb sync`` uploads an offline run later."""
    mode = os.environ.get("WANDB_MODE")
    if mode in ("offline", "disabled", "dryrun"):
        return mode
    host, port = _server(os.environ.get("WANDB_BASE_URL", "")) or ("api.wandb.ai", 443)
    if C.reachable(host, port=port):
        return mode or "online"
    log.warning("--log-to wandb: the W&B server %s:%s does not answer; logging offline (wandb sync uploads it)",
                host, port)
    return "offline"


def step_metrics(step: str, results: dict) -> dict:
    """The numbers a step added to ``results``, flat and finite, for a tracker."""
    m = R.field(results, "manifest", "steps", step, kind=dict, default={})
    out = {f"step/{step}/wall_s": m.get("wall_s"), f"step/{step}/peak_rss_mib": m.get("peak_rss_mib", m.get("peak_memory_mb"))}
    if step == "eval":
        out.update({f"perplexity/{v}": R.num(p) for v, p in R.field(results, "perplexity", kind=dict, default={}).items()})
    if step == "zeroshot":
        for v, tasks in R.field(results, "zeroshot", "tasks", kind=dict, default={}).items():
            for task, metrics in (tasks or {}).items():
                for k in ("acc", "acc_norm"):
                    out[f"zeroshot/{v}/{task}/{k}"] = R.num(R.field(metrics, k))
        out.update({f"zeroshot/{v}/mean": R.num(R.field(m_, "acc"))
                    for v, m_ in R.field(results, "zeroshot", "mean", kind=dict, default={}).items()})
    if step == "safety":
        for v, row in R.field(results, "safety", "variants", kind=dict, default={}).items():
            for k in ("refusal", "harmful_rate", "over_refusal", "jailbreak"):
                out[f"safety/{v}/{k}"] = R.num(R.field(row, k, "rate"))
    if step == "prune":
        out.update({f"sparsity/{n}": R.num(r.get("overall_sparsity")) for n, r in R.variant_records(results, "prune",
                                                                                                   "pruned")})
    if step == "quantize":
        out["bits/quantized"] = R.num(R.field(results, "quantize", "avg_bits"))
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


class Trackers:
    """The run's trackers: ``with Trackers(names, out, name, config) as t: ...; t.open(); t.step(step,
    results)``. They are opened by the first step that runs (``open``), so a rerun whose every step
    is skipped logs nothing twice. A tracker that fails (a server that stops answering, a full
    disk) is a warning, and the run goes on without it."""

    def __init__(self, names: tuple, out: Path, run_name: str, config: Optional[dict] = None):
        self.names, self.out, self.run_name, self.config = trackers_of(names), Path(out), run_name, config or {}
        self.trackers, self.k, self.opened = [], 0, False

    def __enter__(self) -> "Trackers":
        check_installed(self.names)
        return self

    def open(self) -> None:
        if self.opened or C.dist_rank_world()[0] != 0:
            return
        self.opened = True
        for n in reachable_trackers(self.names):
            t = self._guarded(n, lambda: open_tracker(n, self.out, self.run_name))
            if t is not None and self._guarded(n, lambda: t.store_init_configuration(
                    _named_for(t, _flat(self.config))) or True):
                self.trackers.append(t)

    def step(self, step: str, results: dict) -> None:
        values = step_metrics(step, results)
        self.k += 1
        for t in list(self.trackers):
            if self._guarded(t.name, lambda: t.log(_named_for(t, values), step=self.k) or True) is None:
                self.trackers.remove(t)

    def __exit__(self, *exc) -> None:
        for t in self.trackers:
            self._guarded(t.name, t.finish)

    @staticmethod
    def _guarded(name: str, call):
        """``call()``, or None with a warning when the tracker fails (its results are in results.json)."""
        try:
            return call()
        except C.UserError:
            raise
        except Exception as e:  # any library's own error: requests', wandb's CommError, MlflowException
            log.warning("--log-to %s failed (%s); the run goes on without it", name, C.error_line(e))
            return None


def _named_for(tracker, values: dict) -> dict:
    """``values`` with names the tracker takes: MLflow's alphabet for MLflow, as they are elsewhere."""
    return {mlflow_key(k): v for k, v in values.items()} if tracker.name == "mlflow" else values


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested config -> {"prune/sparsity": 0.5, ...} of numbers, booleans and strings (what
    every tracker's hyperparameter store takes)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str)) for x in v):
            out[key] = ",".join(map(str, v))  # as the flag takes it: --prune-method magnitude,wanda
        elif v is not None:
            out[key] = str(v)
    return out
