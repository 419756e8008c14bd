"""The module layout rule: a step module never imports another step module, and the report
(plots included) imports none, so it can be rebuilt from results.json alone."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"llm_finetune", "llm_prune_model", "llm_robustness_test", "llm_quantize_model", "llm_evaluate_models", "llm_zeroshot",
         "llm_export", "llm_adversarial_test", "llm_integrated_analysis"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # top-level and function-level imports alike
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


SHARED = {"llm_report", "llm_common", "llm_config", "llm_perplexity", "llm_sensitivity", "llm_compress"}


@pytest.mark.parametrize("module", sorted(STEPS | SHARED))
def test_no_step_module_imports_another(module):
    assert not (_imports(ROOT / f"{module}.py") & STEPS) - {module}


def test_the_registry_runs_every_step_in_pipeline_order():
    import llm_config
    import llm_main_v4

    assert tuple(llm_main_v4.STEPS) == llm_config.ALL_STEPS == tuple(llm_config.STEP_CONFIGS)


def test_every_module_is_covered_and_installed():
    """Each flat module is a step, a shared module or the orchestrator, and pyproject installs all of them."""
    on_disk = {p.stem for p in ROOT.glob("llm_*.py")}
    assert on_disk == STEPS | SHARED | {"llm_main_v4"}
    assert all(f'"{m}"' in (ROOT / "pyproject.toml").read_text() for m in on_disk)


def test_modules_import_from_any_folder(tmp_path):
    """A notebook elsewhere imports the modules without touching sys.path (pip install -e .)."""
    code = "import llm_prune_model, llm_config; print(llm_prune_model.__file__)"
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-500:]
    assert Path(out.stdout.strip()).parent == ROOT


def test_imports_sit_at_the_top():
    """Step modules import at module level (the orchestrator imports step modules lazily, by design)."""
    for module in STEPS | SHARED:
        tree = ast.parse((ROOT / f"{module}.py").read_text())
        top = {id(n) for n in tree.body}
        inner = [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top]
        assert len(inner) <= 3, (module, inner)


def test_report_loads_no_step_module():
    code = ("import sys, llm_report; print(sorted(m for m in sys.modules if m.startswith('llm_')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert not set(eval(out)) & STEPS
