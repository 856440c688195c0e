"""The layers of the code, enforced: data flows one way, and each layer imports only what
is below it.

    base (errors, names, files, numbers, plots, redaction)  <  inputs  <  models  <  patching
        <  audit  <  mitigation  <  judge  <  report  <  tracking      (the library, `governance`)
    jobs                                            (the application: CLI, nightly, demo)

Every import counts, at module level or inside a function (a lazy import is still a
dependency); only imports under `if TYPE_CHECKING:` are left out. The judge must also never
reach torch or MLflow, and the engine never MLflow, through any chain of imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["base", "inputs", "models", "patching", "audit", "mitigation", "judge", "report",
          "tracking", "jobs"]
BASE = {"governance", "governance.errors", "governance.names", "governance.files",
        "governance.numbers", "governance.plots", "governance.redaction"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    found = {}
    for package in ("governance", "jobs"):
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


@cache
def imports_of(module: str) -> frozenset[str]:
    """Every module `module` imports (absolute names; `from a import b` counts `a.b` when that
    is one of ours), skipping `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(modules()[module].read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if f"{node.module}.{a.name}" in modules())
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return frozenset(found)


def _ours(name: str) -> str | None:
    """The module of ours that an imported name refers to (a package or a module)."""
    while name:
        if name in modules():
            return name
        name = name.rpartition(".")[0]
    return None


@cache
def reaches(module: str) -> frozenset[str]:
    """Everything `module` imports, directly or through modules of ours (third-party names
    as imported, e.g. `torch.nn`)."""
    found: set[str] = set()
    visited, todo = {module}, [module]
    while todo:
        for name in imports_of(todo.pop()):
            found.add(name)
            ours = _ours(name)
            if ours is not None and ours not in visited:
                visited.add(ours)
                todo.append(ours)
    return frozenset(found | (visited - {module}))


def layer(module: str) -> str:
    if module.startswith("jobs"):
        return "jobs"
    if module in BASE:
        return "base"
    return module.split(".")[1]


def test_every_module_is_in_a_layer():
    unknown = {m: layer(m) for m in modules() if layer(m) not in LAYERS}
    assert not unknown, f"modules outside the layers {LAYERS}: {unknown}"


def test_each_layer_imports_only_what_is_below_it():
    wrong = []
    for module in modules():
        mine = LAYERS.index(layer(module))
        for name in imports_of(module):
            ours = _ours(name)
            if ours is None or ours == "governance" and name != "governance":
                continue
            if LAYERS.index(layer(ours)) > mine:
                wrong.append(f"{module} ({layer(module)}) imports {ours} ({layer(ours)})")
    assert not wrong, "imports against the flow:\n" + "\n".join(sorted(wrong))


def _third_party(module: str, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(n for n in reaches(module) if n.split(".")[0] in prefixes)


def test_the_library_never_imports_the_application():
    wrong = {m: sorted(n for n in reaches(m) if n.split(".")[0] == "jobs")
             for m in modules() if m.startswith("governance")}
    assert not {m: v for m, v in wrong.items() if v}


JUDGEMENT = ("governance.judge", "governance.names")


@pytest.mark.parametrize("module", sorted(m for m in modules() if m.startswith(JUDGEMENT)))
def test_judgement_never_reaches_torch_or_mlflow(module):
    assert _third_party(module, ("torch", "transformers", "mlflow")) == []


@pytest.mark.parametrize("module", sorted(m for m in modules()
                                          if m.startswith("governance.patching")))
def test_the_engine_never_reaches_mlflow(module):
    assert _third_party(module, ("mlflow",)) == []


def test_only_the_ray_executor_imports_ray():
    """Ray is an optional extra: one module imports it, and nothing imports that module but
    the nightly (lazily, with `executor: ray`)."""
    importers = sorted(m for m in modules() if "ray" in {n.split(".")[0] for n in imports_of(m)})
    assert importers == ["jobs.ray_executor"]
    users = sorted(m for m in modules() if "jobs.ray_executor" in imports_of(m))
    assert users == ["jobs.nightly"]


def test_the_check_sees_lazy_imports():
    """The graph includes imports inside functions: the audit run loads the engine lazily."""
    assert "governance.patching.engine" in imports_of("governance.audit.run")
    assert "torch" in {n.split(".")[0] for n in reaches("governance.audit.run")}


def test_component_names_have_one_definition():
    """COMPONENTS and POSITIONS are defined once (governance.names) and used by both sides."""
    defined = [m for m in modules()
               if any(isinstance(node, ast.Assign) and any(
                   getattr(t, "id", None) in ("COMPONENTS", "POSITIONS") for t in node.targets)
                   for node in ast.parse(modules()[m].read_text()).body)]
    assert defined == ["governance.names"]
    from governance.judge.policy import base
    from governance.names import COMPONENTS, POSITIONS
    from governance.patching import engine

    assert base.COMPONENTS is COMPONENTS and engine.POSITIONS is POSITIONS


def test_importing_the_judge_loads_no_torch():
    code = ("import sys; import governance.judge.policy, governance.judge.drift, "
            "governance.judge.quality, governance.audit.result, governance.audit.spec; "
            "print(sorted(m for m in ('torch', 'transformers', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_console_script_is_the_application():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'persona-gov = "jobs.cli.main:main"' in text
