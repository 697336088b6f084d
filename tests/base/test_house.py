"""The shape of the package: sub-packages in layers that import one way, mlflow only in tracking and registry,
and dvc.yaml deps that cover the code each stage runs."""
import ast

import yaml

from mmrec.sources import PACKAGE, all_modules, closure, import_graph, module_file
from tests.conftest import REPO, SLOWEST_FIRST, TESTS

# Higher floors use lower ones, never the reverse; rooms on one floor do not use each other.
FLOORS = [
    {"base"},                    # config, paths, errors, files, procs, memory, sources, paired
    {"data"},                    # corpus, tokenizer, windows
    {"model", "tracking"},       # the networks; MLflow runs and the store
    {"training", "registry"},    # the loop; the gate and the registered versions
    {"pipeline"},                # what the stages drive
]
MLFLOW_ROOMS = {"tracking", "registry", "pipeline"}


def room(module: str) -> str:
    """mmrec.model.lm -> 'model'; a module of the base (mmrec.config) -> 'base'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or module_file(module).name == "__init__.py" else "base"


def floor(module: str) -> int:
    return next(i for i, rooms in enumerate(FLOORS) if room(module) in rooms)


def test_every_module_lives_in_a_room_of_the_plan():
    rooms = set().union(*FLOORS)
    assert {room(m) for m in all_modules()} <= rooms


def test_imports_run_down_the_floors_and_never_across_a_floor():
    wrong = [f"{m} -> {d}" for m, deps in import_graph().items() for d in deps
             if floor(d) > floor(m) or (floor(d) == floor(m) and room(d) != room(m))]
    assert not wrong, "imports against the plan: " + ", ".join(sorted(wrong))


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


def test_only_tracking_registry_and_pipeline_import_mlflow_and_the_model_no_tool_at_all():
    for module in all_modules():
        tree = ast.parse(module_file(module).read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "mlflow" not in names or room(module) in MLFLOW_ROOMS, module
        if room(module) in ("model", "data"):
            assert not names & {"mlflow", "dvc", "yaml"}, module


def test_every_stage_depends_on_each_module_it_imports():
    """A code change reruns exactly the stages that run that code: dvc.yaml deps cover the import closure."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        script = REPO / body["cmd"].split()[1]
        deps = {d for d in body["deps"]}
        assert script.relative_to(REPO).as_posix() in deps, name
        needed = {module_file(m).relative_to(PACKAGE.parent).as_posix() for m in closure(script)}
        missing = sorted(needed - deps)
        assert not missing, f"{name} imports {missing} but does not depend on them"
        extra = sorted(d for d in deps if d.startswith("mmrec/") and d not in needed)
        assert not extra, f"{name} depends on {extra} that it never runs: a change there reruns it for nothing"
        assert "data/params.ok" in deps or name == "validate", f"{name} must wait for the validate stage"


def test_only_the_config_module_reads_yaml():
    """params.yaml has one reader: mmrec/config.py (everything else asks it). The export reads MLflow's MLmodel."""
    readers = [m for m in all_modules() if "yaml" in {a.name for n in ast.walk(ast.parse(module_file(m).read_text()))
                                                      if isinstance(n, ast.Import) for a in n.names}]
    assert readers == ["mmrec.config", "mmrec.registry.export"]


def test_the_suites_slowest_first_list_names_files_that_exist():
    """A renamed file would drop out of the list silently and end the suite on one worker again."""
    missing = [name for name in SLOWEST_FIRST if not (TESTS / name).is_file()]
    assert not missing and len(set(SLOWEST_FIRST)) == len(SLOWEST_FIRST), missing
