"""The module layout rule: a step module never imports another step module, and the report
(plots included) imports none, so it can be rebuilt from results.json alone."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"llm_finetune", "llm_prune_model", "llm_robustness_test", "llm_quantize_model", "llm_evaluate_models", "llm_zeroshot",
         "llm_safety",
         "llm_export", "llm_adversarial_test", "llm_integrated_analysis"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # top-level and function-level imports alike
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


SHARED = {"llm_report", "llm_common", "llm_io", "llm_model", "llm_data", "llm_variants", "llm_config", "llm_presets", "llm_knobs",
          "llm_tasks", "llm_cli", "llm_results", "llm_plots", "llm_compare", "llm_run", "llm_tracking", "llm_perplexity",
          "llm_sensitivity", "llm_compress", "llm_output_error", "llm_train", "llm_attacks", "llm_gcg", "llm_stats", "llm_report_stats",
          "llm_matrix", "llm_config_measure", "llm_report_compress", "llm_report_safety", "llm_tables", "llm_report_labels",
          "llm_figures", "llm_export_card", "llm_resume", "llm_steps", "llm_plan"}
# The plumbing that llm_common was split into, lowest first: each imports only lower layers.
# llm_train (the training loop the fine-tune and the defences share) sits on llm_model.
LAYERS = {"llm_common": 0, "llm_io": 1, "llm_data": 2, "llm_model": 2, "llm_variants": 3, "llm_train": 3}


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


def _project_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in ROOT.glob("llm_*.py")}
    return {m: (_imports(ROOT / f"{m}.py") & modules) - {m} for m in modules}


def test_the_import_graph_has_no_cycle():
    graph, state = _project_graph(), {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join([*path, m])
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, [*path, m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])


def test_shared_modules_never_import_a_step_module_and_plumbing_imports_only_lower_layers():
    graph = _project_graph()
    for m in SHARED:
        assert not graph[m] & (STEPS | {"llm_main_v4"}), m
    for m, level in LAYERS.items():
        assert all(LAYERS.get(n, 99) < level for n in graph[m]), (m, graph[m])


def test_the_old_names_in_llm_common_still_resolve_with_a_warning_naming_their_new_home():
    import importlib

    import llm_common

    assert llm_common._HOME and not set(llm_common._HOME) & set(vars(llm_common))
    for name, home in llm_common._HOME.items():
        with pytest.warns(DeprecationWarning, match=rf"llm_common\.{name} moved to {home}\.{name}"):
            got = getattr(llm_common, name)
        assert got is getattr(importlib.import_module(home), name)
    with pytest.raises(AttributeError):
        llm_common.no_such_name  # noqa: B018
    with pytest.warns(DeprecationWarning):
        exec("from llm_common import load_model", {})  # a notebook's old import (a string: see the next test)


# Not yet moved to the new homes (being changed elsewhere); they still work through the shim.
OLD_NAMES_ALLOWED: set = set()


def test_no_project_code_uses_the_old_names_of_llm_common():
    """Nothing in the project goes through the compatibility shim: every module, test and bench
    script names the new home (a monkeypatch on the old name would silently patch nothing)."""
    import llm_common

    moved = llm_common._HOME
    files = [*ROOT.glob("llm_*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/**/*.py")]
    bad = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        if rel in OLD_NAMES_ALLOWED or rel.startswith("bench/tasks/"):
            continue
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                   if a.name == "llm_common"} | {"C"}
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module == "llm_common":
                bad += [f"{rel}:{n.lineno} from llm_common import {a.name}" for a in n.names if a.name in moved]
            elif isinstance(n, ast.Attribute) and n.attr in moved and (
                    isinstance(n.value, ast.Name) and n.value.id in aliases
                    or isinstance(n.value, ast.Attribute) and n.value.attr in aliases):
                bad.append(f"{rel}:{n.lineno} {ast.unparse(n)}")
            elif (isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "setattr" and len(n.args) >= 2
                  and isinstance(n.args[0], ast.Name) and n.args[0].id in aliases
                  and isinstance(n.args[1], ast.Constant) and n.args[1].value in moved):
                bad.append(f"{rel}:{n.lineno} {ast.unparse(n)}")
    assert not bad, bad


def test_only_the_results_reader_reads_a_results_json():
    """One typed reader (llm_results): no other product module parses a results.json itself."""
    readers = {p.stem for p in ROOT.glob("llm_*.py") if "read_json(" in p.read_text()}
    assert readers <= {"llm_results", "llm_io", "llm_common"}, readers


def test_the_results_reader_knows_every_section_of_the_step_registry():
    import llm_main_v4
    import llm_results

    assert tuple(llm_results.STEP_SECTIONS) == tuple(llm_main_v4.STEPS)
    assert all(s in llm_results.SCHEMA for sections in llm_results.STEP_SECTIONS.values() for s in sections)


def _graph_lines() -> list[str]:
    """The import graph as docs/design.md prints it: the orchestrator, the steps in pipeline order,
    then the shared modules, most dependent first; each with its direct project imports in that order."""
    import llm_config

    graph = _project_graph()
    steps = [_STEP_MODULE[s] for s in llm_config.ALL_STEPS]
    depth: dict = {}

    def d(m):
        if m not in depth:
            depth[m] = 1 + max((d(n) for n in graph[m]), default=0)
        return depth[m]

    shared = sorted(SHARED, key=lambda m: (-d(m), m))
    order = ["llm_main_v4", *steps, *shared]
    return [f"{m:<24} -> " + (", ".join(n for n in order if n in graph[m]) or "-") for m in order]


_STEP_MODULE = {"finetune": "llm_finetune", "prune": "llm_prune_model", "quantize": "llm_quantize_model",
                "noise": "llm_robustness_test", "eval": "llm_evaluate_models", "zeroshot": "llm_zeroshot", "safety": "llm_safety",
                "export": "llm_export", "adversarial": "llm_adversarial_test", "analysis": "llm_integrated_analysis"}


def test_the_documented_import_graph_and_module_table_are_the_code_s():
    doc = (ROOT / "docs" / "design.md").read_text()
    block = doc.split("```\nllm_main_v4")[1].split("```")[0]
    assert ("llm_main_v4" + block).strip().splitlines() == _graph_lines(), "\n".join(_graph_lines())
    assert all(f"| `{m}.py` |" in doc for m in SHARED), sorted(m for m in SHARED if f"| `{m}.py` |" not in doc)
