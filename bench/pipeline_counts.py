"""Shared by the pass-counting benches: run the pipeline with every step's ``pipeline_step`` wrapped."""
from __future__ import annotations

import importlib
import time
from typing import Callable

import llm_cli as K
import llm_main_v4 as M
import llm_steps


def run_wrapped(argv: list, wrap: Callable) -> float:
    """Run ``llm_main_v4`` on ``argv`` with each step's adapter ``(run, module, config)`` replaced by
    ``wrap(name, adapter)`` (restored afterwards, also on error); returns the wall seconds of the run."""
    original = llm_steps.hook

    def hooked(step: str, name: str):
        fn = original(step, name)
        if name != "pipeline_step":
            return fn
        mod = importlib.import_module(llm_steps.STEPS[step].module)
        wrapped = wrap(step, lambda run, _mod, cfg: fn(run, cfg))
        return lambda run, cfg: wrapped(run, mod, cfg)

    llm_steps.hook = hooked  # every caller looks the hook up through llm_steps, so this wraps every step
    try:
        t0 = time.perf_counter()
        M.run_pipeline(K.from_args(M.build_parser().parse_args(argv)), argv)
        return time.perf_counter() - t0
    finally:
        llm_steps.hook = original
