"""The shape of the package: imports flow one way, and only the tracking modules touch mlflow."""
import ast

import yaml

from mmrec.sources import PACKAGE, closure, import_graph
from tests.conftest import REPO

MLFLOW_MODULES = {"store", "track", "pipeline_run", "registry"}


def test_the_package_import_graph_has_no_cycle():
    g = import_graph()
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
