"""The module layout rule: a step module never imports another step module, and the report
(plots included) imports none, so it can be rebuilt from results.json alone."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"llm_finetune", "llm_prune_model", "llm_robustness_test", "llm_evaluate_models", "llm_adversarial_test",
         "llm_integrated_analysis"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # top-level and function-level imports alike
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", sorted(STEPS | {"llm_report", "llm_common", "llm_perplexity", "llm_sensitivity"}))
def test_no_step_module_imports_another(module):
    assert not (_imports(ROOT / f"{module}.py") & STEPS) - {module}


def test_report_loads_no_step_module():
    code = ("import sys, llm_report; print(sorted(m for m in sys.modules if m.startswith('llm_')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert not set(eval(out)) & STEPS
