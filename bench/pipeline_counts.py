"""Shared by the pass-counting benches: run the pipeline with every step's adapter wrapped."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import llm_cli as K
import llm_main_v4 as M


def run_wrapped(argv: list, wrap: Callable) -> float:
    """Run ``llm_main_v4`` on ``argv`` with each step's adapter replaced by ``wrap(name, adapter)``
    (restored afterwards, also on error); returns the wall seconds of the whole run."""
    originals = dict(M.STEPS)
    M.STEPS.update({n: dataclasses.replace(s, adapter=wrap(n, s.adapter)) for n, s in originals.items()})
    try:
        t0 = time.perf_counter()
        M.run_pipeline(K.from_args(M.build_parser().parse_args(argv)), argv)
        return time.perf_counter() - t0
    finally:
        M.STEPS.update(originals)
