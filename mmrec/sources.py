"""The project code a script runs: the mmrec modules it imports, followed through the package, and their digests.

The one import walker of the project. tests/base/test_house.py checks with it that a stage's dvc.yaml deps list every
module the stage runs and that imports flow one way between the sub-packages; pipeline/rung.py ties a resumable
checkpoint to the digest of the code that trains (a code change restarts a rung); registry/models.py copies what
a served model imports into its version.

Modules are named as Python names them ('mmrec.model.lm'); a module's file is found under the package root.
"""
from __future__ import annotations

import ast
from pathlib import Path

from mmrec.files import sha256_file

PACKAGE = Path(__file__).resolve().parent


def module_file(module: str, package: Path = PACKAGE) -> Path:
    """'mmrec.model.lm' -> <package>/model/lm.py; a package -> its __init__.py."""
    path = package.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _is_module(module: str, package: Path) -> bool:
    return module_file(module, package).exists()


def project_imports(path: Path, package: Path = PACKAGE, *, top_level_only: bool = False) -> set[str]:
    """The mmrec modules that `path` imports: in its whole body (deferred imports included), or only at
    module level (what importing it runs). `from mmrec.model import lm` names mmrec.model.lm."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mmrec":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}", package)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mmrec"}
    return {m for m in found if m != "mmrec" and _is_module(m, package)}


def with_parents(modules: set[str]) -> set[str]:
    """Importing mmrec.model.lm runs mmrec/model/__init__.py first: the parent packages of each module too."""
    out = set(modules)
    for m in modules:
        parts = m.split(".")
        out |= {".".join(parts[:i]) for i in range(2, len(parts))}
    return out


def all_modules(package: Path = PACKAGE) -> list[str]:
    """Every module of the package by name, packages (their __init__) included, the root's own __init__ not."""
    names = []
    for p in sorted(package.rglob("*.py")):
        if "__pycache__" in p.parts or p == package / "__init__.py":
            continue
        parts = p.relative_to(package).with_suffix("").parts
        names.append(".".join(["mmrec", *(parts[:-1] if parts[-1] == "__init__" else parts)]))
    return names


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports."""
    return {m: project_imports(module_file(m, package), package) for m in all_modules(package)}


def closure(script: Path, package: Path = PACKAGE, *, top_level_only: bool = False) -> set[str]:
    """Every mmrec module `script` needs, following imports through the package (reading only those), with
    the packages whose __init__ runs on the way."""
    todo, seen = set(project_imports(script, package, top_level_only=top_level_only)), set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo |= project_imports(module_file(module, package), package, top_level_only=top_level_only)
    return with_parents(seen)


def source_digests(script: Path, package: Path = PACKAGE) -> dict[str, str]:
    """sha256 of `script` and of each mmrec module it runs, keyed by path from the repository root
    ('stages/train.py', 'mmrec/model/lm.py'): equal exactly when the code that runs is."""
    root = package.parent
    files = [script, *(module_file(m, package) for m in sorted(closure(script, package)))]
    return {(f.relative_to(root) if f.is_relative_to(root) else Path(f.name)).as_posix(): sha256_file(f)
            for f in files if f.exists()}
