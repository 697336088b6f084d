"""The shape of the package: imports flow one way, and only the tracking modules touch mlflow."""
import ast
from pathlib import Path

import yaml

from tests.conftest import REPO

PACKAGE = Path(__file__).resolve().parents[1] / "mmrec"
MLFLOW_MODULES = {"store", "track", "pipeline_run", "registry"}


def project_imports(path: Path) -> set[str]:
    """The mmrec modules that `path` imports anywhere in its body (deferred imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "mmrec":
                found |= {a.name for a in node.names}
            elif node.module.startswith("mmrec."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mmrec.")}
    return found


def graph() -> dict[str, set[str]]:
    return {p.stem: project_imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def test_the_package_import_graph_has_no_cycle():
    g = graph()
    done, path = set(), []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for dep in sorted(g.get(module, ())):
            visit(dep)
        path.pop()
        done.add(module)

    for module in sorted(g):
        visit(module)


def test_only_the_tracking_modules_import_mlflow():
    for p in PACKAGE.glob("*.py"):
        tree = ast.parse(p.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "mlflow" not in names or p.stem in MLFLOW_MODULES, p.name
        if p.stem in ("model", "scan"):
            assert not names & {"mlflow", "dvc", "yaml"}, p.name


def closure(start: Path) -> set[str]:
    """Every mmrec module a script needs, following imports through the package."""
    g, todo, seen = graph(), set(project_imports(start)), set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo |= g.get(module, set())
    return seen


def test_every_stage_depends_on_each_module_it_imports():
    """A code change reruns exactly the stages that run that code: dvc.yaml deps cover the import closure."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        script = REPO / body["cmd"].split()[1]
        deps = {d for d in body["deps"]}
        assert script.relative_to(REPO).as_posix() in deps, name
        missing = sorted(f"mmrec/{m}.py" for m in closure(script) if f"mmrec/{m}.py" not in deps)
        assert not missing, f"{name} imports {missing} but does not depend on them"
        assert "data/params.ok" in deps or name == "validate", f"{name} must wait for the validate stage"
